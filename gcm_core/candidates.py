"""Candidate edges: every edge a grid of graph settings may need, computed once per video.

Preprocessing computes :func:`candidate_edges` once per video under loose :class:`CandidateCaps`
and stores them with their attributes (tIoU, distance, cosine, per-rule ranks); a grid over
theta_ctx / theta_sur / k_sur / l_sem / edge types then calls :func:`select_edges`, a few masks
over the candidates, instead of rebuilding graphs. ``select_edges(candidate_edges(...,
CandidateCaps.for_spec(spec)), spec)`` is the graph :func:`gcm_core.graph.build_graph` gives.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from gcm_core.checks import check_ranges
from gcm_core.graph import EDGE_BIT, Graph, GraphSpec
from gcm_core.pairwise import pair_blocks, rank_smallest
from gcm_core.units import DEFAULT_BLOCK_ELEMENTS


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

    def __post_init__(self) -> None:
        check_ranges(self, min_ctx_tiou="in [0, 1]", sur_k=">= 0", sur_max_dist=">= 0", sem_k=">= 0", knn_k=">= 0")

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

    def uncovered(self, spec: GraphSpec) -> dict[str, str]:
        """The caps that keep candidates ``spec`` needs out, each with why (empty: it can be selected)."""
        problems = {}
        if "contextual" in spec.edge_types and spec.theta_ctx < self.min_ctx_tiou:
            problems["min_ctx_tiou"] = f"theta_ctx={spec.theta_ctx} < min_ctx_tiou={self.min_ctx_tiou}"
        if "surrounding" in spec.edge_types:
            if spec.theta_sur > self.sur_max_dist:
                problems["sur_max_dist"] = f"theta_sur={spec.theta_sur} > sur_max_dist={self.sur_max_dist}"
            if self.sur_k is not None and (spec.k_sur is None or spec.k_sur > self.sur_k):
                problems["sur_k"] = f"k_sur={spec.k_sur} exceeds sur_k={self.sur_k}"
        if "semantic" in spec.edge_types:
            cap_name = "knn_k" if spec.semantic_rule == "knn-then-disjoint" else "sem_k"
            if spec.l_sem > getattr(self, cap_name):
                problems[cap_name] = f"l_sem={spec.l_sem} exceeds {cap_name}={getattr(self, cap_name)}"
        return problems

    def check_covers(self, spec: GraphSpec) -> None:
        """Raise ValueError if ``spec`` needs candidates these caps did not keep."""
        problems = self.uncovered(spec)
        if problems:
            raise ValueError("graph settings outside the candidate caps: " + "; ".join(problems.values())
                             + " (recompute candidates with looser CandidateCaps)")


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
    n, feature_dtype, blocks = pair_blocks(intervals, features, max_block_elements)
    names = ("src", "dst", "tiou", "distance", "cosine", "sur_rank", "sem_rank", "knn_rank")
    parts: dict[str, list[Tensor]] = {k: [] for k in names}
    for block in blocks:
        chosen = block.buf.chosen
        ranked = {"sur_rank": rank_smallest(block.surrounding_keys(caps.sur_max_dist), caps.sur_k, chosen)}
        negated = block.dissimilarity_keys()
        ranked["knn_rank"] = rank_smallest(negated, caps.knn_k, chosen)
        ranked["sem_rank"] = rank_smallest(block.only_disjoint(negated), caps.sem_k, chosen)

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
