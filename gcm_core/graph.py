"""The action-unit graph of Eq. 6-8: candidate edges once, cheap selection per setting.

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

Preprocessing computes :func:`candidate_edges` once per video under loose
:class:`CandidateCaps`; a grid over theta_ctx / theta_sur / k_sur / l_sem / edge types then
calls :func:`select_edges`, which is a few masks over the candidates. :func:`build_graph` marks
the edges of one setting directly (for graphs built on the fly) and gives the same graph as
``select_edges(candidate_edges(..., CandidateCaps.for_spec(spec)), spec)``. Pairwise work is
done in row blocks (:func:`gcm_core.units.row_blocks`), never as one N x N allocation, except in
:func:`build_dense_graph`, the fixed-shape form for captured GPU inference of one video.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import Tensor

from gcm_core.units import DEFAULT_BLOCK_ELEMENTS, as_intervals, pairwise_geometry, row_blocks

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
        if (self.k_sur is not None and self.k_sur < 0) or self.l_sem < 0:
            raise ValueError("k_sur and l_sem must be >= 0")


@dataclass(frozen=True)
class CandidateCaps:
    """How loose the candidate set is: every GraphSpec within these caps can be selected from it.

    ``min_ctx_tiou``: contextual candidates have tIoU > this; ``sur_k`` / ``sur_max_dist``: the
    ``sur_k`` nearest disjoint units (None: all) with d < ``sur_max_dist``; ``sem_k``: the most
    similar disjoint units; ``knn_k``: the most similar units overall (literal Eq. 6).
    """

    min_ctx_tiou: float = 0.5
    sur_k: int | None = 8
    sur_max_dist: float = 1.0
    sem_k: int = 8
    knn_k: int = 8

    @classmethod
    def for_spec(cls, spec: GraphSpec) -> "CandidateCaps":
        """The tightest caps from which ``spec`` can be selected."""
        literal = spec.semantic_rule == "knn-then-disjoint"
        semantic = "semantic" in spec.edge_types
        surrounding = "surrounding" in spec.edge_types
        return cls(
            min_ctx_tiou=spec.theta_ctx if "contextual" in spec.edge_types else 1.0,
            sur_k=spec.k_sur if surrounding else 0,
            sur_max_dist=spec.theta_sur if surrounding else 0.0,
            sem_k=spec.l_sem if semantic and not literal else 0,
            knn_k=spec.l_sem if semantic and literal else 0,
        )

    def check_covers(self, spec: GraphSpec) -> None:
        """Raise ValueError if ``spec`` needs candidates these caps did not keep."""
        problems = []
        if "contextual" in spec.edge_types and spec.theta_ctx < self.min_ctx_tiou:
            problems.append(f"theta_ctx={spec.theta_ctx} < min_ctx_tiou={self.min_ctx_tiou}")
        if "surrounding" in spec.edge_types:
            if spec.theta_sur > self.sur_max_dist:
                problems.append(f"theta_sur={spec.theta_sur} > sur_max_dist={self.sur_max_dist}")
            if self.sur_k is not None and (spec.k_sur is None or spec.k_sur > self.sur_k):
                problems.append(f"k_sur={spec.k_sur} exceeds sur_k={self.sur_k}")
        if "semantic" in spec.edge_types:
            cap_name = "knn_k" if spec.semantic_rule == "knn-then-disjoint" else "sem_k"
            if spec.l_sem > getattr(self, cap_name):
                problems.append(f"l_sem={spec.l_sem} exceeds {cap_name}={getattr(self, cap_name)}")
        if problems:
            raise ValueError("graph settings outside the candidate caps: " + "; ".join(problems)
                             + " (recompute candidates with looser CandidateCaps)")


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


@dataclass
class CandidateEdges:
    """Every edge any GraphSpec within ``caps`` may need, with the attributes to select it.

    Per candidate (i, j): ``tiou`` and ``distance`` (float64, Eq. 4-5), ``cosine`` of the
    features, and ``sur_rank`` / ``sem_rank`` / ``knn_rank``: the 0-based rank of j among i's
    disjoint units by distance, among its disjoint units by similarity, and among all its units by
    similarity (-1 where j is not within the cap). Sorted by (i, j).
    """

    num_nodes: int
    caps: CandidateCaps
    edge_index: Tensor
    tiou: Tensor
    distance: Tensor
    cosine: Tensor
    sur_rank: Tensor
    sem_rank: Tensor
    knn_rank: Tensor

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def columns(self) -> dict[str, Tensor]:
        """The per-edge tensors by name (for storage), ``edge_index`` split into ``src``/``dst``."""
        out = {"src": self.edge_index[0], "dst": self.edge_index[1]}
        out.update({f.name: getattr(self, f.name) for f in fields(self)
                    if f.name not in ("num_nodes", "caps", "edge_index")})
        return out

    @classmethod
    def from_columns(cls, num_nodes: int, caps: CandidateCaps, cols: dict[str, Tensor]) -> "CandidateEdges":
        """Inverse of :meth:`columns`."""
        rest = {k: v for k, v in cols.items() if k not in ("src", "dst")}
        return cls(num_nodes, caps, torch.stack([cols["src"], cols["dst"]]).long(), **rest)


def _smallest_mask(keyed: Tensor, k: int | None, chosen: Tensor) -> Tensor:
    """Mark in ``chosen`` the ``k`` smallest finite entries of each row (None: all), ties to the lower column.

    ``keyed`` holds +inf where an entry is not eligible; ``chosen`` is a bool buffer of its shape.
    k passes of a row argmin (the first of equal minima), each setting its pick to +inf: exact
    tie order, fixed shapes, no host synchronisation and no host-to-device copy (so it can be
    captured in a CUDA graph), and faster than a top-k for the paper's small k on CPU and GPU.
    """
    if k is None or k >= keyed.shape[1]:
        return torch.lt(keyed, float("inf"), out=chosen)
    if k == 0:
        return chosen.zero_()
    remaining = keyed.clone()
    for _ in range(k):
        remaining.scatter_(1, remaining.argmin(dim=1, keepdim=True), float("inf"))
    return torch.ne(remaining, keyed, out=chosen)  # set aside = was finite, is +inf now


def _rank_smallest(keyed: Tensor, k: int | None, chosen: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row, col, rank) of the entries :func:`_smallest_mask` chooses, rank 0 the smallest of its row."""
    _smallest_mask(keyed, k, chosen)
    row, col = chosen.nonzero(as_tuple=True)  # row-major: col ascending within a row
    order = torch.argsort(keyed[row, col], stable=True)
    order = order[torch.argsort(row[order], stable=True)]  # by (row, value, col)
    row, col = row[order], col[order]
    rank = torch.arange(row.numel(), device=row.device) - torch.searchsorted(row, row)
    return row, col, rank


class _BlockBuffers:
    """Reusable [rows, N] buffers for the blocked pass (see units.py on allocator churn)."""

    def __init__(self, rows: int, n: int, feature_dtype: torch.dtype, device: torch.device) -> None:
        self.geometry = tuple(torch.empty(rows, n, dtype=torch.float64, device=device) for _ in range(3))
        self.cos = torch.empty(rows, n, dtype=feature_dtype, device=device)
        self.keyed_distance = self.geometry[2]  # the geometry scratch is free once tIoU/distance are out
        self.keyed_similarity = torch.empty(rows, n, dtype=feature_dtype, device=device)
        self.disjoint, self.mask, self.chosen = (torch.empty(rows, n, dtype=torch.bool, device=device)
                                                 for _ in range(3))

    def view(self, b: int) -> "_BlockBuffers":
        out = object.__new__(_BlockBuffers)
        for name, value in vars(self).items():
            setattr(out, name, tuple(t[:b] for t in value) if isinstance(value, tuple) else value[:b])
        return out


@dataclass
class _Block:
    """The pairwise relations of the units ``rows`` with all N units (views into reused buffers)."""

    rows: slice
    tiou: Tensor
    distance: Tensor
    cos: Tensor
    disjoint: Tensor
    buf: _BlockBuffers

    def _self_pairs(self, pairwise: Tensor) -> Tensor:
        """The (i, i) entries of a [rows, N] block, as a view (no index tensors: capture-safe)."""
        return pairwise.diagonal(offset=self.rows.start)

    def surrounding_keys(self, max_distance: float) -> Tensor:
        """Eq. 5 distance where j is disjoint from i with d < ``max_distance``, +inf elsewhere."""
        near = torch.lt(self.distance, max_distance, out=self.buf.mask).logical_and_(self.disjoint)
        keyed = self.buf.keyed_distance.copy_(self.distance)
        return keyed.masked_fill_(torch.logical_not(near, out=self.buf.chosen), float("inf"))

    def dissimilarity_keys(self) -> Tensor:
        """Negated cosine similarity, +inf for i itself (the caller may also mask more, in place)."""
        negated = torch.neg(self.cos, out=self.buf.keyed_similarity)
        self._self_pairs(negated).fill_(float("inf"))
        return negated

    def only_disjoint(self, keyed: Tensor) -> Tensor:
        """``keyed`` with +inf (in place) where j overlaps i."""
        return keyed.masked_fill_(torch.logical_not(self.disjoint, out=self.buf.chosen), float("inf"))

    def contextual(self, min_tiou: float) -> Tensor:
        """tIoU(i, j) > ``min_tiou``, j != i."""
        mask = torch.gt(self.tiou, min_tiou, out=self.buf.mask)
        self._self_pairs(mask).fill_(False)
        return mask


def _unit_features(features: Tensor, n: int) -> Tensor:
    x = torch.as_tensor(features)
    if not x.is_floating_point():
        x = x.float()
    if x.ndim != 2 or x.shape[0] != n:
        raise ValueError(f"features must have shape [N={n}, d], got {tuple(x.shape)}")
    return torch.nn.functional.normalize(x, dim=1)


def _blocks(intervals: Tensor, features: Tensor, max_block_elements: int, padding: Tensor | None = None,
            validate: bool = True) -> tuple[int, torch.dtype, Iterator[_Block]]:
    """N, the feature dtype and the row blocks of one video's pairwise relations, in order.

    ``padding``: [1, N] bool, True for units that are only padding: never anyone's neighbour.
    ``validate=False`` skips the interval checks (a host synchronisation on a GPU).
    """
    iv = as_intervals(intervals) if validate else intervals
    n = iv.shape[0]
    device = iv.device
    unit = _unit_features(features, n).to(device)
    unit_t = unit.T.contiguous()

    def walk() -> Iterator[_Block]:
        blocks = list(row_blocks(n, n, max_block_elements))
        full = _BlockBuffers(blocks[0].stop - blocks[0].start, n, unit.dtype, device) if blocks else None
        for rows in blocks:
            buf = full.view(rows.stop - rows.start)
            tiou, dist = pairwise_geometry(iv[rows], iv, out=buf.geometry)
            torch.mm(unit[rows], unit_t, out=buf.cos)
            torch.eq(tiou, 0, out=buf.disjoint)  # never i itself: a unit overlaps itself
            if padding is not None:  # no rule can pick a padding unit
                tiou.masked_fill_(padding, 0)
                buf.disjoint.logical_and_(~padding)
                buf.cos.masked_fill_(padding, -float("inf"))
            yield _Block(rows, tiou, dist, buf.cos, buf.disjoint, buf)

    return n, unit.dtype, walk()


def candidate_edges(
    intervals: Tensor,
    features: Tensor,
    caps: CandidateCaps = CandidateCaps(),
    max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> CandidateEdges:
    """All candidate edges of one video within ``caps``, computed in bounded-memory row blocks.

    ``intervals``: [N, 2] (start, end), any unit of time; ``features``: [N, d], the features whose
    cosine similarity gives the semantic neighbours and the edge weights (Eq. 8).
    """
    n, feature_dtype, blocks = _blocks(intervals, features, max_block_elements)
    names = ("src", "dst", "tiou", "distance", "cosine", "sur_rank", "sem_rank", "knn_rank")
    parts: dict[str, list[Tensor]] = {k: [] for k in names}
    for block in blocks:
        chosen = block.buf.chosen
        ranked = {"sur_rank": _rank_smallest(block.surrounding_keys(caps.sur_max_dist), caps.sur_k, chosen)}
        negated = block.dissimilarity_keys()
        ranked["knn_rank"] = _rank_smallest(negated, caps.knn_k, chosen)
        ranked["sem_rank"] = _rank_smallest(block.only_disjoint(negated), caps.sem_k, chosen)

        keep = block.contextual(caps.min_ctx_tiou)
        for r, c, _ in ranked.values():
            keep[r, c] = True
        row, col = keep.nonzero(as_tuple=True)
        key = row * n + col
        parts["src"].append(row + block.rows.start)
        parts["dst"].append(col)
        parts["tiou"].append(block.tiou[row, col])
        parts["distance"].append(block.distance[row, col])
        parts["cosine"].append(block.cos[row, col])
        for name, (r, c, rank) in ranked.items():
            column = torch.full((row.numel(),), -1, dtype=torch.int32, device=row.device)
            column[torch.searchsorted(key, r * n + c)] = rank.to(torch.int32)
            parts[name].append(column)
    if n == 0:
        dtypes = dict(src=torch.long, dst=torch.long, tiou=torch.float64, distance=torch.float64,
                      cosine=feature_dtype, sur_rank=torch.int32, sem_rank=torch.int32, knn_rank=torch.int32)
        return CandidateEdges.from_columns(0, caps, {k: torch.empty(0, dtype=t) for k, t in dtypes.items()})
    return CandidateEdges.from_columns(n, caps, {k: torch.cat(v) for k, v in parts.items()})


def select_edges(candidates: CandidateEdges, spec: GraphSpec) -> Graph:
    """The graph of ``spec``, chosen from precomputed candidates by masks alone."""
    candidates.caps.check_covers(spec)
    c = candidates
    edge_type = torch.zeros(c.num_edges, dtype=torch.uint8, device=c.edge_index.device)
    rules: dict[str, Tensor] = {}
    if "contextual" in spec.edge_types:
        rules["contextual"] = c.tiou > spec.theta_ctx
    if "surrounding" in spec.edge_types:
        near = (c.sur_rank >= 0) & (c.distance < spec.theta_sur)
        rules["surrounding"] = near if spec.k_sur is None else near & (c.sur_rank < spec.k_sur)
    if "semantic" in spec.edge_types:
        if spec.semantic_rule == "knn-then-disjoint":
            rules["semantic"] = (c.knn_rank >= 0) & (c.knn_rank < spec.l_sem) & (c.tiou == 0)
        else:
            rules["semantic"] = (c.sem_rank >= 0) & (c.sem_rank < spec.l_sem)
    for name, mask in rules.items():
        edge_type |= mask.to(torch.uint8) * EDGE_BIT[name]
    keep = (edge_type != 0).nonzero().squeeze(1)
    return Graph(
        num_nodes=c.num_nodes,
        edge_index=c.edge_index[:, keep],
        edge_type=edge_type[keep],
        weight=c.cosine[keep].clamp(min=0).float(),
    )


def _edge_types(block: _Block, spec: GraphSpec) -> Tensor:
    """[rows, N] uint8: the EDGE_BIT mask of every pair of the block under ``spec`` (0: no edge)."""
    types = torch.zeros_like(block.disjoint, dtype=torch.uint8)
    if "contextual" in spec.edge_types:
        types.add_(block.contextual(spec.theta_ctx), alpha=EDGE_BIT["contextual"])
    if "surrounding" in spec.edge_types:
        near = _smallest_mask(block.surrounding_keys(spec.theta_sur), spec.k_sur, block.buf.chosen)
        types.add_(near, alpha=EDGE_BIT["surrounding"])
    if "semantic" in spec.edge_types:
        negated = block.dissimilarity_keys()
        if spec.semantic_rule == "knn-then-disjoint":
            similar = _smallest_mask(negated, spec.l_sem, block.buf.mask).logical_and_(block.disjoint)
        else:
            similar = _smallest_mask(block.only_disjoint(negated), spec.l_sem, block.buf.mask)
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
    n, _, blocks = _blocks(intervals, features, max_block_elements)
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

    @property
    def ptr(self) -> Tensor:
        return torch.tensor([0, self.num_nodes], device=self.adjacency.device)

    def mean_operator(self, weight: Tensor) -> Tensor:
        """[N, N] M with ``(M h)[i]`` the ``weight``-weighted mean over i's neighbours (0 without any)."""
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
    _, _, blocks = _blocks(iv, features, max(1, n * n), padding, validate=False)
    block = next(blocks, None)
    if block is None:  # no units
        return DenseGraph(torch.zeros(0, 0, dtype=torch.bool, device=iv.device), torch.zeros(0, 0, device=iv.device))
    adjacency = _edge_types(block, spec) != 0
    return DenseGraph(adjacency, block.cos.clamp(min=0).masked_fill_(~adjacency, 0).float())
