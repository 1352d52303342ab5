"""Detection and proposal metrics, computed exactly as the official protocols do.

Two detection protocols are implemented, because the literature uses both and they give
different numbers on the same detections; every report names the one it used.

**ActivityNet** (the official ``eval_detection.py`` algorithm; also what ActionFormer and OpenTAD
report on THUMOS'14): per class, detections in descending score order; each takes the
ground truth of its video with the highest tIoU among those not yet taken, and is a true
positive if that tIoU >= the threshold; AP is the all-point interpolated area under the
precision/recall curve; mAP is the mean over the classes that have ground truth.

**THUMOS'14** (the challenge's ``TH14evalDet.m``, which the older literature, CBR and the seed
paper's Table 1 used): per class and video, detections sorted by score; each ground truth in
annotation order takes the still-free detection with the highest tIoU, a true positive if that
tIoU > the threshold; an unmatched detection that overlaps an ``Ambiguous`` segment of its video
is dropped (neither true nor false positive); reversed intervals are re-ordered; AP is the
non-interpolated mean of the precision at each true positive over all ground truths; mAP is the
mean over all classes of the dataset.

Both protocols re-order reversed intervals (start > end), as the THUMOS'14 code does; the
official ActivityNet code would give such a detection a negative length. A zero-length detection
never matches a zero-length ground truth (tIoU 0/0): the THUMOS'14 code's comparisons with NaN
reject it, the ActivityNet code's accept it (a true positive; real ActivityNet validation holds
three such instances, so an evaluated copy of its ground truth scores 0.07 mAP points lower here).

Ties: sorting is stable, so detections of equal score keep their input order, and a detection
equally close to two free ground truths (or a ground truth to two free detections) takes the one
listed first. The official codes leave these ties to their sort implementations.

Matching is greedy and so sequential, but only within one (class, video) group: the loops here
run over the rank inside a group and are vectorised over all groups and thresholds at once.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gcm_core.units import tiou

THUMOS14_TIOU = (0.1, 0.2, 0.3, 0.4, 0.5)
ACTIVITYNET_TIOU = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))


@dataclass
class Segments:
    """Labelled temporal segments of many videos as parallel 1-D tensors.

    ``video`` and ``label`` are integer indices (into a video list and a class list shared by the
    ground truth and the detections); ``score`` is None for ground truth.
    """

    video: Tensor
    label: Tensor
    start: Tensor
    end: Tensor
    score: Tensor | None = None

    def __post_init__(self) -> None:
        self.video = torch.as_tensor(self.video, dtype=torch.long)
        self.label = torch.as_tensor(self.label, dtype=torch.long)
        self.start = torch.as_tensor(self.start, dtype=torch.float64)
        self.end = torch.as_tensor(self.end, dtype=torch.float64)
        if self.score is not None:
            self.score = torch.as_tensor(self.score, dtype=torch.float64)
        n = self.video.numel()
        if any(t.numel() != n for t in (self.label, self.start, self.end)) or (
                self.score is not None and self.score.numel() != n):
            raise ValueError("Segments fields must all have the same length")

    def __len__(self) -> int:
        return self.video.numel()

    def take(self, index: Tensor) -> "Segments":
        return Segments(self.video[index], self.label[index], self.start[index], self.end[index],
                        None if self.score is None else self.score[index])

    def intervals(self) -> Tensor:
        """[N, 2] (min, max) of (start, end): reversed intervals are re-ordered, not dropped."""
        return torch.stack([torch.minimum(self.start, self.end), torch.maximum(self.start, self.end)], dim=1)


@dataclass
class MapResult:
    """AP per threshold and class (NaN for classes without ground truth), and their means."""

    protocol: str
    tiou: tuple[float, ...]
    ap: Tensor  # [T, C]

    @property
    def map(self) -> Tensor:
        """mAP per threshold, over the classes that count under the protocol."""
        return self.ap.nanmean(dim=1)

    @property
    def average(self) -> float:
        return float(self.map.mean())

    def as_dict(self, class_names: Sequence[str]) -> dict:
        """JSON-ready summary with mAP in percent."""
        return {
            "protocol": self.protocol,
            "tiou": list(self.tiou),
            "mAP": [round(100 * float(v), 4) for v in self.map],
            "average": round(100 * self.average, 4),
            "per_class": {name: [None if v != v else round(100 * float(v), 4) for v in self.ap[:, c]]
                          for c, name in enumerate(class_names)},
        }


def _size(*indices: Tensor) -> int:
    """One more than the largest index in any of ``indices`` (0 if all are empty)."""
    return max((int(t.max()) + 1 for t in indices if t.numel()), default=0)


def _groups(gt: Segments, det: Segments) -> tuple[Tensor, Tensor, int]:
    """A dense index of the (label, video) groups of ground truth and detections, and its size."""
    n_videos = _size(gt.video, det.video)
    codes = torch.cat([gt.label * n_videos + gt.video, det.label * n_videos + det.video])
    _, inverse = torch.unique(codes, return_inverse=True)
    g_gt, g_det = inverse.split([len(gt), len(det)])
    return g_gt, g_det, _size(inverse)


def _slots(group: Tensor, n_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Order by group (stable), each item's slot within its group, and group sizes."""
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(group)
    slot[order] = torch.arange(group.numel()) - starts[group[order]]
    return order, slot, counts


def _padded(intervals: Tensor, group: Tensor, slot: Tensor, n_groups: int, width: int) -> Tensor:
    out = torch.full((n_groups, max(width, 1), 2), float("nan"), dtype=torch.float64)
    out[group, slot] = intervals
    return out


def _by_score(det: Segments) -> Tensor:
    """Permutation sorting detections by class, then descending score, ties in input order."""
    order = torch.argsort(-det.score, stable=True)
    return order[torch.argsort(det.label[order], stable=True)]


def _segment_offsets(label: Tensor, num_classes: int) -> Tensor:
    counts = torch.bincount(label, minlength=num_classes)
    return torch.cumsum(counts, 0) - counts


def activitynet_ap(gt: Segments, det: Segments, thresholds: Sequence[float], num_classes: int) -> MapResult:
    """AP [T, C] under the official ActivityNet detection protocol (module docstring)."""
    thr = torch.tensor(list(thresholds), dtype=torch.float64)
    det = det.take(_by_score(det))
    g_gt, g_det, n_groups = _groups(gt, det)
    _, gt_slot, gt_counts = _slots(g_gt, n_groups)
    gt_pad = _padded(gt.intervals(), g_gt, gt_slot, n_groups, _size(gt_slot))
    overlap = tiou(det.intervals()[:, None], gt_pad[g_det]).nan_to_num_(nan=-1.0)  # [D, Gmax]

    _, rank, _ = _slots(g_det, n_groups)  # processing order within a group = score order
    taken = torch.zeros(n_groups, gt_pad.shape[1], thr.numel(), dtype=torch.bool)
    tp = torch.zeros(len(det), thr.numel(), dtype=torch.bool)
    by_rank = torch.argsort(rank, stable=True)
    for idx in by_rank.split(torch.bincount(rank).tolist()):
        g = g_det[idx]
        ok = (overlap[idx, :, None] >= thr) & ~taken[g]
        best = torch.where(ok, overlap[idx, :, None], -1.0).argmax(dim=1)  # [n, T]
        hit = ok.any(dim=1)
        tp[idx] = hit
        rows, ts = hit.nonzero(as_tuple=True)
        taken[g[rows], best[rows, ts], ts] = True
    return MapResult("activitynet", tuple(thresholds), _interpolated_ap(det.label, tp, gt.label, num_classes))


def _interpolated_ap(label: Tensor, tp: Tensor, gt_label: Tensor, num_classes: int) -> Tensor:
    """All-point interpolated AP per class; detections sorted by class then score."""
    npos = torch.bincount(gt_label, minlength=num_classes).to(torch.float64)
    offsets = _segment_offsets(label, num_classes)
    ap = torch.zeros(tp.shape[1], num_classes, dtype=torch.float64)
    if tp.shape[0]:
        position = torch.arange(tp.shape[0]) - offsets[label] + 1  # 1-based rank within class
        cum_tp = tp.to(torch.float64).cumsum(0)
        cum_tp -= (cum_tp[offsets - 1] * (offsets > 0)[:, None])[label]  # restart per class
        precision = cum_tp / position[:, None]
        # running max from the end of each class; shifting class c down by 2c keeps the max of
        # higher classes (processed first, from the end) from leaking into lower ones
        shifted = precision - 2.0 * label[:, None]
        envelope = shifted.flip(0).cummax(0).values.flip(0) + 2.0 * label[:, None]
        ap.index_add_(1, label, (envelope * tp).T)
    ap /= npos
    ap[:, npos == 0] = float("nan")
    return ap


def thumos14_ap(gt: Segments, det: Segments, thresholds: Sequence[float], num_classes: int,
                ambiguous: Segments | None = None) -> MapResult:
    """AP [T, C] under the THUMOS'14 official protocol (module docstring).

    ``ambiguous``: the Ambiguous segments (labels ignored). Detections with a label outside
    ``[0, num_classes)`` are not evaluated.
    """
    thr = torch.tensor(list(thresholds), dtype=torch.float64)
    det = det.take(((det.label >= 0) & (det.label < num_classes)).nonzero().squeeze(1))
    det = det.take(_by_score(det))
    g_gt, g_det, n_groups = _groups(gt, det)
    _, gt_slot, _ = _slots(g_gt, n_groups)
    _, det_slot, _ = _slots(g_det, n_groups)
    det_pad = _padded(det.intervals(), g_det, det_slot, n_groups, _size(det_slot))
    gt_iv = gt.intervals()

    used = torch.zeros(n_groups, det_pad.shape[1], thr.numel(), dtype=torch.bool)
    gt_order = torch.argsort(gt_slot, stable=True)
    for idx in gt_order.split(torch.bincount(gt_slot).tolist()):
        g = g_gt[idx]
        overlap = tiou(gt_iv[idx, None], det_pad[g]).nan_to_num_(nan=-float("inf"))  # [n, Dmax]
        candidate = torch.where(used[g], -float("inf"), overlap[:, :, None])
        best_value, best = candidate.max(dim=1)  # first maximum = higher-scored detection
        rows, ts = (best_value > thr).nonzero(as_tuple=True)
        used[g[rows], best[rows, ts], ts] = True
    tp = used[g_det, det_slot]  # [D, T]

    dropped = _overlaps_any(det, ambiguous) if ambiguous is not None and len(ambiguous) else \
        torch.zeros(len(det), dtype=torch.bool)
    counted = tp | ~dropped[:, None]
    npos = torch.bincount(gt.label, minlength=num_classes).to(torch.float64)
    offsets = _segment_offsets(det.label, num_classes)
    ap = torch.zeros(thr.numel(), num_classes, dtype=torch.float64)
    if len(det):
        cum_tp = tp.to(torch.float64).cumsum(0)
        cum_counted = counted.to(torch.float64).cumsum(0)
        before = (offsets > 0)[:, None]
        cum_tp -= (cum_tp[offsets - 1] * before)[det.label]
        cum_counted -= (cum_counted[offsets - 1] * before)[det.label]
        precision = torch.where(tp, cum_tp / cum_counted.clamp(min=1), 0.0)
        ap.index_add_(1, det.label, precision.T)
    ap /= npos.clamp(min=1)
    return MapResult("thumos14", tuple(thresholds), ap)


def _overlaps_any(det: Segments, segments: Segments) -> Tensor:
    """Whether each detection intersects (positive length) a segment of the same video."""
    n_videos = _size(segments.video, det.video)
    _, slot, _ = _slots(segments.video, n_videos)
    pad = _padded(segments.intervals(), segments.video, slot, n_videos, _size(slot))[det.video]
    iv = det.intervals()[:, None]
    inter = torch.minimum(iv[..., 1], pad[..., 1]) - torch.maximum(iv[..., 0], pad[..., 0])
    return (inter > 0).any(dim=1)


def average_recall(gt: Segments, proposals: Segments, average_numbers: Sequence[float],
                   thresholds: Sequence[float] = ACTIVITYNET_TIOU) -> Tensor:
    """Recall [T, len(average_numbers)] at average numbers of proposals per video (AR@AN).

    The official ActivityNet proposal protocol: with V videos and P proposals in all, a video
    with p proposals keeps its ``int(p * AN * V / P)`` best-scored ones; a ground truth is
    recalled at threshold t if one kept proposal has tIoU >= t. Labels are ignored. Average
    over the thresholds (``.mean(0)``) for AR@AN.
    """
    thr = torch.tensor(list(thresholds), dtype=torch.float64)
    an = torch.tensor(list(average_numbers), dtype=torch.float64)
    videos = torch.unique(gt.video)
    per_video = torch.bincount(proposals.video, minlength=_size(gt.video))
    total = float(per_video[videos].sum())
    recalled = torch.zeros(thr.numel(), an.numel(), dtype=torch.float64)
    order = _by_score(Segments(proposals.video, torch.zeros_like(proposals.video), proposals.start,
                               proposals.end, proposals.score))
    ranked = proposals.take(order)
    for v in videos.tolist():
        g = gt.intervals()[gt.video == v]
        p = ranked.intervals()[ranked.video == v]
        if not len(p):
            continue
        best_so_far = tiou(g[:, None], p[None]).cummax(dim=1).values  # [G, P] best among top-k
        keep = (p.shape[0] * an * videos.numel() / total).long().clamp(max=p.shape[0])
        at_k = torch.where(keep[None] > 0, best_so_far[:, (keep - 1).clamp(min=0)], -1.0)  # [G, A]
        recalled += (at_k[None] >= thr[:, None, None]).sum(dim=1)
    return recalled / max(len(gt), 1)
