"""Detections against ground truth under a named protocol: the bridge from files to metrics."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from gcm_core.data.model import Detections, Video
from gcm_core.metrics import MapResult, Segments, activitynet_ap, thumos14_ap

PROTOCOLS = ("thumos14", "activitynet")


def evaluate_detections(videos: dict[str, Video], detections: Detections, classes: Sequence[str],
                        protocol: str, tiou: Sequence[float]) -> MapResult:
    """mAP of ``detections`` on the ground truth ``videos`` (the evaluated set).

    Detections on videos outside that set count as false positives, and detections of labels
    outside ``classes`` are ignored, as in both official evaluators.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    class_index = {name: k for k, name in enumerate(classes)}
    video_index = {vid: k for k, vid in enumerate(videos)}
    gt_rows = [(video_index[v.id], class_index[i.label], i.start, i.end)
               for v in videos.values() for i in v.instances if i.label in class_index]
    gt = _segments(gt_rows)
    det_keep = [k for k, lab in enumerate(detections.label) if lab in class_index]
    for vid in {detections.video[k] for k in det_keep} - video_index.keys():
        video_index[vid] = len(video_index)
    det = Segments(
        video=[video_index[detections.video[k]] for k in det_keep],
        label=[class_index[detections.label[k]] for k in det_keep],
        start=detections.start[det_keep], end=detections.end[det_keep], score=detections.score[det_keep],
    )
    if protocol == "activitynet":
        return activitynet_ap(gt, det, tiou, len(classes))
    ambiguous = _segments([(video_index[v.id], -1, s, e) for v in videos.values() for s, e in v.ambiguous])
    return thumos14_ap(gt, det, tiou, len(classes), ambiguous)


def _segments(rows: list[tuple[int, int, float, float]]) -> Segments:
    if not rows:
        return Segments(torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0))
    video, label, start, end = zip(*rows)
    return Segments(video, label, start, end)


def select_subset(videos: dict[str, Video], subset: str | None) -> dict[str, Video]:
    """The videos of one subset (case-insensitive); all of them when ``subset`` is None."""
    if subset is None:
        return videos
    chosen = {k: v for k, v in videos.items() if (v.subset or "").lower() == subset.lower()}
    if not chosen:
        found = sorted({str(v.subset) for v in videos.values()})
        raise ValueError(f"no ground-truth video in subset {subset!r} (subsets present: {found})")
    return chosen
