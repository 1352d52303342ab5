"""From unit outputs to a video's detections: scores, regression, stream fusion, external video
labels, and duplicate removal by per-class 1-D NMS or Soft-NMS.

Both treat each class independently in one greedy pass over all classes, comparing a pick with
its own class's candidates only. Scores are visited in descending order, ties in input order.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from gcm_core.checks import check_ranges
from gcm_core.data.model import Detections, video_key
from gcm_core.data.sampling import apply_regression


class _Candidates:
    """A video's candidate segments in NumPy with, for each, the positions of its class, so that
    a greedy pass compares a pick with its own class only: a video's ~2,000 candidates over 20
    classes make that ~100 pairs per pick, where per-call overheads, not arithmetic, cost the time."""

    def __init__(self, segments: Tensor, labels: Tensor | None) -> None:
        iv = segments.detach().to(device="cpu", dtype=torch.float64).numpy()
        self.start, self.end = iv.min(axis=1), iv.max(axis=1)
        label = np.zeros(len(iv), np.int64) if labels is None else labels.cpu().numpy()
        self._by_class = np.argsort(label, kind="stable")   # each class's positions, ascending
        sorted_labels = label[self._by_class]
        self._first = np.searchsorted(sorted_labels, label, side="left")
        self._last = np.searchsorted(sorted_labels, label, side="right")

    def __len__(self) -> int:
        return len(self.start)

    def of_class(self, i: int) -> np.ndarray:
        """The positions of candidate ``i``'s class, itself included, ascending."""
        return self._by_class[self._first[i]:self._last[i]]

    def tiou(self, i: int, others: np.ndarray) -> np.ndarray:
        """tIoU (Eq. 4) of candidate ``i`` with each of ``others``."""
        start, end = self.start[others], self.end[others]
        inter = np.minimum(end, self.end[i]) - np.maximum(start, self.start[i])
        return inter.clip(min=0) / (np.maximum(end, self.end[i]) - np.minimum(start, self.start[i]))


def nms(segments: Tensor, scores: Tensor, labels: Tensor | None = None, iou_threshold: float = 0.4,
        top_k: int | None = None) -> Tensor:
    """Indices of the kept detections, by descending score: each suppresses the later ones of its
    class whose tIoU with it exceeds ``iou_threshold``; at most ``top_k`` are kept."""
    order = torch.argsort(-scores, stable=True).cpu()
    candidates = _Candidates(segments.cpu()[order], None if labels is None else labels.cpu()[order])
    alive = np.ones(len(candidates), dtype=bool)
    keep: list[int] = []
    limit = len(candidates) if top_k is None else top_k
    position = 0
    while len(keep) < limit and position < len(candidates):
        position += int(alive[position:].argmax())
        if not alive[position]:
            break
        keep.append(position)
        group = candidates.of_class(position)
        later = group[np.searchsorted(group, position, side="right"):]
        # NaN (a zero-length segment against itself) suppresses, as "keep where tIoU <= threshold" says
        alive[later[~(candidates.tiou(position, later) <= iou_threshold)]] = False
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
    candidates = _Candidates(segments, labels)
    current = scores.detach().to(device="cpu", dtype=torch.float64).numpy().copy()
    open_scores = current.copy()   # the current scores of the candidates not yet picked, -inf once picked
    picked, picked_scores = [], []
    limit = len(candidates) if top_k is None else min(top_k, len(candidates))
    while len(picked) < limit:
        best = int(open_scores.argmax())
        if open_scores[best] < min_score:
            break
        picked.append(best)
        picked_scores.append(float(current[best]))
        open_scores[best] = -np.inf
        group = candidates.of_class(best)
        group = group[open_scores[group] != -np.inf]
        overlap = candidates.tiou(best, group)
        if method == "linear":
            decay = np.where(overlap > iou_threshold, 1.0 - overlap, 1.0)
        else:
            decay = np.exp(-np.square(overlap) / sigma)
        current[group] *= decay
        open_scores[group] = current[group]
    return torch.tensor(picked, dtype=torch.long), torch.tensor(picked_scores, dtype=scores.dtype)


@dataclass(frozen=True)
class InferenceConfig:
    """From unit outputs to detections (the authors' test settings where the paper is silent).

    ``fusion`` None leaves the streams' weights to be chosen from the dataset (a training run
    takes its dataset card's ``stream_fusion``); decoding needs them chosen (:meth:`weights`).
    ``proposal_score`` multiplies a two-stage head's unit scores by their proposals' own scores,
    the s_bsn / s_bmn factor of the paper's ActivityNet rows with external video labels (Table 2,
    s = s_gcm x s_bsn x s_unet; the video labels are :class:`VideoLabels`); off by default, as in
    its other results. A proposal list without scores scores every proposal 1.
    """

    candidates_per_video: int = 2000    # a video's best (unit or anchor, class) pairs kept before NMS
    nms: Literal["nms", "soft-nms"] = "nms"
    nms_threshold: float = 0.35
    soft_nms_sigma: float = 0.5
    top_k: int = 200                    # detections per video
    fusion: tuple[tuple[str, float], ...] | None = (("rgb", 2.0), ("flow", 3.0))
    proposal_score: bool = False

    def __post_init__(self) -> None:
        check_ranges(self, candidates_per_video=">= 1", nms_threshold="in [0, 1]", soft_nms_sigma="> 0", top_k=">= 1")
        if any(weight < 0 for _, weight in self.fusion or ()):
            raise ValueError(f"fusion weights must be >= 0, got {self.fusion!r}")

    def weights(self) -> dict[str, float]:
        """The late-fusion weight of each stream named (:func:`stream_weights` weighs others 1)."""
        if self.fusion is None:
            raise ValueError("inference.fusion is not chosen: give the streams' weights (e.g. {rgb: 2, flow: 3}), "
                             "or let a training run take its dataset card's stream_fusion")
        return dict(self.fusion)


@dataclass
class UnitScores:
    """One video's per-unit, per-class detection scores [N, K] and refined extents [N, K, 2];
    ``classes`` [K] names the class (0-based) of each column where they are not all of the
    dataset's in order (:meth:`VideoLabels.restrict`)."""

    scores: Tensor
    segments: Tensor
    classes: Tensor | None = None


def unit_scores(intervals: Tensor, logits: Tensor, completeness: Tensor | None, offsets: Tensor) -> UnitScores:
    """Score = P(class) x exp(completeness) (the authors' test rule), extents = regressed units.

    ``offsets`` are denormalised Eq. 15 offsets [N, K, 2]; heads without completeness use P alone.
    """
    prob = torch.softmax(logits.to(torch.float64), dim=1)[:, 1:]
    score = prob if completeness is None else prob * torch.exp(completeness.to(torch.float64))
    return UnitScores(score, apply_regression(intervals.to(torch.float64)[:, None, :], offsets.to(torch.float64)))


def stream_weights(streams: Iterable[str], weights: dict[str, float] | None) -> dict[str, float]:
    """Each stream's late-fusion weight (a stream ``weights`` does not name weighs 1); weights
    summing to 0 over the streams fused are an error rather than NaN scores."""
    named = {s: (weights or {}).get(s, 1.0) for s in streams}
    if sum(named.values()) <= 0:
        raise ValueError(f"inference.fusion weighs the streams {list(named)} 0 in all ({weights}): nothing to fuse")
    return named


def with_proposal_scores(units: UnitScores, proposal_scores: Tensor) -> UnitScores:
    """Every unit's class scores times its proposal's score [N]."""
    return UnitScores(units.scores * proposal_scores.to(units.scores.dtype)[:, None], units.segments, units.classes)


def with_video_labels(units: UnitScores, labels: VideoLabels, video_id: str) -> UnitScores:
    """A video's units scored for its external top classes only (:meth:`VideoLabels.restrict`)."""
    scores, classes = labels.restrict(video_id, units.scores)
    return UnitScores(scores, units.segments[:, classes], classes)


def fuse_streams(per_stream: dict[str, UnitScores], weights: dict[str, float]) -> UnitScores:
    """Late fusion of streams over the same units: weighted mean of scores and of extents."""
    w = stream_weights(per_stream, weights)
    total = sum(w.values())
    scores = sum(w[s] * u.scores for s, u in per_stream.items()) / total
    segments = sum(w[s] * u.segments for s, u in per_stream.items()) / total
    return UnitScores(scores, segments)


def detect(units: UnitScores, duration: float, config: InferenceConfig = InferenceConfig()) -> tuple[Tensor, Tensor, Tensor]:
    """Detections of one video: (segments [D, 2], labels [D] 0-based, scores [D]), best first.

    Duplicates are removed among the regressed extents, those the detections report, as
    ActionFormer-style decoders do; the paper does not say, and the authors' code suppresses on
    the proposals' own extents and regresses the survivors after, which can keep two proposals
    that regress onto one action.
    """
    n, k = units.scores.shape
    flat = units.scores.reshape(-1)
    keep = torch.argsort(-flat, stable=True)[:config.candidates_per_video]
    unit, column = keep // k, keep % k
    segments = units.segments[unit, column].clamp(0, duration)
    label = column if units.classes is None else units.classes.to(column.device)[column]
    valid = segments[:, 1] > segments[:, 0]
    segments, label, scores = segments[valid], label[valid], flat[keep][valid]
    chosen, kept_scores = suppress(segments, scores, label, config)
    return segments[chosen], label[chosen], kept_scores


def suppress(segments: Tensor, scores: Tensor, labels: Tensor, config: InferenceConfig) -> tuple[Tensor, Tensor]:
    """A video's duplicates removed as ``config`` says (per-class NMS or Gaussian Soft-NMS, at most
    ``top_k`` kept): the indices kept, best first, and their scores (decayed by Soft-NMS)."""
    if config.nms == "nms":
        chosen = nms(segments, scores, labels, config.nms_threshold, config.top_k)
        return chosen, scores[chosen]
    chosen, decayed = soft_nms(segments, scores, labels, "gaussian", config.soft_nms_sigma, top_k=config.top_k)
    return chosen, decayed.to(scores.dtype)


def top_video_classes(video_scores: Tensor, top: int = 2) -> tuple[Tensor, Tensor]:
    """A video's ``top`` best-scored classes (0-based, best first) and their scores."""
    best = torch.topk(video_scores, min(top, video_scores.numel()))
    return best.indices, best.values


@dataclass(frozen=True)
class VideoLabels:
    """External video-level class scores (UntrimmedNet's in the paper) in place of a detector's own
    choice of class: the paper's rows "with video labels" (Table 2) give every proposal of a video
    the video's ``top`` 2 classes, scored s_gcm x s_unet (x s_bsn with ``proposal_score``).

    :meth:`restrict` applies them to a video's unit or anchor scores before decoding, so that
    duplicate removal and the ``top_k`` cut see only those classes, as when the classifier's
    classes are replaced; :func:`rescore_with_video_labels` applies them to detections already
    decoded (another method's result file), where the ``top_k`` cut has spent places on other
    classes. s_gcm is read as the unit's score of that class (class probability x completeness),
    where the paper says only "the proposal score predicted by our model".

    ``scores`` are keyed by :func:`~gcm_core.data.model.video_key`, [K] in the dataset's class order.
    """

    scores: Mapping[str, np.ndarray]
    top: int = 2

    def __post_init__(self) -> None:
        check_ranges(self, top=">= 1")

    def check_covers(self, video_ids: Sequence[str], source: str, which: str) -> None:
        """Refuse scores (from ``source``) that lack one of ``video_ids`` (``which`` videos), naming
        how many and the first, before any is decoded."""
        lacking = [v for v in video_ids if video_key(v) not in self.scores]
        if lacking:
            raise ValueError(f"{source} has no class scores of {len(lacking)} of the {len(video_ids)} {which}, e.g. "
                             f"{lacking[0]}: video labels need every video's")

    def of(self, video_id: str) -> tuple[Tensor, Tensor]:
        """The video's :func:`top_video_classes`; a video the scores lack is an error naming it."""
        row = self.scores.get(video_key(video_id))
        if row is None:
            raise ValueError(f"video {video_id} has no external video-level class scores (they cover "
                             f"{len(self.scores)} other videos)")
        return top_video_classes(torch.as_tensor(row, dtype=torch.float64), self.top)

    def restrict(self, video_id: str, scores: Tensor) -> tuple[Tensor, Tensor]:
        """A video's per-class scores [N, K] as the scores of its top classes only, each times the
        video's score of it: ([N, top] scores, the [top] classes of the columns)."""
        classes, factors = self.of(video_id)
        classes = classes.to(scores.device)
        return scores[:, classes] * factors.to(scores), classes


def apply_video_labels(labels: Tensor, scores: Tensor, video_scores: Tensor, top: int = 2) -> tuple[Tensor, Tensor]:
    """External video-level classification of a video's decoded detections: keep those of the
    video's ``top`` classes and multiply their scores by the video's score of that class.

    Returns (kept indices, new scores).
    """
    best, _ = top_video_classes(video_scores, top)
    kept = torch.isin(labels, best).nonzero().squeeze(1)
    return kept, scores[kept] * video_scores.to(scores.dtype)[labels[kept]]


def rescore_with_video_labels(detections: Detections, video_scores: Mapping[str, np.ndarray],
                              classes: list[str] | tuple[str, ...], top: int = 2) -> Detections:
    """:func:`apply_video_labels` on every video of ``detections`` (videos without scores are
    dropped); ``video_scores`` are keyed by :func:`~gcm_core.data.model.video_key`. Decoding
    with :class:`VideoLabels` is the paper's way for a detector of ours."""
    index = {c: k for k, c in enumerate(classes)}
    by_video: dict[str, list[int]] = {}
    for k, key in enumerate(map(video_key, detections.video)):
        if key in video_scores and detections.label[k] in index:
            by_video.setdefault(key, []).append(k)
    keep, scores = [], []
    for video, rows in by_video.items():
        labels = torch.tensor([index[detections.label[k]] for k in rows])
        kept, new = apply_video_labels(labels, torch.tensor(detections.score[rows]), torch.as_tensor(video_scores[video]), top)
        keep += [rows[k] for k in kept.tolist()]
        scores += new.tolist()
    keep_arr = np.array(keep, dtype=np.int64)
    return Detections([detections.video[k] for k in keep], [detections.label[k] for k in keep],
                      detections.start[keep_arr], detections.end[keep_arr], np.array(scores))
