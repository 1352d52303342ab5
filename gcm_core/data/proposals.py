"""Readers of action-unit proposals, into ``dict[str, Proposals]`` in seconds.

- SSN / P-GCN proposal lists (``.txt`` starting with ``# 0``), frame-based (THUMOS'14 TAG) or
  normalized (ActivityNet TAG): blocks of ``# idx``, video path, frame count, multiplier, the
  ground-truth count and lines, the proposal count and ``label best_iou overlap start end``
  lines. The lists carry no proposal score (their two overlaps are training labels computed from
  the ground truth, not predictions), so every score is 1 and the list order is kept;
- ``video start end [score]`` text (TURN style), in frames (``time_unit="frames"``, as TURN's
  public file) or seconds;
- BSN / BMN CSVs: a folder of ``<video>.csv`` with normalized ``xmin, xmax, score`` columns, or one
  CSV with a ``video`` (or ``video-name``) column and either normalized ``xmin, xmax`` or
  ``t-start, t-end`` in seconds.

Converting frames or fractions to seconds needs each video's fps or duration: pass the
annotations as ``videos``. Proposals must have end > start and lie inside the video; proposal
generators overshoot the last frame a little (the real THUMOS'14 TAG lists by up to 6 frames),
so ends up to ``tolerance`` seconds past the end are clipped to it, and anything further is an
error.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gcm_core.data.atomic import atomic_write_text
from gcm_core.data.model import FormatError, Proposals, Video, video_key, video_spellings
from gcm_core.units import pairwise_overlap, pairwise_tiou

DEFAULT_TOLERANCE_S = 1.0
Row = tuple[float, float, float, int]  # start, end, score, line number


def read_proposals(path: str | Path, videos: dict[str, Video] | None = None, *, time_unit: str = "frames",
                   tolerance: float = DEFAULT_TOLERANCE_S, skip_unknown: bool = False) -> dict[str, Proposals]:
    """Proposals of every video in ``path`` (file or folder of CSVs), format detected, keyed as the
    file spells the videos.

    ``videos`` gives fps / duration for the conversion to seconds and the range check;
    ``time_unit`` applies to ``video start end [score]`` text only. A video that ``videos`` does
    not annotate is an error where its proposals need its fps or duration; ``skip_unknown`` leaves
    out every video it does not annotate.
    """
    source = ProposalSource(path, videos or {}, time_unit=time_unit, tolerance=tolerance)
    return {vid: source[vid] for vid in source.video_ids if not (skip_unknown and _annotation(videos, vid) is None)}


class ProposalSource:
    """The proposals of one video at a time, from any file or folder :func:`read_proposals` reads.

    A preprocessing worker needs the videos of its shards, not the whole dataset's, and a file
    may hold videos its reader has no annotation for (another subset, videos left out, or, for
    ``gcm detect``, every video but the new one): the file's structure and numbers are checked
    and indexed once, and a video's proposals are placed in seconds when it is asked for. An SSN
    list is indexed by its block headers (a block is parsed when asked for), a folder of
    per-video CSVs reads that video's file, other files are read once, grouped by video.
    """

    def __init__(self, path: str | Path, videos: dict[str, Video], *, time_unit: str = "frames",
                 tolerance: float = DEFAULT_TOLERANCE_S) -> None:
        if time_unit not in ("frames", "seconds"):
            raise ValueError(f"time_unit must be 'frames' or 'seconds', got {time_unit!r}")
        self.path, self.videos, self.tolerance = Path(path), videos, tolerance
        self._lines: list[str] = []
        self._headers: dict[str, int] | None = None
        self._rows: dict[str, tuple[str, list[Row]]] = {}
        self._unit = time_unit
        if self.path.is_dir():
            if not any(self.path.glob("*.csv")):
                raise FormatError(self.path, "no <video>.csv proposal files in this folder")
        elif not self.path.is_file():
            raise FormatError(self.path, "no such file or folder")
        elif _is_ssn_list(self.path):
            self._lines = self.path.read_text().splitlines()
            self._headers = {video_key(v): i for v, i in _ssn_headers(self.path, self._lines).items()}
        elif self.path.suffix == ".csv":
            self._unit, self._rows = _csv_rows(self.path)
        else:
            self._rows = _plain_rows(self.path)

    @property
    def video_ids(self) -> list[str]:
        """The videos the source holds, spelled and ordered as in it."""
        if self.path.is_dir():
            return [f.stem for f in sorted(self.path.glob("*.csv"))]
        if self._headers is not None:
            return [_ssn_video(self._lines[i + 1]) for i in self._headers.values()]
        return [vid for vid, _ in self._rows.values()]

    def __getitem__(self, video: str) -> Proposals:
        """``video``'s proposals; the file may spell an ActivityNet id with or without ``v_``."""
        return self._read(video, self.videos)

    def of(self, video: Video) -> Proposals:
        """The proposals of a video the source's annotations need not hold (a new video), placed
        in seconds with its own fps and duration; none is an error."""
        proposals = self._read(video.id, {video.id: video})
        if not len(proposals):
            raise FormatError(self.path, "no proposals", video=video.id)
        return proposals

    def _read(self, video: str, videos: dict[str, Video]) -> Proposals:
        key = video_key(video)
        if self._headers is not None:
            if key in self._headers:
                block = _ssn_block(self.path, self._lines, self._headers[key])
                return _ssn_proposals(self.path, block, videos, self.tolerance)
        elif self.path.is_dir():
            for name in video_spellings(video):
                if (self.path / f"{name}.csv").is_file():
                    return _read_bsn_file(self.path / f"{name}.csv", videos, self.tolerance)
        elif key in self._rows:
            vid, rows = self._rows[key]
            return _in_seconds(self.path, vid, rows, self._unit, videos, self.tolerance)
        raise FormatError(self.path, "no proposals for this video", video=video)


def _is_ssn_list(path: Path) -> bool:
    """An SSN / P-GCN list is a text file whose first line is a ``# <index>`` block header."""
    if not path.is_file() or path.suffix == ".csv":
        return False
    with path.open() as f:
        return f.readline().startswith("#")


def _annotation(videos: dict[str, Video] | None, vid: str) -> Video | None:
    """The annotation of ``vid``, under any of its spellings (:func:`video_spellings`)."""
    return next((videos[name] for name in video_spellings(vid) if name in (videos or {})), None)


def _video_info(path: Path, videos: dict[str, Video] | None, vid: str, need: str) -> Video:
    video = _annotation(videos, vid)
    if video is None:
        raise FormatError(path, f"no annotation for this video: its {need} is needed to place its proposals "
                                "in seconds (pass the annotations)", video=vid)
    return video


def _fps(path: Path, videos: dict[str, Video] | None, vid: str, n_frames: int | None = None) -> float:
    video = _video_info(path, videos, vid, "fps")
    if video.fps:
        return video.fps
    if n_frames and video.duration:
        return n_frames / video.duration
    raise FormatError(path, "the annotation gives neither fps nor duration", video=vid)


def _duration(path: Path, videos: dict[str, Video] | None, vid: str) -> float:
    video = _video_info(path, videos, vid, "duration")
    if not video.duration:
        raise FormatError(path, "the annotation gives no duration", video=vid)
    return video.duration


def _finish(path: Path, vid: str, rows: list[Row], duration: float | None,
            tolerance: float) -> Proposals:
    """Check rows of (start, end, score, line) in seconds, clip small overshoots, build Proposals."""
    arr = np.array([r[:3] for r in rows], dtype=np.float64).reshape(-1, 3)
    lines = [r[3] for r in rows]
    bad = ~np.isfinite(arr).all(axis=1) | (arr[:, 1] <= arr[:, 0])
    if bad.any():
        k = int(np.argmax(bad))
        raise FormatError(path, f"proposal ({arr[k, 0]:g}, {arr[k, 1]:g}) must have end > start", video=vid,
                          line=lines[k])
    if duration is not None:
        outside = (arr[:, 0] < -tolerance) | (arr[:, 1] > duration + tolerance) | (arr[:, 0] >= duration)
        if outside.any():
            k = int(np.argmax(outside))
            raise FormatError(path, f"proposal ({arr[k, 0]:g}, {arr[k, 1]:g}) s lies outside the video "
                                    f"(0, {duration:g}) s", video=vid, line=lines[k])
        arr[:, 0] = np.clip(arr[:, 0], 0, duration)
        arr[:, 1] = np.clip(arr[:, 1], 0, duration)
    return Proposals(arr[:, 0], arr[:, 1], arr[:, 2])


def _int(path: Path, text: str, line: int, what: str, vid: str | None = None) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise FormatError(path, f"{what} must be an integer, got {text.strip()!r}", video=vid, line=line) from None


@dataclass
class SsnBlock:
    """One video's block of an SSN / P-GCN proposal list, in the list's own units.

    ``gt``: (label 1..K, start, end) rows; ``proposals``: (start, end, line number) rows; units are
    frames, or fractions of the video when ``normalized``.
    """

    video: str
    n_frames: int
    normalized: bool
    gt: list[tuple[int, float, float]]
    proposals: list[tuple[float, float, int]]


def read_ssn_blocks(path: str | Path) -> list[SsnBlock]:
    """Parse an SSN / P-GCN proposal list without converting it (see the module docstring)."""
    path = Path(path)
    lines = path.read_text().splitlines()
    return [_ssn_block(path, lines, header) for header in _ssn_headers(path, lines).values()]


def _ssn_headers(path: Path, lines: list[str]) -> dict[str, int]:
    """Each video's block header line (index), in file order: the list's structure (headers,
    counts, no truncation, no video twice) checked without parsing its proposal lines."""
    headers: dict[str, int] = {}
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        if not lines[i].startswith("#"):
            raise FormatError(path, f"expected a '# <index>' block header, got {lines[i]!r}", line=i + 1)
        if i + 5 > len(lines):
            raise FormatError(path, "truncated block header", line=i + 1)
        vid = _ssn_video(lines[i + 1])
        if vid in headers:
            raise FormatError(path, "duplicate video id", video=vid, line=i + 2)
        headers[vid] = i
        i += 5 + _int(path, lines[i + 4], i + 5, "ground-truth count", vid)
        if i >= len(lines):
            raise FormatError(path, "truncated block: the proposal count is missing", video=vid, line=i)
        n_prop = _int(path, lines[i], i + 1, "proposal count", vid)
        if i + 1 + n_prop > len(lines):
            raise FormatError(path, f"truncated block: {n_prop} proposals announced, "
                                    f"{len(lines) - i - 1} lines left", video=vid, line=len(lines))
        i += 1 + n_prop
    return headers


def _ssn_video(line: str) -> str:
    return line.strip().rstrip("/").split("/")[-1]


def _ssn_block(path: Path, lines: list[str], i: int) -> SsnBlock:
    """The block whose header is line ``i`` (its extent checked by :func:`_ssn_headers`)."""
    vid = _ssn_video(lines[i + 1])
    frames = _int(path, lines[i + 2], i + 3, "frame count", vid)
    try:
        multiplier = float(lines[i + 3])
    except ValueError:
        raise FormatError(path, "multiplier must be a number", video=vid, line=i + 4) from None
    n_gt = _int(path, lines[i + 4], i + 5, "ground-truth count", vid)
    gt = [_numbers(path, lines, k, vid, 3, "label start end") for k in range(i + 5, i + 5 + n_gt)]
    i += 5 + n_gt
    n_prop = _int(path, lines[i], i + 1, "proposal count", vid)
    proposals = [(*_numbers(path, lines, k, vid, 5, "label best_iou overlap start end")[3:], k + 1)
                 for k in range(i + 1, i + 1 + n_prop)]
    n_frames = int(frames * multiplier)
    return SsnBlock(vid, n_frames, n_frames == 1, [(int(l), s, e) for l, s, e in gt], proposals)


def _numbers(path: Path, lines: list[str], k: int, vid: str, count: int, layout: str) -> list[float]:
    parts = lines[k].split()
    try:
        if len(parts) != count:
            raise ValueError
        return [float(p) for p in parts]
    except ValueError:
        raise FormatError(path, f"expected '{layout}', got {lines[k]!r}", video=vid, line=k + 1) from None


def _ssn_proposals(path: Path, block: SsnBlock, videos: dict[str, Video] | None, tolerance: float) -> Proposals:
    """One block's proposals in seconds."""
    if block.normalized:
        duration = _duration(path, videos, block.video)
        scale = duration
    else:
        fps = _fps(path, videos, block.video, block.n_frames)
        duration = _known_duration(videos, block.video) or block.n_frames / fps
        scale = 1 / fps
    return _finish(path, block.video, [(s * scale, e * scale, 1.0, line) for s, e, line in block.proposals],
                   duration, tolerance)


def _plain_rows(path: Path) -> dict[str, tuple[str, list[Row]]]:
    """The rows of ``video start end [score]`` text, grouped by video (keyed by :func:`video_key`)."""
    grouped: dict[str, tuple[str, list[Row]]] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (3, 4):
            raise FormatError(path, f"expected 'video start end [score]', got {line.strip()!r}", line=line_no)
        try:
            values = [float(p) for p in parts[1:]]
        except ValueError:
            raise FormatError(path, f"not numbers: {line.strip()!r}", video=parts[0], line=line_no) from None
        score = values[2] if len(values) == 3 else 1.0
        grouped.setdefault(video_key(parts[0]), (parts[0], []))[1].append((values[0], values[1], score, line_no))
    return grouped


def _in_seconds(path: Path, vid: str, rows: list[Row], unit: str, videos: dict[str, Video] | None,
                tolerance: float) -> Proposals:
    """Rows of one video in ``unit`` (seconds, frames or fraction of the video), checked, as Proposals."""
    scale = 1.0
    if unit == "frames":
        scale = 1 / _fps(path, videos, vid)
    elif unit == "fraction":
        scale = _duration(path, videos, vid)
    return _finish(path, vid, [(s * scale, e * scale, score, line) for s, e, score, line in rows],
                   _known_duration(videos, vid), tolerance)


def read_video_proposals(path: str | Path, video: Video, tolerance: float = DEFAULT_TOLERANCE_S) -> Proposals:
    """The proposals of one new video (what ``gcm detect`` takes), from a file of its own, with
    ``start end [score]`` lines in seconds or a BSN / BMN CSV without a video column, or picked
    from a file or folder of many that :func:`read_proposals` reads (an SSN list, a CSV with a
    video column, a folder of ``<video>.csv``). ``video`` gives the id to pick and the fps and
    duration that place frames and normalized positions in seconds."""
    path = Path(path)
    if not path.exists():
        raise FormatError(path, "no such file or folder", video=video.id)
    if holds_many_videos(path):
        return ProposalSource(path, {}, tolerance=tolerance).of(video)
    if path.suffix == ".csv":
        proposals = _read_bsn_file(path, {video.id: video}, tolerance, video.id)
    else:
        proposals = _read_plain_video_text(path, video, tolerance)
    if not len(proposals):
        raise FormatError(path, "no proposals", video=video.id)
    return proposals


def holds_many_videos(path: str | Path) -> bool:
    """Whether ``path`` holds the proposals of many videos (an SSN list, a CSV with a video column,
    a folder of ``<video>.csv``) rather than of one."""
    path = Path(path)
    return path.is_dir() or _is_ssn_list(path) or (
        path.suffix == ".csv" and bool({"video", "video-name"} & set(_csv_columns(path))))


def _read_plain_video_text(path: Path, video: Video, tolerance: float) -> Proposals:
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            values = [float(p) for p in parts]
        except ValueError:
            raise FormatError(path, f"expected 'start end [score]' in seconds, got {line.strip()!r}", video=video.id,
                              line=line_no) from None
        rows.append((values[0], values[1], values[2] if len(values) == 3 else 1.0, line_no))
    return _finish(path, video.id, rows, video.duration, tolerance)


def _csv_columns(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return next(csv.reader(f), [])


def _csv_rows(path: Path, video: str | None = None) -> tuple[str, dict[str, tuple[str, list[Row]]]]:
    """The unit of a BSN-style CSV's positions (``fraction`` of the video for ``xmin, xmax``,
    ``seconds`` for ``t-start, t-end``) and its rows grouped by video (keyed by :func:`video_key`):
    the ``video`` column's, or all ``video``'s for a one-video CSV."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        rows = list(enumerate(reader, start=2))
    video_col = next((c for c in ("video", "video-name") if c in columns), None)
    normalized = {"xmin", "xmax"} <= columns
    if not (normalized or {"t-start", "t-end"} <= columns) or (video is None and video_col is None):
        raise FormatError(path, f"unknown proposal CSV columns {sorted(columns)}")
    grouped: dict[str, tuple[str, list[Row]]] = {}
    for line, row in rows:
        vid = video or row[video_col]
        try:
            s, e = (float(row["xmin"]), float(row["xmax"])) if normalized else (float(row["t-start"]), float(row["t-end"]))
            score = float(row.get("score") or 1.0)
        except ValueError:
            raise FormatError(path, "start/end/score are not numbers", video=vid, line=line) from None
        grouped.setdefault(video_key(vid), (vid, []))[1].append((s, e, score, line))
    return ("fraction" if normalized else "seconds"), grouped


def _read_bsn_file(file: Path, videos: dict[str, Video] | None, tolerance: float, video: str | None = None
                   ) -> Proposals:
    """One BSN / BMN CSV of one video: ``video``'s, by default the one its name (``<video>.csv``) says."""
    vid = video or file.stem
    unit, grouped = _csv_rows(file, vid)
    return _in_seconds(file, vid, grouped.get(video_key(vid), (vid, []))[1], unit, videos, tolerance)


def _known_duration(videos: dict[str, Video] | None, vid: str) -> float | None:
    video = _annotation(videos, vid)
    return video.duration if video else None


def write_ssn_list(path: str | Path, videos: dict[str, Video], proposals: dict[str, Proposals],
                   classes: list[str] | tuple[str, ...]) -> None:
    """An SSN / P-GCN proposal list in frames, with each proposal's best tIoU and self-overlap.

    Labels are 1-based in ``classes`` order (0 = background), as the authors' lists.
    """
    index = {c: k + 1 for k, c in enumerate(classes)}
    out = []
    for k, (vid, props) in enumerate(proposals.items()):
        video = videos[vid]
        fps = video.fps
        gt = torch.tensor([(i.start, i.end) for i in video.instances], dtype=torch.float64).reshape(-1, 2)
        units = torch.tensor(props.intervals, dtype=torch.float64).reshape(-1, 2)
        if gt.shape[0]:
            ious = pairwise_tiou(units, gt)
            best_iou, best = ious.max(dim=1)
            overlap = pairwise_overlap(units, gt).max(dim=1).values
            labels = [index[video.instances[b].label] if iou > 0 else 0 for b, iou in zip(best.tolist(), best_iou.tolist())]
        else:
            best_iou = overlap = torch.zeros(units.shape[0], dtype=torch.float64)
            labels = [0] * units.shape[0]
        out += [f"# {k}", vid, str(video.n_frames or round(video.duration * fps)), "1", str(len(video.instances))]
        out += [f"{index[i.label]} {round(i.start * fps)} {round(i.end * fps)}" for i in video.instances]
        out.append(str(units.shape[0]))
        out += [f"{lab} {iou:.4f} {ov:.4f} {round(s * fps)} {max(round(e * fps), round(s * fps) + 1)}"
                for lab, iou, ov, (s, e) in zip(labels, best_iou.tolist(), overlap.tolist(), units.tolist())]
    atomic_write_text(path, "\n".join(out) + "\n")
