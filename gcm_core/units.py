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


def _span(a: Tensor, b: Tensor) -> Tensor:
    return torch.maximum(a[:, None, 1], b[None, :, 1]) - torch.minimum(a[:, None, 0], b[None, :, 0])


def _tiou(a: Tensor, b: Tensor, span: Tensor) -> Tensor:
    inter = torch.minimum(a[:, None, 1], b[None, :, 1]) - torch.maximum(a[:, None, 0], b[None, :, 0])
    return inter.clamp_(min=0).div_(span)


def _distance(a: Tensor, b: Tensor, span: Tensor) -> Tensor:
    gap = ((a[:, None, 0] + a[:, None, 1]) - (b[None, :, 0] + b[None, :, 1])).abs_()
    return gap.div_(span).div_(2)


def pairwise_tiou(a: Tensor, b: Tensor) -> Tensor:
    """tIoU (Eq. 4) of every unit of ``a`` [N, 2] with every unit of ``b`` [M, 2]: ``[N, M]``."""
    return _tiou(a, b, _span(a, b))


def pairwise_distance(a: Tensor, b: Tensor) -> Tensor:
    """Distance of Eq. 5, ``|c_i - c_j| / U``, for every pair of ``a`` [N, 2] x ``b`` [M, 2]."""
    return _distance(a, b, _span(a, b))


def pairwise_geometry(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """tIoU and Eq. 5 distance of every pair, sharing one span computation: two ``[N, M]``."""
    span = _span(a, b)
    return _tiou(a, b, span), _distance(a, b, span)


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
