"""The action-unit graph of Eq. 6-8: its rules, its sparse and dense forms, and how to build them.

Three edge rules join unit i (the one that aggregates) to a neighbour j != i:

- **contextual**: ``tIoU(i, j) > theta_ctx`` (Eq. 4, 7);
- **surrounding**: among the units disjoint from i (tIoU = 0; touching counts as disjoint) with
  ``d(i, j) < theta_sur`` (Eq. 5), the ``k_sur`` nearest by d (``k_sur=None``: all of them).
  The paper states only the threshold; since d lies in [0.5, 1) for every disjoint pair, its
  theta_sur = 1 admits every disjoint unit, and the authors' code keeps the 2 nearest;
- **semantic**: the ``l_sem`` units most cosine-similar to i among those disjoint from it
  (``semantic_rule="disjoint-top"``, the authors' code), or, reading Eq. 6 literally, the
  ``l_sem`` most similar of all units, kept if disjoint (``"knn-then-disjoint"``).

Edges are directed and unique per (i, j); ``edge_type`` is a bit mask since one edge may satisfy
several rules. ``weight`` is A_ij of Eq. 8: cosine similarity of the two units' features,
clamped at 0 so that aggregation never subtracts a neighbour. Rankings break ties by the lower
neighbour index, so graphs are deterministic.

:func:`build_graph` marks the edges of one setting; :mod:`gcm_core.candidates` keeps every edge
a grid of settings may need, once per video, and selects each setting's graph from them (the same
graph). Pairwise work is done in row blocks (:mod:`gcm_core.pairwise`), never as one N x N
allocation, except in :func:`build_dense_graph`, the fixed-shape form for captured GPU inference
of one video.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from gcm_core.checks import check_ranges
from gcm_core.pairwise import PairBlock, pair_blocks, smallest_mask
from gcm_core.units import DEFAULT_BLOCK_ELEMENTS, as_intervals

EDGE_TYPES: tuple[str, ...] = ("contextual", "surrounding", "semantic")
#: Bit of each edge type in ``Graph.edge_type``.
EDGE_BIT: dict[str, int] = {name: 1 << k for k, name in enumerate(EDGE_TYPES)}
SemanticRule = Literal["disjoint-top", "knn-then-disjoint"]


@dataclass(frozen=True)
class GraphSpec:
    """The graph settings a run (or one trial of an ablation grid) uses; defaults are the paper's."""

    theta_ctx: float = 0.7
    theta_sur: float = 1.0
    k_sur: int | None = 2
    l_sem: int = 2
    edge_types: tuple[str, ...] = EDGE_TYPES
    semantic_rule: SemanticRule = "disjoint-top"

    def __post_init__(self) -> None:
        object.__setattr__(self, "edge_types", tuple(self.edge_types))
        unknown = set(self.edge_types) - set(EDGE_TYPES)
        if unknown:
            raise ValueError(f"unknown edge types {sorted(unknown)}; choose from {EDGE_TYPES}")
        if self.semantic_rule not in ("disjoint-top", "knn-then-disjoint"):
            raise ValueError(f"unknown semantic_rule {self.semantic_rule!r}")
        check_ranges(self, theta_ctx="in [0, 1]", theta_sur=">= 0", k_sur=">= 0", l_sem=">= 0")


@dataclass
class Graph:
    """A sparse directed graph over the units of one video or of a batch of videos.

    ``edge_index[0]`` aggregates ``edge_index[1]``. ``ptr`` [B + 1] delimits the videos of a batch:
    video b owns nodes ``ptr[b]:ptr[b + 1]`` and no edge crosses videos.
    """

    num_nodes: int
    edge_index: Tensor
    edge_type: Tensor
    weight: Tensor
    ptr: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.ptr is None:
            self.ptr = torch.tensor([0, self.num_nodes], dtype=torch.long)

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def num_videos(self) -> int:
        return int(self.ptr.numel() - 1)

    def has_type(self, name: str) -> Tensor:
        """Boolean mask of the edges admitted by rule ``name``."""
        return (self.edge_type & EDGE_BIT[name]) != 0

    def union(self, other: "Graph") -> "Graph":
        """The edges of two graphs over the same units of one video, each pair once, rows in order
        and columns sorted within a row (as :func:`build_graph` gives them); a pair in both keeps
        the rules of both, and its weight (the same two units' cosine in both)."""
        if self.num_nodes != other.num_nodes or self.num_videos != 1 or other.num_videos != 1:
            raise ValueError("a union joins two graphs over the same units of one video")
        n = self.num_nodes
        pairs = torch.cat([self.edge_index, other.edge_index], dim=1)
        keys, slot = torch.unique(pairs[0] * n + pairs[1], return_inverse=True)
        types = torch.zeros(2, keys.numel(), dtype=torch.uint8, device=keys.device)
        types[0, slot[:self.num_edges]] = self.edge_type
        types[1, slot[self.num_edges:]] = other.edge_type
        weight = torch.empty(keys.numel(), dtype=self.weight.dtype, device=keys.device)
        weight[slot] = torch.cat([self.weight, other.weight])
        return Graph(n, torch.stack([keys // max(n, 1), keys % max(n, 1)]), types[0] | types[1], weight)

    def to(self, device: torch.device | str) -> "Graph":
        return Graph(self.num_nodes, self.edge_index.to(device), self.edge_type.to(device),
                     self.weight.to(device), self.ptr.to(device))

    @staticmethod
    def batch(graphs: Sequence["Graph"]) -> "Graph":
        """One block-diagonal graph of several videos' graphs, nodes concatenated in order."""
        sizes = torch.tensor([g.num_nodes for g in graphs], dtype=torch.long)
        ptr = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        edge_index = torch.cat([g.edge_index + ptr[b] for b, g in enumerate(graphs)], dim=1)
        return Graph(
            num_nodes=int(ptr[-1]),
            edge_index=edge_index,
            edge_type=torch.cat([g.edge_type for g in graphs]),
            weight=torch.cat([g.weight for g in graphs]),
            ptr=ptr,
        )


def _edge_types(block: PairBlock, spec: GraphSpec) -> Tensor:
    """[rows, N] uint8: the EDGE_BIT mask of every pair of the block under ``spec`` (0: no edge)."""
    types = torch.zeros_like(block.disjoint, dtype=torch.uint8)
    if "contextual" in spec.edge_types:
        types.add_(block.contextual(spec.theta_ctx), alpha=EDGE_BIT["contextual"])
    if "surrounding" in spec.edge_types:
        near = smallest_mask(block.surrounding_keys(spec.theta_sur), spec.k_sur, block.buf.chosen)
        types.add_(near, alpha=EDGE_BIT["surrounding"])
    if "semantic" in spec.edge_types:
        negated = block.dissimilarity_keys()
        if spec.semantic_rule == "knn-then-disjoint":
            similar = smallest_mask(negated, spec.l_sem, block.buf.mask).logical_and_(block.disjoint)
        else:
            similar = smallest_mask(block.only_disjoint(negated), spec.l_sem, block.buf.mask)
        types.add_(similar, alpha=EDGE_BIT["semantic"])
    return types


def build_graph(intervals: Tensor, features: Tensor, spec: GraphSpec = GraphSpec(),
                max_block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> Graph:
    """The graph of one video's units under ``spec`` (Eq. 7) with cosine weights (Eq. 8).

    Equal to ``select_edges(candidate_edges(..., CandidateCaps.for_spec(spec)), spec)`` (tested),
    but marks the edges of this one setting directly, with no per-rule ranking: a few dense
    passes per block instead of the candidates' bookkeeping, which matters where graphs are
    built on the fly (inference, D-SSAD feature maps), above all on a GPU, whose time there goes
    to launching many small operations.
    """
    n, _, blocks = pair_blocks(intervals, features, max_block_elements)
    src, dst, edge_type, weight = [], [], [], []
    for block in blocks:
        types = _edge_types(block, spec)
        row, col = types.nonzero(as_tuple=True)
        src.append(row + block.rows.start)
        dst.append(col)
        edge_type.append(types[row, col])
        weight.append(block.cos[row, col].clamp(min=0).float())
    if n == 0:
        return Graph(0, torch.empty(2, 0, dtype=torch.long), torch.empty(0, dtype=torch.uint8), torch.empty(0))
    return Graph(n, torch.stack([torch.cat(src), torch.cat(dst)]), torch.cat(edge_type), torch.cat(weight))


@dataclass
class DenseGraph:
    """One video's graph as [N, N] tensors: ``adjacency[i, j]`` when i aggregates j, ``weight`` A_ij.

    The same edges and weights as :func:`build_graph`, in fixed-shape tensors, so that building
    it and running a head over it can be captured once as a CUDA graph and replayed
    (:mod:`gcm_core.captured`). O(N^2) memory: for the unit count of one video at inference.
    Beyond the paper: a representation for speed, not a different graph.
    """

    adjacency: Tensor
    weight: Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.adjacency.shape[0])

    def mean_operator(self, weight: Tensor) -> Tensor:
        """A new [N, N] M with ``(M h)[i]`` the ``weight``-weighted mean over i's neighbours (0 without any)."""
        degree = self.adjacency.sum(dim=1, keepdim=True).clamp_(min=1)
        return weight.masked_fill(~self.adjacency, 0) / degree.to(weight.dtype)


def build_dense_graph(intervals: Tensor, features: Tensor, spec: GraphSpec = GraphSpec(),
                      num_units: Tensor | int | None = None, validate: bool = True) -> DenseGraph:
    """:func:`build_graph` as a :class:`DenseGraph`, with fixed-shape operations only.

    ``num_units``: units from this index on are padding (a 0-d tensor may change between replays
    of a captured graph); they are nobody's neighbour, and their own rows are to be ignored.
    ``validate=False`` skips the interval checks, which need a host synchronisation (the caller
    checks the intervals before they reach the device).
    """
    iv = as_intervals(intervals) if validate else intervals
    n = iv.shape[0]
    padding = None if num_units is None else (torch.arange(n, device=iv.device) >= num_units)[None, :]
    _, _, blocks = pair_blocks(iv, features, max(1, n * n), padding, validate=False)
    block = next(blocks, None)
    if block is None:  # no units
        return DenseGraph(torch.zeros(0, 0, dtype=torch.bool, device=iv.device), torch.zeros(0, 0, device=iv.device))
    adjacency = _edge_types(block, spec) != 0
    return DenseGraph(adjacency, block.cos.clamp(min=0).masked_fill_(~adjacency, 0).float())
