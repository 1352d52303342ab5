"""From unit outputs to a video's detections: scores, regression, stream fusion, external video
labels, and duplicate removal by per-class 1-D NMS or Soft-NMS.

Both treat each class independently in one greedy pass over all classes: NMS compares a kept
detection with its own class's candidates only; Soft-NMS shifts each class's segments along the
time axis by a multiple of the video's span, so that segments of different classes never
overlap. Scores are visited in descending order, ties in input order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from gcm_core.checks import check_ranges
from gcm_core.data.sampling import apply_regression
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
    class whose tIoU with it exceeds ``iou_threshold``; at most ``top_k`` are kept.

    A kept detection is compared with the later detections of its own class only, in NumPy: a
    video's ~2,000 candidates over 20 classes make each comparison ~100 pairs, where per-call
    overheads, not arithmetic, cost the time.
    """
    order = torch.argsort(-scores, stable=True).cpu()
    iv = segments.detach().to(device="cpu", dtype=torch.float64)[order].numpy()
    start, end = iv.min(axis=1), iv.max(axis=1)
    label = np.zeros(len(iv), np.int64) if labels is None else labels.cpu()[order].numpy()
    by_class = np.argsort(label, kind="stable")        # each class's positions, in visiting order
    bounds = np.searchsorted(label[by_class], label, side="left"), np.searchsorted(label[by_class], label,
                                                                                  side="right")
    alive = np.ones(len(iv), dtype=bool)
    keep: list[int] = []
    limit = len(iv) if top_k is None else top_k
    position = 0
    while len(keep) < limit and position < len(iv):
        position += int(alive[position:].argmax())
        if not alive[position]:
            break
        keep.append(position)
        group = by_class[bounds[0][position]:bounds[1][position]]
        later = group[np.searchsorted(group, position, side="right"):]
        inter = np.minimum(end[later], end[position]) - np.maximum(start[later], start[position])
        overlap = inter.clip(min=0) / (np.maximum(end[later], end[position]) - np.minimum(start[later], start[position]))
        alive[later[~(overlap <= iou_threshold)]] = False   # as tiou(...) <= threshold keeps: NaN suppresses
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


@dataclass(frozen=True)
class InferenceConfig:
    """From unit outputs to detections (the authors' test settings where the paper is silent)."""

    candidates_per_video: int = 2000    # best (unit, class) pairs kept before NMS
    nms: Literal["nms", "soft-nms"] = "nms"
    nms_threshold: float = 0.35
    soft_nms_sigma: float = 0.5
    top_k: int = 200                    # detections per video
    fusion: tuple[tuple[str, float], ...] = (("rgb", 2.0), ("flow", 3.0))

    def __post_init__(self) -> None:
        check_ranges(self, candidates_per_video=">= 1", nms_threshold="in [0, 1]", soft_nms_sigma="> 0", top_k=">= 1")
        if any(weight < 0 for _, weight in self.fusion):
            raise ValueError(f"fusion weights must be >= 0, got {self.fusion!r}")


@dataclass
class UnitScores:
    """One video's per-unit, per-class detection scores [N, K] and refined extents [N, K, 2]."""

    scores: Tensor
    segments: Tensor


def unit_scores(intervals: Tensor, logits: Tensor, completeness: Tensor | None, offsets: Tensor) -> UnitScores:
    """Score = P(class) x exp(completeness) (the authors' test rule), extents = regressed units.

    ``offsets`` are denormalised Eq. 15 offsets [N, K, 2]; heads without completeness use P alone.
    """
    prob = torch.softmax(logits.to(torch.float64), dim=1)[:, 1:]
    score = prob if completeness is None else prob * torch.exp(completeness.to(torch.float64))
    return UnitScores(score, apply_regression(intervals.to(torch.float64)[:, None, :], offsets.to(torch.float64)))


def fuse_streams(per_stream: dict[str, UnitScores], weights: dict[str, float]) -> UnitScores:
    """Late fusion of streams over the same units: weighted mean of scores and of extents."""
    total = sum(weights.get(s, 1.0) for s in per_stream)
    scores = sum(weights.get(s, 1.0) * u.scores for s, u in per_stream.items()) / total
    segments = sum(weights.get(s, 1.0) * u.segments for s, u in per_stream.items()) / total
    return UnitScores(scores, segments)


def detect(units: UnitScores, duration: float, config: InferenceConfig = InferenceConfig()) -> tuple[Tensor, Tensor, Tensor]:
    """Detections of one video: (segments [D, 2], labels [D] 0-based, scores [D]), best first."""
    n, k = units.scores.shape
    flat = units.scores.reshape(-1)
    keep = torch.argsort(-flat, stable=True)[:config.candidates_per_video]
    unit, label = keep // k, keep % k
    segments = units.segments[unit, label].clamp(0, duration)
    valid = segments[:, 1] > segments[:, 0]
    segments, label, scores = segments[valid], label[valid], flat[keep][valid]
    if config.nms == "nms":
        chosen = nms(segments, scores, label, config.nms_threshold, config.top_k)
        return segments[chosen], label[chosen], scores[chosen]
    chosen, decayed = soft_nms(segments, scores, label, "gaussian", config.soft_nms_sigma, top_k=config.top_k)
    return segments[chosen], label[chosen], decayed.to(scores.dtype)


def apply_video_labels(labels: Tensor, scores: Tensor, video_scores: Tensor, top: int = 2) -> tuple[Tensor, Tensor]:
    """External video-level classification (UntrimmedNet-style): keep the detections of the video's
    ``top`` classes and multiply their scores by the video's score of that class.

    Returns (kept indices, new scores).
    """
    best = torch.topk(video_scores, min(top, video_scores.numel())).indices
    kept = torch.isin(labels, best).nonzero().squeeze(1)
    return kept, scores[kept] * video_scores.to(scores.dtype)[labels[kept]]


def rescore_with_video_labels(detections: "Detections", video_scores: dict[str, "np.ndarray"],
                              classes: list[str] | tuple[str, ...], top: int = 2) -> "Detections":
    """:func:`apply_video_labels` on every video of ``detections`` (videos without scores are dropped)."""
    import numpy as np

    from gcm_core.data.model import Detections

    index = {c: k for k, c in enumerate(classes)}
    by_video: dict[str, list[int]] = {}
    for k, v in enumerate(detections.video):
        if v in video_scores and detections.label[k] in index:
            by_video.setdefault(v, []).append(k)
    keep, scores = [], []
    for video, rows in by_video.items():
        labels = torch.tensor([index[detections.label[k]] for k in rows])
        kept, new = apply_video_labels(labels, torch.tensor(detections.score[rows]), torch.as_tensor(video_scores[video]), top)
        keep += [rows[k] for k in kept.tolist()]
        scores += new.tolist()
    keep_arr = np.array(keep, dtype=np.int64)
    return Detections([detections.video[k] for k in keep], [detections.label[k] for k in keep],
                      detections.start[keep_arr], detections.end[keep_arr], np.array(scores))
