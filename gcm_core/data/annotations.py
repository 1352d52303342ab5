"""Readers of ground-truth annotations in the field's formats, into ``dict[str, Video]``.

- official ActivityNet JSON (``database`` + ``taxonomy``) and the ActionFormer / OpenTAD JSON
  (``database`` entries with ``fps`` and ``label_id``);
- the BSN/BMN ``anet_anno_action.json`` (video -> ``duration_second``, ``annotations``), merged
  with a ``video_info_new.csv`` beside it (subset, fps) when one is there;
- the THUMOS'14 per-class folder (``<Class>_<subset>.txt``: ``video start end``, with
  ``Ambiguous_<subset>.txt``), merged with ``<subset>_durations.txt`` beside the folder;
- CSVs: G-TAD's ``video,type,type_idx,start,end,...`` and the THUMOS-style
  ``video-name,t-init,t-end,...,label-idx`` (label -1 = Ambiguous; integer labels need a card).

Every reader checks what it reads and raises :class:`FormatError` naming the file, the line or
field, and the video.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from gcm_core.data.atomic import atomic_write_text
from gcm_core.data.cards import DatasetCard
from gcm_core.data.model import FormatError, Instance, Video

THUMOS_SUBSETS = {"val": "validation", "validation": "validation", "test": "test"}


def read_annotations(path: str | Path, card: DatasetCard | None = None) -> dict[str, Video]:
    """Ground truth of every video in ``path`` (file or THUMOS'14 folder), format detected.

    With a ``card``, every label must be one of its classes (integer labels are mapped to names).
    """
    path = Path(path)
    if path.is_dir():
        videos = _read_thumos_folder(path)
    elif not path.is_file():
        raise FormatError(path, "no such file or folder")
    elif path.suffix == ".json":
        videos = _read_json(path)
    elif path.suffix == ".csv":
        videos = _read_csv(path, card)
    else:
        raise FormatError(path, "unknown annotation format (expected a .json, a .csv or a THUMOS'14 folder)")
    if card is not None:
        for video in videos.values():
            for k, inst in enumerate(video.instances):
                if not card.is_class(inst.label):
                    raise FormatError(path, f"label {inst.label!r} is not a class of card {card.name!r}",
                                      video=video.id, field=f"annotations[{k}].label")
    return videos


def _segment(path: Path, video: str, value: Any, where: dict[str, Any]) -> tuple[float, float]:
    try:
        start, end = (float(v) for v in value)
    except (TypeError, ValueError):
        raise FormatError(path, f"segment must be two numbers, got {value!r}", video=video, **where) from None
    if not (math.isfinite(start) and math.isfinite(end)):
        raise FormatError(path, f"segment {value!r} is not finite", video=video, **where)
    return start, end


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _load_json(path: Path) -> Any:
    """Parsed JSON; a key given twice (a duplicate video id) is an error, not a silent overwrite."""
    try:
        return json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise FormatError(path, f"malformed JSON: {err.msg}", line=err.lineno) from None
    except _DuplicateKey as err:
        raise FormatError(path, f"duplicate key (video id) {err.args[0]!r}", video=err.args[0]) from None


def _read_json(path: Path) -> dict[str, Video]:
    data = _load_json(path)
    if not isinstance(data, dict):
        raise FormatError(path, "expected a JSON object")
    # official/ActionFormer: {"database": {video: entry}}; BSN/BMN anet_anno_action.json: {video: entry}
    entries = data["database"] if "database" in data else data
    if not isinstance(entries, dict):
        raise FormatError(path, "'database' must map video ids to entries", field="database")
    videos: dict[str, Video] = {}
    for vid, entry in entries.items():
        if not isinstance(entry, dict):
            raise FormatError(path, "entry must be an object", video=vid)
        instances = []
        for k, ann in enumerate(entry.get("annotations") or []):
            where = {"field": f"annotations[{k}]"}
            if not isinstance(ann, dict) or "segment" not in ann or "label" not in ann:
                raise FormatError(path, "annotation needs 'segment' and 'label'", video=vid, **where)
            start, end = _segment(path, vid, ann["segment"], where)
            instances.append(Instance(str(ann["label"]), start, end))
        duration = entry.get("duration", entry.get("duration_second"))
        n_frames = entry.get("duration_frame")
        videos[vid] = Video(
            id=vid,
            duration=None if duration is None else float(duration),
            fps=None if entry.get("fps") is None else float(entry["fps"]),
            n_frames=None if n_frames is None else int(n_frames),
            subset=None if entry.get("subset") is None else str(entry["subset"]).lower(),
            instances=instances,
        )
    info = path.with_name("video_info_new.csv")
    if "database" not in data and info.is_file():
        _merge_bsn_info(info, videos)
    return videos


def _merge_bsn_info(path: Path, videos: dict[str, Video]) -> None:
    """Subset, fps and frame count from BSN's ``video_info_new.csv``."""
    for vid, info in _read_bsn_info(path).items():
        if vid in videos:
            videos[vid].subset, videos[vid].fps, videos[vid].n_frames = info.subset, info.fps, info.n_frames


def _read_bsn_info(path: Path) -> dict[str, Video]:
    """BSN's ``video_info_new.csv``: ``video, numFrame, seconds, fps, ..., subset`` per video."""
    videos: dict[str, Video] = {}
    with path.open(newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            vid = row.get("video") or ""
            try:
                videos[vid] = Video(vid, duration=float(row["seconds"]), fps=float(row["fps"]),
                                    n_frames=int(row["numFrame"]), subset=row["subset"])
            except (KeyError, TypeError, ValueError) as err:
                raise FormatError(path, f"bad video info row ({err})", video=vid or None, line=line) from None
    return videos


def _read_thumos_folder(folder: Path) -> dict[str, Video]:
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FormatError(folder, "no <Class>_<subset>.txt files in this folder")
    videos: dict[str, Video] = {}
    subsets = set()
    for file in files:
        label, _, suffix = file.stem.rpartition("_")
        if not label or suffix not in THUMOS_SUBSETS:
            raise FormatError(file, "file name must be <Class>_<val|test>.txt")
        subsets.add(THUMOS_SUBSETS[suffix])
        for vid, start, end in _segment_lines(file):
            video = videos.setdefault(vid, Video(vid, subset=THUMOS_SUBSETS[suffix]))
            if label == "Ambiguous":
                video.ambiguous.append((start, end))
            else:
                video.instances.append(Instance(label, start, end))
    for subset in subsets:
        short = "val" if subset == "validation" else subset
        for durations in (folder.parent / f"{subset}_durations.txt", folder.parent / f"{short}_durations.txt"):
            if durations.is_file():
                _merge_durations(durations, videos)
                break
    return videos


def _segment_lines(file: Path) -> list[tuple[str, float, float]]:
    """The ``video start end`` lines of one THUMOS'14 per-class file."""
    segments = []
    for line_no, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise FormatError(file, f"expected 'video start end', got {line.strip()!r}", line=line_no)
        try:
            segments.append((parts[0], float(parts[1]), float(parts[2])))
        except ValueError:
            raise FormatError(file, f"start/end are not numbers: {line.strip()!r}", video=parts[0],
                              line=line_no) from None
    return segments


def read_ambiguous(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """THUMOS'14's ``Ambiguous_<subset>.txt``: each video's segments that its protocol leaves out
    of scoring (a detection on one is neither right nor wrong)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "no such file")
    segments: dict[str, list[tuple[float, float]]] = {}
    for vid, start, end in _segment_lines(path):
        segments.setdefault(vid, []).append((start, end))
    return segments


def add_ambiguous(videos: dict[str, Video], path: str | Path) -> None:
    """Give ``videos`` the Ambiguous segments of ``path`` (:func:`read_ambiguous`) that they lack:
    annotations such as ``thumos14.json`` leave them out, and the THUMOS'14 protocol scores no
    detection on them, which would otherwise count as false positives."""
    for vid, segments in read_ambiguous(path).items():
        video = videos.get(vid)
        if video is not None:
            video.ambiguous += [s for s in segments if s not in video.ambiguous]


def read_video_info(path: str | Path) -> dict[str, Video]:
    """Per-video facts without instances: fps, duration, frame count, subset.

    Reads mmtad's ``TH14_video_info.json`` (``{video: {fps, duration, num_frame, subset}}``),
    BSN's ``video_info_new.csv`` (ActivityNet), CBR's ``video duration_s num_frames`` text, and
    THUMOS'14's ``*_durations.txt`` (a ``video.mp4`` line, then its duration).
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "no such file")
    if path.suffix == ".csv":
        return _read_bsn_info(path)
    if path.suffix == ".json":
        data = _load_json(path)
        try:
            return {vid: Video(vid, duration=float(e["duration"]), fps=float(e["fps"]),
                               n_frames=int(e["num_frame"]), subset=e.get("subset"))
                    for vid, e in data.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise FormatError(path, f"expected {{video: {{fps, duration, num_frame}}}} ({err})") from None
    lines = [(k, line.split()) for k, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    videos: dict[str, Video] = {}
    if lines and len(lines[0][1]) == 1:  # THUMOS'14 durations: name line, duration line
        if len(lines) % 2:
            raise FormatError(path, "expected pairs of lines (video name, duration)", line=lines[-1][0])
        for (_, name), (line, value) in zip(lines[::2], lines[1::2]):
            vid = Path(name[0]).stem
            videos[vid] = Video(vid, duration=_float_field(path, value[0], vid, line))
        return videos
    for line, parts in lines:
        if len(parts) != 3:
            raise FormatError(path, f"expected 'video duration_s num_frames', got {' '.join(parts)!r}", line=line)
        duration = _float_field(path, parts[1], parts[0], line)
        n_frames = int(_float_field(path, parts[2], parts[0], line))
        videos[parts[0]] = Video(parts[0], duration=duration, n_frames=n_frames, fps=n_frames / duration)
    return videos


def _float_field(path: Path, text: str, vid: str, line: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise FormatError(path, f"not a number: {text!r}", video=vid, line=line) from None


def _merge_durations(path: Path, videos: dict[str, Video]) -> None:
    for vid, info in read_video_info(path).items():
        if vid in videos:
            videos[vid].duration = info.duration


def read_avoid_list(path: str | Path) -> list[tuple[str, str]]:
    """THUMOS'14 ``*_avoid_videos.txt``: (video, class) pairs with known-bad labels."""
    path = Path(path)
    pairs = []
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        parts = text.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise FormatError(path, f"expected 'video ClassName', got {text.strip()!r}", line=line)
        pairs.append((parts[0], parts[1]))
    return pairs


def _read_csv(path: Path, card: DatasetCard | None) -> dict[str, Video]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        rows = list(enumerate(reader, start=2))
    if {"video", "type", "start", "end"} <= columns:
        return _rows_to_videos(path, rows, "video", "start", "end", lambda row: row["type"], ambiguous="Ambiguous")
    if {"video-name", "t-init", "t-end", "label-idx"} <= columns:
        if card is None:
            raise FormatError(path, "integer labels (label-idx) need a dataset card to name the classes")
        convention = _label_convention(path, card, [row["label-idx"] for _, row in rows])

        def label(row: dict[str, str]) -> str:
            if row["label-idx"].strip() == "-1":
                return "Ambiguous"
            return card.classes[card.class_index(row["label-idx"], convention)]

        videos = _rows_to_videos(path, rows, "video-name", "t-init", "t-end", label, ambiguous="Ambiguous")
        for line, row in rows:
            video = videos[row["video-name"]]
            video.duration = _number(path, row, "video-duration", line)
            video.fps = _number(path, row, "frame-rate", line)
            video.n_frames = int(_number(path, row, "video-frames", line))
        return videos
    raise FormatError(path, f"unknown CSV columns {sorted(columns)}")


def _label_convention(path: Path, card: DatasetCard, labels: list[str]) -> str:
    """The convention of a file's integer labels: 0-based if they all fit it, else the official one.

    (The public THUMOS'14 CSVs use both: G-TAD's ``label-idx`` is 0-based, ``type_idx`` official.)
    """
    values = {int(v) for v in labels if v.strip() not in ("", "-1")}
    for convention in ("zero_based", "official"):
        if all(card.is_class(v, convention) for v in values):
            return convention
    raise FormatError(path, f"integer labels {sorted(values)[:5]}... fit neither the 0-based nor the official "
                            f"class indices of card {card.name!r}", field="label-idx")


def _number(path: Path, row: dict[str, str], column: str, line: int) -> float:
    try:
        return float(row[column])
    except (KeyError, TypeError, ValueError):
        raise FormatError(path, f"{column} is not a number: {row.get(column)!r}", line=line, field=column) from None


def _rows_to_videos(path: Path, rows, video_col: str, start_col: str, end_col: str, label_of,
                    ambiguous: str) -> dict[str, Video]:
    videos: dict[str, Video] = {}
    for line, row in rows:
        vid = row[video_col]
        try:
            label = label_of(row)
        except ValueError as err:
            raise FormatError(path, str(err), video=vid, line=line) from None
        start = _number(path, row, start_col, line)
        end = _number(path, row, end_col, line)
        video = videos.setdefault(vid, Video(vid))
        if label == ambiguous:
            video.ambiguous.append((start, end))
        else:
            video.instances.append(Instance(label, start, end))
    return videos


def write_annotations_json(path: str | Path, videos: dict[str, Video], classes: list[str] | tuple[str, ...],
                           version: str = "gcm-tal") -> None:
    """ActionFormer-style JSON (``database`` with ``fps``, ``label_id``, ``segment(frames)``)."""
    index = {c: k for k, c in enumerate(classes)}
    database = {}
    for v in videos.values():
        entry: dict[str, Any] = {"subset": v.subset, "duration": v.duration, "fps": v.fps, "annotations": [
            {"label": i.label, "segment": [i.start, i.end], "label_id": index[i.label],
             **({"segment(frames)": [round(i.start * v.fps, 1), round(i.end * v.fps, 1)]} if v.fps else {})}
            for i in v.instances]}
        if v.n_frames is not None:
            entry["duration_frame"] = v.n_frames
        database[v.id] = entry
    atomic_write_text(path, json.dumps({"version": version, "database": database}))
