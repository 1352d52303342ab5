"""Detections read and written as ActivityNet result JSON or THUMOS'14 text.

- ActivityNet result JSON: ``{"version", "results": {video: [{"label", "score", "segment"}]},
  "external_data"}``, labels by class name;
- THUMOS'14 text: one ``video start end class_index score`` line per detection, class indices
  under a card's convention (the official 7...97 for THUMOS'14). Reversed intervals are kept as
  they are: the THUMOS'14 protocol re-orders them at evaluation.

Also the external video-level class scores that rescore them (:func:`read_video_scores`).

Writers go through a temporary file and a rename, so a crash never leaves half a file.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gcm_core.data.atomic import atomic_write_text
from gcm_core.data.cards import CardError, DatasetCard
from gcm_core.data.model import Detections, FormatError, video_key


def read_detections(path: str | Path, card: DatasetCard | None = None, convention: str = "official") -> Detections:
    """Detections from an ActivityNet result JSON (``.json``) or THUMOS'14 text (other suffixes).

    THUMOS text needs ``card`` to map class indices (``convention``) to names; detections whose
    index is not a class of the card are kept with the label ``"#<index>"`` so protocols can
    ignore them, as the official evaluator does, unless another of the card's conventions makes
    every index of the file a class: then the file is that convention's, and reading it under
    this one would drop most detections and misname the rest (zero-based 7 is not the official 7).
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "no such file")
    if path.suffix == ".json":
        return _read_result_json(path)
    if card is None:
        raise FormatError(path, "THUMOS detection text has class indices: a dataset card is needed to name them")
    return _read_thumos_text(path, card, convention)


def _read_result_json(path: Path) -> Detections:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FormatError(path, f"malformed JSON: {err.msg}", line=err.lineno) from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict):
        raise FormatError(path, "expected an object with a 'results' mapping", field="results")
    video, label, start, end, score = [], [], [], [], []
    for vid, items in results.items():
        for k, item in enumerate(items):
            try:
                s, e = item["segment"]
                numbers = float(s), float(e), float(item["score"])
                label.append(str(item["label"]))
            except (KeyError, TypeError, ValueError):
                raise FormatError(path, "detection needs 'label', 'score' and a two-number 'segment'",
                                  video=vid, field=f"results[{k}]") from None
            if not all(map(math.isfinite, numbers)):
                raise FormatError(path, f"segment and score must be finite, got {item['segment']} and {item['score']}",
                                  video=vid, field=f"results[{k}]")
            start.append(numbers[0])
            end.append(numbers[1])
            score.append(numbers[2])
            video.append(vid)
    return Detections(video, label, np.array(start), np.array(end), np.array(score))


INDEX_CONVENTIONS = ("official", "zero_based", "one_based")   # how THUMOS text may number the classes


def _read_thumos_text(path: Path, card: DatasetCard, convention: str) -> Detections:
    video, label, start, end, score = [], [], [], [], []
    names = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            raise FormatError(path, f"expected 'video start end class_index score', got {line.strip()!r}",
                              line=line_no)
        try:
            s, e, idx, sc = float(parts[1]), float(parts[2]), int(parts[3]), float(parts[4])
        except ValueError:
            raise FormatError(path, f"not numbers: {line.strip()!r}", video=parts[0], line=line_no) from None
        if not all(map(math.isfinite, (s, e, sc))):
            raise FormatError(path, f"start, end and score must be finite: {line.strip()!r}", video=parts[0],
                              line=line_no)
        if idx not in names:
            try:
                names[idx] = card.classes[card.class_index(idx, convention)]
            except CardError:
                names[idx] = f"#{idx}"
        video.append(parts[0])
        label.append(names[idx])
        start.append(s)
        end.append(e)
        score.append(sc)
    unknown = sorted(idx for idx, name in names.items() if name.startswith("#"))
    fitting = [c for c in INDEX_CONVENTIONS if c != convention and _names_every_index(card, names, c)]
    if unknown and fitting:
        raise FormatError(path, f"class indices {', '.join(map(str, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}"
                                f" are not classes of card {card.name!r} under the {convention} convention, and every "
                                f"class index of the file is one under {' or '.join(fitting)}: give the file's "
                                f"(--label-convention {' or '.join(fitting)})")
    return Detections(video, label, np.array(start), np.array(end), np.array(score))


def _names_every_index(card: DatasetCard, indices: Iterable[int], convention: str) -> bool:
    try:
        for idx in indices:
            card.class_index(idx, convention)
    except CardError:
        return False
    return True


def result_json(detections: Detections, version: str = "VERSION 1.3") -> dict[str, Any]:
    """The ActivityNet result JSON object: videos in first-seen order, detections in input order.

    Videos are keyed as the official evaluation knows them: an ActivityNet id as the bare YouTube
    id, whether the features and annotations spelled it so or with BSN's ``v_``
    (:func:`~gcm_core.data.model.video_key`); a submission keyed ``v_<id>`` would match nothing.
    """
    results: dict[str, list[dict]] = {}
    for v, lab, s, e, sc in zip(detections.video, detections.label, detections.start, detections.end,
                                detections.score):
        results.setdefault(video_key(v), []).append({"label": lab, "score": float(sc), "segment": [float(s), float(e)]})
    return {"version": version, "results": results, "external_data": {}}


def write_result_json(path: str | Path, detections: Detections, version: str = "VERSION 1.3") -> None:
    """:func:`result_json` written to ``path``."""
    atomic_write_text(path, json.dumps(result_json(detections, version)))


def write_thumos_text(path: str | Path, detections: Detections, card: DatasetCard,
                      convention: str = "official") -> None:
    """THUMOS'14 text with class indices under ``convention``."""
    codes = {name: card.label_code(k, convention) for k, name in enumerate(card.classes)}
    lines = [f"{v} {_fmt(s)} {_fmt(e)} {codes[lab]} {_fmt(sc)}"
             for v, lab, s, e, sc in zip(detections.video, detections.label, detections.start,
                                         detections.end, detections.score)]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def _fmt(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else str(x)


def read_untrimmednet_scores(path: str | Path, card: DatasetCard) -> dict[str, np.ndarray]:
    """UntrimmedNet video-level scores as {video: [K] scores in the card's class order}.

    The public THUMOS'14 file is a float array [1574, 101]: row i is ``video_test_{i+1:07d}``,
    column k - 1 the UCF101 class k (the official index of the card's classes).
    """
    if card.official_index is None:
        raise CardError(f"card {card.name!r} has no official class indices to select UntrimmedNet columns")
    try:
        scores = np.load(path, allow_pickle=False)
    except ValueError as err:   # an object array (pickled) or a file that is no .npy
        raise FormatError(path, f"not a numeric .npy array ({err})") from None
    if scores.ndim != 2 or scores.shape[1] < max(card.official_index) or not np.issubdtype(scores.dtype, np.number):
        raise FormatError(path, f"expected [videos, 101] numeric scores, got {scores.dtype} of shape {scores.shape}")
    columns = np.array(card.official_index) - 1
    rows = {f"video_test_{i + 1:07d}": scores[i, columns].astype(np.float64) for i in range(scores.shape[0])}
    for video, row in rows.items():
        if not np.isfinite(row).all():
            raise FormatError(path, "a score that is not finite", video=video)
    return rows


def read_video_scores(path: str | Path, classes: Sequence[str], card: DatasetCard | None = None
                      ) -> dict[str, np.ndarray]:
    """External video-level class scores as {video: [K] scores in the order of ``classes``},
    videos named by :func:`~gcm_core.data.model.video_key`.

    - ``.json``: class names and a row of scores per video, ``{"class": [names], "results":
      {video: [scores]}}``: the layout of the ActivityNet v1.3 classification scores that BSN, BMN
      and the paper's ActivityNet "with video labels" rows take (CUHK's
      ``cuhk_val_simp_share.json``); columns are matched to ``classes`` by name, so the file may
      hold more classes, in any order;
    - ``.npy``: UntrimmedNet's THUMOS'14 layout (:func:`read_untrimmednet_scores`), which needs
      the ``card``'s official class indices.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "no such file")
    if path.suffix == ".json":
        return _read_class_scores_json(path, classes)
    if path.suffix != ".npy":
        raise FormatError(path, "video scores are read from .json (class names and a row per video) or "
                                ".npy (UntrimmedNet's THUMOS'14 layout)")
    if card is None:
        raise CardError(f"{path}: scores in UntrimmedNet's THUMOS'14 layout are read by a card's official class "
                        "indices: give the dataset's card (thumos14)")
    return read_untrimmednet_scores(path, card)


def _read_class_scores_json(path: Path, classes: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FormatError(path, f"malformed JSON: {err.msg}", line=err.lineno) from None
    names = data.get("class") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FormatError(path, "expected a list of class names", field="class")
    results = data.get("results")
    if not isinstance(results, dict):
        raise FormatError(path, "expected a mapping of video to its class scores", field="results")
    column = {name: k for k, name in enumerate(names)}
    missing = [c for c in classes if c not in column]
    if missing:
        raise FormatError(path, f"has no scores of {len(missing)} of the dataset's {len(classes)} classes, "
                                f"e.g. {missing[:3]}", field="class")
    columns = np.array([column[c] for c in classes], dtype=np.int64)
    scores = {}
    for video, row in results.items():
        try:
            values = np.asarray(row, dtype=np.float64)
        except (TypeError, ValueError):
            values = None
        if values is None or values.shape != (len(names),) or not np.isfinite(values).all():
            raise FormatError(path, f"expected {len(names)} finite scores, one per class", video=video,
                              field="results")
        scores[video_key(video)] = values[columns]
    return scores
