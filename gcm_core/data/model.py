"""The internal data model: videos, their instances, unit proposals and detections, in seconds."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np


class FormatError(ValueError):
    """Bad input, located: the file, the video and the line or field at fault."""

    def __init__(self, path: str | Path, problem: str, *, video: str | None = None,
                 line: int | None = None, field: str | None = None) -> None:
        where = [str(path)]
        if line is not None:
            where.append(f"line {line}")
        if video is not None:
            where.append(f"video {video}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {problem}")
        self.path, self.problem, self.video, self.line, self.field = Path(path), problem, video, line, field

    def __reduce__(self):  # rebuilt from its parts, so that it crosses processes (Ray tasks) whole
        return partial(FormatError, video=self.video, line=self.line, field=self.field), (self.path, self.problem)


def video_key(video_id: str) -> str:
    """The name videos are matched by across files. ActivityNet's YouTube ids (11 characters)
    appear bare in the official ground truth, submissions and TAG lists and with BSN / BMN's
    ``v_`` prefix in their annotation, proposal and feature files: the prefix is dropped."""
    return video_id[2:] if len(video_id) == 13 and video_id.startswith("v_") else video_id


def video_spellings(video_id: str) -> tuple[str, ...]:
    """The names a video may have in a file: its own, then, for an ActivityNet id, the other
    spelling (``v_`` added or dropped; see :func:`video_key`)."""
    key = video_key(video_id)
    return tuple(dict.fromkeys((video_id, key, f"v_{key}"))) if len(key) == 11 else (video_id,)


@dataclass
class Instance:
    """One annotated action: a class name and its extent in seconds."""

    label: str
    start: float
    end: float


@dataclass
class Video:
    """An annotated video. ``ambiguous`` segments are excluded from evaluation (THUMOS'14)."""

    id: str
    duration: float | None = None
    fps: float | None = None
    n_frames: int | None = None
    subset: str | None = None
    instances: list[Instance] = field(default_factory=list)
    ambiguous: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Proposals:
    """The action units of one video: extents in seconds and a score per unit."""

    start: np.ndarray
    end: np.ndarray
    score: np.ndarray

    def __post_init__(self) -> None:
        self.start, self.end, self.score = _float_columns(self.start, self.end, self.score)

    def __len__(self) -> int:
        return len(self.start)

    @property
    def intervals(self) -> np.ndarray:
        return np.stack([self.start, self.end], axis=1)


@dataclass
class Detections:
    """Scored, labelled segments of many videos as parallel columns (class names, seconds)."""

    video: list[str]
    label: list[str]
    start: np.ndarray
    end: np.ndarray
    score: np.ndarray

    def __post_init__(self) -> None:
        self.start, self.end, self.score = _float_columns(self.start, self.end, self.score)

    def __len__(self) -> int:
        return len(self.video)

    def by_video(self) -> "Detections":
        """The same detections ordered by video id, each video's in their order."""
        order = sorted(range(len(self.video)), key=self.video.__getitem__)
        return Detections([self.video[k] for k in order], [self.label[k] for k in order],
                          self.start[order], self.end[order], self.score[order])

    @classmethod
    def concat(cls, parts: list["Detections"]) -> "Detections":
        """The detections of every part, in order."""
        return cls([v for p in parts for v in p.video], [lab for p in parts for lab in p.label],
                   *(np.concatenate([getattr(p, c) for p in parts] or [np.zeros(0)]) for c in ("start", "end", "score")))


def _float_columns(*columns) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(c, dtype=np.float64) for c in columns)
