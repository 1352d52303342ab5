"""Pairwise relations of a video's units in bounded-memory row blocks, for the graph rules.

Every rule of :mod:`gcm_core.graph` reads the same [rows, N] quantities of a block of units i
against all units j: tIoU, Eq. 5 distance, cosine similarity of the features, disjointness.
:func:`pair_blocks` computes them block by block into reused buffers; :func:`smallest_mask`
picks the k nearest or most similar per row with the lower-index tie rule (:func:`rank_smallest`:
the same choice, ranked).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from gcm_core.units import as_intervals, pairwise_geometry, row_blocks


def smallest_mask(keyed: Tensor, k: int | None, chosen: Tensor) -> Tensor:
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


def rank_smallest(keyed: Tensor, k: int | None, chosen: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row, col, rank) of the entries :func:`smallest_mask` would choose, rank 0 the smallest of
    its row, ranks in (value, column) order; ``chosen`` is a bool buffer of ``keyed``'s shape.

    For the several neighbours per rule that preprocessing keeps, k argmin passes cost more than
    a bound: the k-th smallest of a row's chunk minima is at or above its k-th smallest entry (k
    chunk minima are k of its entries), so the entries at or below it, typically little more than k,
    hold the answer and are the only ones sorted (1.3 k per row on the medium synthetic benchmark;
    past 4 k, as when many units have equal features, the k argmin passes run instead). Three
    passes over the block instead of k + 2 (the medium benchmark's preparation: 26% less time).
    """
    n = keyed.shape[1]
    if k is None or k >= n:
        torch.lt(keyed, float("inf"), out=chosen)
    elif k == 0:
        chosen.zero_()
    else:
        chunk = 8 if n >= 8 * k else max(1, n // k)
        full = n // chunk * chunk
        minima = keyed[:, :full].unflatten(1, (-1, chunk)).amin(dim=2)
        if full < n:
            minima = torch.cat([minima, keyed[:, full:].amin(dim=1, keepdim=True)], dim=1)
        bound = minima.kthvalue(k, dim=1, keepdim=True).values.clamp_(max=torch.finfo(keyed.dtype).max)
        torch.le(keyed, bound, out=chosen)  # a row with fewer than k finite entries keeps them all
        if int(chosen.sum()) > 4 * k * keyed.shape[0]:  # many ties at the bounds (equal features): k passes
            smallest_mask(keyed, k, chosen)
    row, col = chosen.nonzero(as_tuple=True)  # row-major: col ascending within a row
    order = torch.argsort(keyed[row, col], stable=True)
    order = order[torch.argsort(row[order], stable=True)]  # by (row, value, col)
    row, col = row[order], col[order]
    rank = torch.arange(row.numel(), device=row.device) - torch.searchsorted(row, row)
    if k is not None:
        keep = rank < k
        row, col, rank = row[keep], col[keep], rank[keep]
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
class PairBlock:
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


def pair_blocks(intervals: Tensor, features: Tensor, max_block_elements: int, padding: Tensor | None = None,
                validate: bool = True) -> tuple[int, torch.dtype, Iterator[PairBlock]]:
    """N, the feature dtype and the row blocks of one video's pairwise relations, in order.

    ``padding``: [1, N] bool, True for units that are only padding: never anyone's neighbour.
    ``validate=False`` skips the interval checks (a host synchronisation on a GPU).
    """
    iv = as_intervals(intervals) if validate else intervals
    n = iv.shape[0]
    device = iv.device
    unit = _unit_features(features, n).to(device)
    unit_t = unit.T.contiguous()

    def walk() -> Iterator[PairBlock]:
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
            yield PairBlock(rows, tiou, dist, buf.cos, buf.disjoint, buf)

    return n, unit.dtype, walk()
