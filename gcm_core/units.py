"""Interval geometry of action units: relevance (tIoU, Eq. 4) and distance (Eq. 5).

An action unit's temporal extent is a row ``(start, end)`` of a float tensor ``[N, 2]``.
Both measures divide by U(p_i, p_j), taken, as in the authors' code and the THUMOS'14
official evaluator, as the *span* from the earlier start to the later end. For overlapping
units the span is exactly the union, so tIoU is the usual one; for disjoint units the span
is what makes Eq. 5 a bounded, scale-free distance (it lies in [0.5, 1) for disjoint units).

Units that only touch (one's end equals the other's start) have zero intersection and are
disjoint. Pairwise matrices are O(N*M); callers that can meet large N walk them in row
blocks (:func:`row_blocks`) so that memory stays bounded.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

#: Default number of pairwise elements held at once by blocked computations (32 MiB of float64).
DEFAULT_BLOCK_ELEMENTS = 1 << 22


def as_intervals(intervals: Tensor | object, dtype: torch.dtype = torch.float64) -> Tensor:
    """Return ``intervals`` as a ``[N, 2]`` tensor of ``dtype``, checking shape and order.

    Raises ValueError naming the first unit whose end is not after its start or that is not
    finite: every measure of this module assumes a positive length.
    """
    t = torch.as_tensor(intervals, dtype=dtype)
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"intervals must have shape [N, 2] (start, end), got {tuple(t.shape)}")
    bad = ~torch.isfinite(t).all(dim=1) | (t[:, 1] <= t[:, 0])
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"unit {i} has interval ({float(t[i, 0])}, {float(t[i, 1])}): "
            "start and end must be finite with end > start"
        )
    return t


# The formulas below write into ``out`` / ``scratch`` buffers when given (blocked callers reuse
# them, so that walking a large N x N in blocks does not churn the allocator) and allocate otherwise.

def _span(a: Tensor, b: Tensor, out: Tensor | None = None, scratch: Tensor | None = None) -> Tensor:
    out = torch.maximum(a[..., 1], b[..., 1], out=out)
    return out.sub_(torch.minimum(a[..., 0], b[..., 0], out=scratch))


def _tiou(a: Tensor, b: Tensor, span: Tensor, out: Tensor | None = None, scratch: Tensor | None = None) -> Tensor:
    inter = torch.minimum(a[..., 1], b[..., 1], out=out)
    inter.sub_(torch.maximum(a[..., 0], b[..., 0], out=scratch))
    return inter.clamp_(min=0).div_(span)


def _distance(a: Tensor, b: Tensor, span: Tensor, out: Tensor | None = None) -> Tensor:
    gap = torch.sub(a[..., 0] + a[..., 1], b[..., 0] + b[..., 1], out=out).abs_()
    return gap.div_(span).div_(2)


def tiou(a: Tensor, b: Tensor) -> Tensor:
    """tIoU (Eq. 4) of intervals ``a`` [..., 2] and ``b`` [..., 2], broadcast against each other."""
    return _tiou(a, b, _span(a, b))


def distance(a: Tensor, b: Tensor) -> Tensor:
    """Distance of Eq. 5, ``|c_a - c_b| / U``, of ``a`` [..., 2] and ``b`` [..., 2], broadcast."""
    return _distance(a, b, _span(a, b))


def pairwise_tiou(a: Tensor, b: Tensor) -> Tensor:
    """tIoU of every unit of ``a`` [N, 2] with every unit of ``b`` [M, 2]: ``[N, M]``."""
    return tiou(a[:, None], b[None, :])


def pairwise_overlap(a: Tensor, b: Tensor) -> Tensor:
    """Share of each unit of ``a`` [N, 2] covered by each unit of ``b`` [M, 2] (|a n b| / |a|)."""
    a_, b_ = a[:, None], b[None, :]
    inter = torch.minimum(a_[..., 1], b_[..., 1]) - torch.maximum(a_[..., 0], b_[..., 0])
    return inter.clamp_(min=0) / (a[:, 1] - a[:, 0])[:, None]


def pairwise_geometry(a: Tensor, b: Tensor, out: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """tIoU and Eq. 5 distance of every pair of ``a`` [N, 2] x ``b`` [M, 2].

    ``out``: three [N, M] float buffers (tIoU, distance, scratch) to write into; the first two
    are returned.
    """
    if out is None:
        out = tuple(torch.empty(a.shape[0], b.shape[0], dtype=a.dtype, device=a.device) for _ in range(3))
    tiou_out, dist_out, span = out
    a, b = a[:, None], b[None, :]
    _span(a, b, out=span, scratch=tiou_out)
    return _tiou(a, b, span, out=tiou_out, scratch=dist_out), _distance(a, b, span, out=dist_out)


def row_blocks(n_rows: int, n_cols: int, max_elements: int = DEFAULT_BLOCK_ELEMENTS) -> Iterator[slice]:
    """Slices of rows such that a ``[rows, n_cols]`` block holds at most ``max_elements``."""
    step = max(1, max_elements // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def lengths(intervals: Tensor) -> Tensor:
    """Length of every unit."""
    return intervals[:, 1] - intervals[:, 0]


def centres(intervals: Tensor) -> Tensor:
    """Centre of every unit."""
    return (intervals[:, 0] + intervals[:, 1]) / 2
