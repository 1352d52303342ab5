"""Detections against ground truth under a named protocol: the bridge from files to metrics."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from gcm_core.data.model import Detections, Video, video_key
from gcm_core.metrics import MapResult, Segments, activitynet_ap, thumos14_ap
from gcm_core.postprocess import InferenceConfig, nms

PROTOCOLS = ("thumos14", "activitynet")
AGNOSTIC = "action"  # the one class of a class-agnostic evaluation


def evaluate_detections(videos: dict[str, Video], detections: Detections, classes: Sequence[str],
                        protocol: str, tiou: Sequence[float]) -> MapResult:
    """mAP of ``detections`` on the ground truth ``videos`` (the evaluated set).

    Detections on videos outside that set count as false positives, and detections of labels
    outside ``classes`` are ignored, as in both official evaluators. Videos are matched by
    :func:`~gcm_core.data.model.video_key` (ActivityNet ids with or without ``v_``); detections
    of which not one names a ground-truth video, or has a label among ``classes``, are an error,
    not a silent mAP of 0.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    if not tiou or any(not 0 < t <= 1 for t in tiou):
        raise ValueError(f"tIoU thresholds must be in (0, 1], got {list(tiou)}")
    class_index = {name: k for k, name in enumerate(classes)}
    video_index = {video_key(vid): k for k, vid in enumerate(videos)}
    gt_rows = [(video_index[video_key(v.id)], class_index[i.label], i.start, i.end)
               for v in videos.values() for i in v.instances if i.label in class_index]
    gt = _segments(gt_rows)
    det_videos = [video_key(v) for v in detections.video]
    if det_videos and video_index and video_index.keys().isdisjoint(det_videos):
        raise ValueError(f"none of the {len(set(det_videos))} videos of the detections is a ground-truth video "
                         f"(detections: {sorted(set(detections.video))[:3]}, ground truth: {sorted(videos)[:3]}): "
                         "do the two files name the same videos, and the same subset?")
    det_keep = [k for k, lab in enumerate(detections.label) if lab in class_index]
    if len(detections) and not det_keep:
        raise ValueError(f"none of the {len(detections)} detections has a label among the {len(classes)} classes "
                         f"(labels: {sorted(set(detections.label))[:3]}, classes: {list(classes)[:3]}): "
                         "check the card and, for THUMOS text, the label convention")
    for vid in {det_videos[k] for k in det_keep} - video_index.keys():
        video_index[vid] = len(video_index)
    det = Segments(
        video=[video_index[det_videos[k]] for k in det_keep],
        label=[class_index[detections.label[k]] for k in det_keep],
        start=detections.start[det_keep], end=detections.end[det_keep], score=detections.score[det_keep],
    )
    if protocol == "activitynet":
        return activitynet_ap(gt, det, tiou, len(classes))
    ambiguous = _segments([(video_index[video_key(v.id)], -1, s, e) for v in videos.values() for s, e in v.ambiguous])
    return thumos14_ap(gt, det, tiou, len(classes), ambiguous)


@dataclass(frozen=True)
class Unmatched:
    """The parts of a detection file that the evaluated ground truth does not name.

    Both official evaluators score them without a word: detections on other videos count as
    false positives and detections of other labels are ignored, so a mismatch of video ids,
    subset, class names or label convention shows only as a lower mAP. Counted so that a user
    sees it.
    """

    outside_videos: Counter[str]     # detections per video that is not an evaluated one
    unknown_labels: Counter[str]     # detections per label that is not one of the classes
    videos_without: list[str]        # evaluated videos without a detection

    def counts(self) -> dict[str, int]:
        return {"detections_on_other_videos": sum(self.outside_videos.values()),
                "detections_of_other_labels": sum(self.unknown_labels.values()),
                "videos_without_detections": len(self.videos_without)}

    def notes(self, num_classes: int) -> list[str]:
        """One sentence per kind of mismatch found, with the first few names."""
        notes = []
        if self.outside_videos:
            notes.append(f"{_count(sum(self.outside_videos.values()), 'detection')} on "
                         f"{_count(len(self.outside_videos), 'video')} outside the evaluated ones "
                         f"({_first(self.outside_videos)}): scored as false positives")
        if self.unknown_labels:
            notes.append(f"{_count(sum(self.unknown_labels.values()), 'detection')} with labels outside the "
                         f"{num_classes} classes ({_first(self.unknown_labels)}): ignored")
        if self.videos_without:
            notes.append(f"{_count(len(self.videos_without), 'evaluated video')} without a detection "
                         f"({_first(self.videos_without)})")
        return notes


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _first(names: Sequence[str] | Counter[str], shown: int = 3) -> str:
    listed = sorted(names)
    return ", ".join(listed[:shown]) + (f" and {len(listed) - shown} more" if len(listed) > shown else "")


def unmatched_detections(videos: dict[str, Video], detections: Detections, classes: Sequence[str]) -> Unmatched:
    """What of ``detections`` lies outside ``videos`` and ``classes`` (matched as
    :func:`evaluate_detections` matches them), and which of ``videos`` it leaves without a detection."""
    evaluated = {video_key(vid) for vid in videos}
    detected = Counter(detections.video)
    known = set(classes)
    return Unmatched(
        outside_videos=Counter({vid: n for vid, n in detected.items() if video_key(vid) not in evaluated}),
        unknown_labels=Counter(label for label in detections.label if label not in known),
        videos_without=sorted(evaluated - {video_key(vid) for vid in detected}),
    )


def class_agnostic(videos: dict[str, Video], detections: Detections,
                   nms_threshold: float = InferenceConfig.nms_threshold) -> tuple[dict[str, Video], Detections]:
    """The ground truth and the detections with every class merged into one, :data:`AGNOSTIC`.

    Their AP measures finding and delimiting actions whatever their class, so its gap to the
    class-aware mAP is what classification costs a detector (the split of errors that diagnosis
    tools such as DETAD make). A detector suppresses duplicates within each class only, and a
    two-stage head reports each unit under several classes (regressed apart): each video's
    detections are suppressed once more across classes, with NMS at ``nms_threshold`` (by default
    gcm-tal's inference threshold), so that one action found under two labels counts once.
    """
    merged = {k: replace(v, instances=[replace(i, label=AGNOSTIC) for i in v.instances]) for k, v in videos.items()}
    rows: dict[str, list[int]] = {}
    for k, vid in enumerate(detections.video):
        rows.setdefault(vid, []).append(k)
    kept = []
    for index in rows.values():
        picked = torch.tensor(index)
        segments = torch.stack([torch.from_numpy(detections.start[index]), torch.from_numpy(detections.end[index])], 1)
        kept += picked[nms(segments, torch.from_numpy(detections.score[index]), iou_threshold=nms_threshold)].tolist()
    return merged, Detections([detections.video[k] for k in kept], [AGNOSTIC] * len(kept), detections.start[kept],
                              detections.end[kept], detections.score[kept])


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
