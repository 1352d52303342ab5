"""Duplicate removal for the detections of one video: per-class 1-D NMS and Soft-NMS.

Both run on all classes at once: each class's segments are shifted along the time axis by a
multiple of the video's span, so segments of different classes never overlap and one greedy
pass treats them independently. Scores are visited in descending order, ties in input order.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from gcm_core.units import tiou


def _class_shifted(segments: Tensor, labels: Tensor | None) -> Tensor:
    iv = torch.stack([segments.min(dim=1).values, segments.max(dim=1).values], dim=1).to(torch.float64)
    if labels is None or iv.numel() == 0:
        return iv
    span = float(iv[:, 1].max() - iv[:, 0].min()) + 1.0
    return iv + (labels.to(torch.float64) * span)[:, None]


def nms(segments: Tensor, scores: Tensor, labels: Tensor | None = None, iou_threshold: float = 0.4,
        top_k: int | None = None) -> Tensor:
    """Indices of the kept detections, by descending score: each suppresses the later ones of its
    class whose tIoU with it exceeds ``iou_threshold``; at most ``top_k`` are kept."""
    order = torch.argsort(-scores, stable=True)
    iv = _class_shifted(segments, labels)[order]
    alive = torch.ones(order.numel(), dtype=torch.bool)
    keep: list[int] = []
    limit = order.numel() if top_k is None else top_k
    position = 0
    while len(keep) < limit:
        rest = alive[position:]
        if not bool(rest.any()):
            break
        position += int(rest.to(torch.uint8).argmax())
        keep.append(position)
        alive[position] = False
        alive &= tiou(iv[position], iv) <= iou_threshold
        position += 1
    return order[torch.tensor(keep, dtype=torch.long)]


def soft_nms(segments: Tensor, scores: Tensor, labels: Tensor | None = None,
             method: Literal["linear", "gaussian"] = "gaussian", sigma: float = 0.5, iou_threshold: float = 0.3,
             min_score: float = 1e-3, top_k: int | None = None) -> tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al. 2017): (indices picked, their decayed scores), by pick order.

    Repeatedly picks the highest current score and decays the others of its class:
    ``linear``: ``s *= 1 - tIoU`` where tIoU > ``iou_threshold``; ``gaussian``:
    ``s *= exp(-tIoU^2 / sigma)``. Stops at ``top_k`` picks or when no score reaches ``min_score``.
    """
    if method not in ("linear", "gaussian"):
        raise ValueError(f"unknown Soft-NMS method {method!r}")
    iv = _class_shifted(segments, labels)
    current = scores.to(torch.float64).clone()
    remaining = torch.ones(current.numel(), dtype=torch.bool)
    picked, picked_scores = [], []
    limit = current.numel() if top_k is None else min(top_k, current.numel())
    while len(picked) < limit:
        masked = torch.where(remaining, current, -torch.inf)
        best = int(masked.argmax()) if masked.numel() else 0
        if not bool(remaining.any()) or float(masked[best]) < min_score:
            break
        picked.append(best)
        picked_scores.append(float(current[best]))
        remaining[best] = False
        overlap = tiou(iv[best], iv)
        if method == "linear":
            decay = torch.where(overlap > iou_threshold, 1.0 - overlap, 1.0)
        else:
            decay = torch.exp(-overlap.square() / sigma)
        current = torch.where(remaining, current * decay, current)
    return torch.tensor(picked, dtype=torch.long), torch.tensor(picked_scores, dtype=scores.dtype)
