"""The Graph Convolutional Module (Eq. 1, 2, 18) and the baselines of Tables 4, 6 and 8.

Every module maps unit features ``x`` [N, d] of a batch of videos, held as one block-diagonal
:class:`~gcm_core.graph.Graph`, to relation-aware features [N, d] (or to the rows ``nodes`` only),
through K linear layers W^(k) (d x d, no bias, as Eq. 1) with ReLU and dropout between layers
and the residual sum Y = X^(K) + X^(0) (Eq. 2):

- ``gcm``: layer k computes ``x_i <- (mean_{j in S(i)} A_ij x_j + x_i) W^(k)``. In training S(i)
  is a uniform sample of N_s neighbours drawn anew per layer, top-down from the units that are
  asked for (Eq. 18, SAGE), once per iteration for modules over the same graph (SSN's two GCMs
  share a :class:`UnitPlan`); in evaluation S(i) is the whole neighbourhood. Eq. 18 divides by
  N_s; a unit with fewer than N_s neighbours takes all of them and is divided by their number,
  so the sampled layer is an unbiased estimate of the full one and equals it once N_s covers
  every degree (this is also the authors' code's degree normalisation at test time).
  A_ij comes from the graph (``cos``, Eq. 8), from the cosine of a learned linear embedding of
  X^(0) clamped at 0 (``embed-cos``), or is 1 (``binary``). ``self_add=False`` drops the
  ``+ x_i`` term (Table 7's plain "cos-sim").
- ``mlp``: the same layers with no aggregation (a GCM over a graph without edges).
- ``mp``: the MLP, then each unit plus the plain mean of its graph neighbours (Table 6).
- ``attention``: the GCM layer with A replaced by learned scaled dot-product attention over all
  units of the same video (the fully connected graph of Table 8).

Messages are sparse matrix products over the edge index; no dense N x N adjacency is formed
(``attention`` is dense per video by definition), except that ``gcm`` and ``mlp`` also accept a
:class:`~gcm_core.graph.DenseGraph` for inference over every unit (the CUDA-graph path).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gcm_core.graph import DenseGraph, Graph

# torch says once per process that CSR tensors are "beta" (and, in some versions, that invariant
# checks are off although they were turned off on purpose); the one product used here (CSR @ dense,
# autograd to both operands) is checked against dense references in tests/core/test_module.py.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

ModuleKind = Literal["gcm", "mlp", "mp", "attention"]
EdgeWeighting = Literal["cos", "embed-cos", "binary"]


class UnitModule(nn.Module):
    """K bias-free d x d layers, ReLU + dropout between them, residual Y = X^(K) + X^(0)."""

    def __init__(self, dim: int, num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        self.dim = dim
        self.layers = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(num_layers))
        self.dropout = nn.Dropout(dropout)

    def _transform(self, k: int, h: Tensor) -> Tensor:
        h = self.layers[k](h)
        if k < len(self.layers) - 1:
            h = self.dropout(F.relu(h))
        return h

    # Subclasses define forward(x [N, d], graph, nodes=None) -> features of ``nodes`` (default: all).

    @staticmethod
    def _rows(x: Tensor, nodes: Tensor | None) -> Tensor:
        return x if nodes is None else x[nodes]


class MLP(UnitModule):
    """No relations: every unit on its own (the 'MLP' rows of Tables 4 and 9)."""

    def forward(self, x: Tensor, graph: Graph, nodes: Tensor | None = None) -> Tensor:
        x0 = self._rows(x, nodes)
        h = x0
        for k in range(len(self.layers)):
            h = self._transform(k, h)
        return h + x0


@dataclass(frozen=True)
class NeighbourhoodMean:
    """One layer's aggregation pattern as a CSR matrix: ``(M h)[r] = sum_e w[edge_e] h[col_e] / n_r``
    over the entries e of output row r (n_r of them; a row with none gives 0).

    The pattern depends on the graph and the sampled edges only; the weights ``w`` (one per edge of
    the graph) are given per module, as they may be learned (``embed-cos``), so that several
    modules share the sorting and bookkeeping. CSR (rows in order, columns sorted within a row):
    one compressed product per layer, no coalescing of a COO matrix on every call.
    """

    crow: Tensor
    col: Tensor
    edge: Tensor       # the graph edge of each entry, in CSR order
    row_size: Tensor   # n_r of each entry's row, float
    shape: tuple[int, int]

    @staticmethod
    def of(rows: Tensor, cols: Tensor, edges: Tensor, n_out: int, n_in: int) -> "NeighbourhoodMean":
        order = torch.argsort(rows * n_in + cols)
        rows, cols, edges = rows[order], cols[order], edges[order]
        crow = torch.searchsorted(rows, torch.arange(n_out + 1, device=rows.device))
        size = (crow[1:] - crow[:-1]).clamp_(min=1)
        return NeighbourhoodMean(crow, cols, edges, size[rows].to(torch.float32), (n_out, n_in))

    def operator(self, weight: Tensor) -> Tensor:
        """The sparse matrix M for the graph's edge weights ``weight``; autograd reaches them."""
        values = weight[self.edge] / self.row_size.to(weight.dtype)
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)


@dataclass(frozen=True)
class UnitPlan:
    """What a GCM computes for one batch: the units it reads (``inputs``, None: all), one
    aggregation per layer with the input row of each unit it computes (``self_rows``, None: the
    same rows), and the rows of the asked-for units in the last layer (``outputs``, None: all)."""

    inputs: Tensor | None
    layers: list[NeighbourhoodMean]
    self_rows: list[Tensor | None]
    outputs: Tensor | None


def _sparse_mean(src: Tensor, dst: Tensor, weight: Tensor, n_out: int, h: Tensor) -> Tensor:
    """``out[i] = sum_{e: src_e = i} weight_e h[dst_e] / #edges of i`` (0 for a unit with none)."""
    edges = torch.arange(src.numel(), device=src.device)
    return NeighbourhoodMean.of(src, dst, edges, n_out, h.shape[0]).operator(weight.to(h.dtype)) @ h


def _sample_per_node(src: Tensor, num_samples: int) -> Tensor:
    """Indices of at most ``num_samples`` uniformly chosen edges per source node, without replacement."""
    if src.numel() == 0:
        return src.new_empty(0)
    keys = src.to(torch.float64) + torch.rand(src.numel(), dtype=torch.float64, device=src.device)
    order = torch.argsort(keys)
    sorted_src = src[order]
    first = torch.ones_like(sorted_src, dtype=torch.bool)
    first[1:] = sorted_src[1:] != sorted_src[:-1]
    group_start = torch.cummax(torch.where(first, torch.arange(src.numel(), device=src.device), 0), 0).values
    rank = torch.arange(src.numel(), device=src.device) - group_start
    return order[rank < num_samples]


class GCM(UnitModule):
    """Graph convolution over the unit graph (Eq. 1, 2; sampled as Eq. 18 in training)."""

    def __init__(self, dim: int, num_layers: int = 2, dropout: float = 0.0, num_samples: int | None = 4,
                 weighting: EdgeWeighting = "cos", self_add: bool = True, embed_dim: int = 256) -> None:
        super().__init__(dim, num_layers, dropout)
        if weighting not in ("cos", "embed-cos", "binary"):
            raise ValueError(f"unknown edge weighting {weighting!r}")
        self.num_samples = num_samples
        self.weighting = weighting
        self.self_add = self_add
        self.embed = nn.Linear(dim, embed_dim, bias=False) if weighting == "embed-cos" else None

    def _edge_weights(self, x0: Tensor, graph: Graph | DenseGraph) -> Tensor:
        """A_ij per edge ([E]) of a Graph, per pair ([N, N], masked later) of a DenseGraph."""
        if self.weighting == "binary":
            return torch.ones_like(graph.weight, dtype=x0.dtype)
        if self.embed is None:
            return graph.weight
        z = F.normalize(self.embed(x0), dim=1)
        if isinstance(graph, DenseGraph):
            return (z @ z.T).clamp(min=0)
        src, dst = graph.edge_index
        return (z[src] * z[dst]).sum(dim=1).clamp(min=0)

    @property
    def _sampling(self) -> bool:
        return self.training and self.num_samples is not None

    def plan(self, graph: Graph, nodes: Tensor | None = None) -> UnitPlan:
        """The units and edges each layer computes for ``nodes`` (None: all), sampled in training.

        Top-down: the last layer computes ``nodes``; each layer below also computes the
        neighbours sampled for the layer above. Without sampling and with every unit asked for,
        each layer aggregates every edge. Modules of the same depth and sampling may share a plan:
        SSN's two GCMs do (:func:`shared_plan`).
        """
        src, dst = graph.edge_index
        n = graph.num_nodes
        if nodes is None and not self._sampling:
            every = NeighbourhoodMean.of(src, dst, torch.arange(graph.num_edges, device=src.device), n, n)
            return UnitPlan(None, [every] * len(self.layers), [None] * len(self.layers), None)
        need = torch.ones(n, dtype=torch.bool, device=src.device)
        if nodes is not None:
            need = torch.zeros_like(need)
            need[nodes] = True
        top_down: list[tuple[Tensor, Tensor]] = []
        for _ in self.layers:
            edges = need[src].nonzero().squeeze(1)
            if self._sampling:
                edges = edges[_sample_per_node(src[edges], self.num_samples)]
            top_down.append((need.nonzero().squeeze(1), edges))
            need = need.clone()
            need[dst[edges]] = True
        inputs = read = need.nonzero().squeeze(1)
        in_row = torch.full((n,), -1, dtype=torch.long, device=src.device)
        layers, self_rows = [], []
        for units, edges in reversed(top_down):
            in_row[read] = torch.arange(read.numel(), device=src.device)
            out_row = torch.full_like(in_row, -1)
            out_row[units] = torch.arange(units.numel(), device=src.device)
            layers.append(NeighbourhoodMean.of(out_row[src[edges]], in_row[dst[edges]], edges, units.numel(),
                                               read.numel()))
            self_rows.append(in_row[units])
            read = units
        return UnitPlan(inputs, layers, self_rows, None if nodes is None else out_row[nodes])

    def _dense_forward(self, x: Tensor, graph: DenseGraph, weight: Tensor) -> Tensor:
        """Every unit over its whole neighbourhood of a fixed-shape graph (the CUDA-graph path)."""
        operator = graph.mean_operator(weight.to(x.dtype))
        if self.self_add:   # (M + I) h: the self term inside the product, no extra pass over [N, d]
            operator.diagonal().add_(1)
        h = x
        for k in range(len(self.layers)):
            h = self._transform(k, operator @ h)
        return h + x

    def forward(self, x: Tensor, graph: Graph | DenseGraph, nodes: Tensor | None = None,
                plan: UnitPlan | None = None) -> Tensor:
        """Relation-aware features of ``nodes`` (None: all); ``plan``: one made by :meth:`plan`
        for this graph and these nodes (made here when not given)."""
        weight = self._edge_weights(x, graph)
        if isinstance(graph, DenseGraph):
            if nodes is not None or self._sampling:
                raise ValueError("a DenseGraph serves inference over every unit (eval mode, nodes=None) only")
            return self._dense_forward(x, graph, weight)
        if plan is None:
            plan = self.plan(graph, nodes)
        h = x if plan.inputs is None else x[plan.inputs]
        for k, (mean, self_rows) in enumerate(zip(plan.layers, plan.self_rows)):
            if k == 0 or mean is not plan.layers[k - 1]:   # every layer over every edge: one operator
                operator = mean.operator(weight.to(h.dtype))
            mixed = operator @ h
            if self.self_add:
                mixed = mixed + (h if self_rows is None else h[self_rows])
            h = self._transform(k, mixed)
        if nodes is None:
            return h + x
        return h[plan.outputs] + x[nodes]


def shared_plan(modules: tuple[nn.Module, ...], graph: Graph | DenseGraph, nodes: Tensor | None) -> UnitPlan | None:
    """One plan for several GCMs over the same graph, or None where they cannot share one (a
    module is not a GCM; their depth or sampling differ; a DenseGraph).

    Algorithm 1 samples the neighbourhoods once per iteration, and the authors' code gives SSN's
    two GCMs the same sampled tree; one plan also halves the work of making it.
    """
    if isinstance(graph, DenseGraph) or not all(isinstance(m, GCM) for m in modules):
        return None
    first = modules[0]
    if any((len(m.layers), m._sampling, m.num_samples) != (len(first.layers), first._sampling, first.num_samples)
           for m in modules):
        return None
    return first.plan(graph, nodes)


class MeanPool(UnitModule):
    """Table 6's 'MP': the MLP, then each unit plus the plain mean of its graph neighbours.

    The same aggregation as a GCM layer's (self + neighbourhood mean), but parameter-free, with
    uniform weights and full neighbourhoods, applied once after the MLP instead of inside it.
    """

    def forward(self, x: Tensor, graph: Graph, nodes: Tensor | None = None) -> Tensor:
        src, dst = graph.edge_index
        if nodes is None:
            needed = torch.arange(graph.num_nodes, device=x.device)
            edges = torch.arange(graph.num_edges, device=x.device)
        else:
            out_needed = torch.zeros(graph.num_nodes, dtype=torch.bool, device=x.device)
            out_needed[nodes] = True
            edges = out_needed[src].nonzero().squeeze(1)
            needed = torch.unique(torch.cat([nodes, dst[edges]]))
        h = x[needed]
        for k in range(len(self.layers)):
            h = self._transform(k, h)
        h_all = torch.zeros_like(x).index_copy_(0, needed, h + x[needed])
        targets = needed if nodes is None else nodes
        out_position = torch.full((graph.num_nodes,), -1, dtype=torch.long, device=x.device)
        unique_targets = torch.unique(targets)
        out_position[unique_targets] = torch.arange(unique_targets.numel(), device=x.device)
        ones = torch.ones(edges.numel(), dtype=h.dtype, device=h.device)
        mean = _sparse_mean(out_position[src[edges]], dst[edges], ones, unique_targets.numel(), h_all)
        pooled = h_all[unique_targets] + mean
        return pooled[out_position[targets]]


class Attention(UnitModule):
    """Learned scaled dot-product weights over all units of each video (Table 8)."""

    def __init__(self, dim: int, num_layers: int = 2, dropout: float = 0.0, key_dim: int = 256) -> None:
        super().__init__(dim, num_layers, dropout)
        self.query = nn.ModuleList(nn.Linear(dim, key_dim, bias=False) for _ in range(num_layers))
        self.key = nn.ModuleList(nn.Linear(dim, key_dim, bias=False) for _ in range(num_layers))

    def forward(self, x: Tensor, graph: Graph, nodes: Tensor | None = None) -> Tensor:
        h = x
        bounds = graph.ptr.tolist()
        for k in range(len(self.layers)):
            q, key = self.query[k](h), self.key[k](h)
            mixed = torch.cat([
                F.scaled_dot_product_attention(q[None, a:b], key[None, a:b], h[None, a:b])[0]
                for a, b in zip(bounds[:-1], bounds[1:])
            ])
            h = self._transform(k, mixed + h)
        return self._rows(h + x, nodes)


def make_module(kind: ModuleKind, dim: int, *, num_layers: int = 2, dropout: float = 0.0,
                num_samples: int | None = 4, weighting: EdgeWeighting = "cos", self_add: bool = True) -> UnitModule:
    """The module of one detector branch by name, so that Tables 4, 6, 8 are configurations."""
    if kind == "gcm":
        return GCM(dim, num_layers, dropout, num_samples, weighting, self_add)
    if kind == "mlp":
        return MLP(dim, num_layers, dropout)
    if kind == "mp":
        return MeanPool(dim, num_layers, dropout)
    if kind == "attention":
        return Attention(dim, num_layers, dropout)
    raise ValueError(f"unknown module kind {kind!r}; choose gcm, mlp, mp or attention")
