"""The preprocessed dataset on disk: Parquet shards of prepared videos, and their manifest.

Layout of a preprocessed folder::

    manifest.json                 card, feature layout, counts, regression statistics, code version,
                                  config, shards and their videos (with the device that wrote each
                                  and when it started and finished, Unix time), skipped videos
    config.yaml                   the resolved preprocessing configuration
    card.yaml                     the dataset card used
    shards/<role>-<k>.parquet     one row per video
    shards/<role>-<k>.json        the shard's summary (each video's status, units, edges, error),
                                  written last: a shard without it is unfinished

Schema of a shard (one row per video; arrays are flattened row-major, their second dimension is
given by ``manifest.json``'s ``dims``):

=============================  ==================  =========================================
column                         Arrow type          content
=============================  ==================  =========================================
video_id, role                 string              the video and its role (train / test)
duration                       double              seconds
intervals                      list<double>        [N, 2] units (start, end), seconds
feat:<stream>:<part>           list<float>         [N, C] pooled features (part: body,
                                                   extended, three_part)
edges:<stream>:src / dst       list<int32>         candidate edges (i aggregates j)
edges:<stream>:tiou/distance   list<double>        Eq. 4 / Eq. 5 of each candidate
edges:<stream>:cosine          list<float>         feature cosine of each candidate
edges:<stream>:<x>_rank        list<int32>         sur / sem / knn rank (-1: beyond the cap)
gt, gt_labels                  list<double/int32>  [G, 2] instances and their 0-based classes
ambiguous                      list<double>        [A, 2] segments excluded from evaluation
proposal_scores                list<double>        [N] test units' proposal scores (1: a list
                                                   without); test shards only
labels:best_gt, labels:label   list<int32>         training units: best instance, class 1..K
labels:role                    list<int8>          0 bg, 1 fg, 2 incomplete, 3 ignored
labels:tiou, labels:overlap    list<double>
labels:reg_target              list<double>        [N, 2] raw Eq. 15 targets (NaN if not fg)
=============================  ==================  =========================================
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gcm_core.data.atomic import atomic_write
from gcm_core.data.cards import DatasetCard, load_card
from gcm_core.data.prepared import PreparedVideo
from gcm_core.data.sampling import UnitLabels
from gcm_core.candidates import CandidateCaps, CandidateEdges
from gcm_core.graph import GraphSpec

EDGE_COLUMNS = ("tiou", "distance", "cosine", "sur_rank", "sem_rank", "knn_rank")
LABEL_COLUMNS = ("best_gt", "tiou", "overlap", "role", "label", "reg_target")
_NUMPY = {"tiou": np.float64, "distance": np.float64, "cosine": np.float32, "sur_rank": np.int32,
          "sem_rank": np.int32, "knn_rank": np.int32, "best_gt": np.int32, "overlap": np.float64,
          "role": np.int8, "label": np.int32, "reg_target": np.float64}


def _flat(t: torch.Tensor, dtype: Any) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype, copy=False).reshape(-1)


def video_to_row(video: PreparedVideo, role: str) -> dict[str, Any]:
    """A prepared video as one shard row (flat numpy arrays)."""
    row: dict[str, Any] = {"video_id": video.video_id, "role": role, "duration": video.duration,
                           "intervals": _flat(video.intervals, np.float64),
                           "gt": _flat(video.gt, np.float64), "gt_labels": _flat(video.gt_labels, np.int32),
                           "ambiguous": _flat(video.ambiguous, np.float64)}
    if video.proposal_scores is not None:
        row["proposal_scores"] = _flat(video.proposal_scores, np.float64)
    for stream, parts in video.features.items():
        for part, feats in parts.items():
            row[f"feat:{stream}:{part}"] = _flat(feats, np.float32)
    for stream, edges in video.candidates.items():
        row[f"edges:{stream}:src"] = _flat(edges.edge_index[0], np.int32)
        row[f"edges:{stream}:dst"] = _flat(edges.edge_index[1], np.int32)
        for name in EDGE_COLUMNS:
            row[f"edges:{stream}:{name}"] = _flat(getattr(edges, name), _NUMPY[name])
    if video.labels is not None:
        for name in LABEL_COLUMNS:
            row[f"labels:{name}"] = _flat(getattr(video.labels, name), _NUMPY[name])
    return row


def row_to_video(row: dict[str, Any], dims: dict[str, int], caps: CandidateCaps) -> PreparedVideo:
    """Inverse of :func:`video_to_row` (``dims``: width of each ``<stream>:<part>``)."""
    def arr(name: str, dtype: Any = None) -> torch.Tensor:
        return torch.from_numpy(np.asarray(row[name], dtype=dtype).copy())

    intervals = arr("intervals", np.float64).reshape(-1, 2)
    n = intervals.shape[0]
    features: dict[str, dict[str, torch.Tensor]] = {}
    candidates: dict[str, CandidateEdges] = {}
    for key in row:
        if key.startswith("feat:"):
            _, stream, part = key.split(":")
            features.setdefault(stream, {})[part] = arr(key, np.float32).reshape(n, dims[f"{stream}:{part}"])
    for stream in features:
        cols = {"src": arr(f"edges:{stream}:src", np.int64), "dst": arr(f"edges:{stream}:dst", np.int64)}
        cols.update({name: arr(f"edges:{stream}:{name}", _NUMPY[name]) for name in EDGE_COLUMNS})
        candidates[stream] = CandidateEdges.from_columns(n, caps, cols)
    labels = None
    if row.get("labels:role") is not None:
        values = {name: arr(f"labels:{name}", _NUMPY[name]) for name in LABEL_COLUMNS}
        values["reg_target"] = values["reg_target"].reshape(-1, 2)
        values["role"] = values["role"].long()
        values["label"] = values["label"].long()
        values["best_gt"] = values["best_gt"].long()
        labels = UnitLabels(**values)
    proposal_scores = None if row.get("proposal_scores") is None else arr("proposal_scores", np.float64)
    return PreparedVideo(row["video_id"], float(row["duration"]), intervals, features, candidates,
                         arr("gt", np.float64).reshape(-1, 2), arr("gt_labels", np.int64),
                         arr("ambiguous", np.float64).reshape(-1, 2), labels, proposal_scores)


def write_shard(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as one Parquet file atomically (temp file + rename: never half visible)."""
    columns = sorted({k for r in rows for k in r})
    table = pa.table({c: _column([r.get(c) for r in rows]) for c in columns})
    atomic_write(path, lambda f: pq.write_table(table, f, use_dictionary=False, compression="lz4"))


def _column(values: list[Any]) -> pa.Array:
    """Scalars as they are; numpy arrays as one list array built from offsets (no per-element copy)."""
    arrays = [v for v in values if v is not None]
    if not arrays or not isinstance(arrays[0], np.ndarray):
        return pa.array(values)
    lengths = np.array([0 if v is None else len(v) for v in values])
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat = pa.array(np.concatenate(arrays))
    mask = pa.array([v is None for v in values])
    return pa.ListArray.from_arrays(offsets, flat, mask=mask if any(v is None for v in values) else None)


def read_shard_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a shard, list columns as numpy views (no per-element Python conversion)."""
    table = pq.read_table(path)
    rows: list[dict[str, Any]] = [{} for _ in range(table.num_rows)]
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_list(column.type):
            offsets = column.offsets.to_numpy()
            values = column.values.to_numpy(zero_copy_only=False)
            valid = column.is_valid().to_numpy(zero_copy_only=False)
            for i, row in enumerate(rows):
                row[name] = values[offsets[i]:offsets[i + 1]] if valid[i] else None
        else:
            for row, value in zip(rows, column.to_pylist()):
                row[name] = value
    return rows


def caps_from_manifest(manifest: dict[str, Any]) -> CandidateCaps:
    return CandidateCaps(**manifest["caps"])


def load_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a preprocessed dataset (no manifest.json); run gcm preprocess")
    return json.loads(path.read_text())


def check_unit_parts(folder: str | Path, manifest: dict[str, Any], streams: list[str] | tuple[str, ...],
                     part: str | None) -> None:
    """Stop, naming the preprocessed dataset, where it holds no ``part`` unit features (a head's
    completeness input; None: body only, which every dataset holds) of a stream a model reads."""
    if part is not None and any(f"{s}:{part}" not in manifest["dims"] for s in streams):
        raise ValueError(f"{folder} holds no {part} unit features, which the model reads (model.comp_input="
                         f"{part}): preprocess the dataset with --set 'parts=[body, {part}]'")


def check_caps(folder: str | Path, manifest: dict[str, Any], graph: GraphSpec) -> None:
    """Stop, naming the preprocessed dataset, where a model's graph needs candidate edges beyond
    the caps the dataset kept them under (a wider theta_ctx, more semantic neighbours, ...)."""
    uncovered = caps_from_manifest(manifest).uncovered(graph)
    if uncovered:
        raise ValueError(f"{folder} kept candidate edges under caps the model's graph exceeds "
                         f"({'; '.join(uncovered.values())}): keep the graph within them, or preprocess the "
                         f"dataset again into another --out with looser {', '.join(f'caps.{c}' for c in uncovered)}")


def check_split(folder: str | Path, manifest: dict[str, Any], role: str) -> None:
    """Stop, naming the preprocessed dataset, where it holds no videos of ``role`` (prepared with
    other roles, or every one of them skipped as bad)."""
    if not manifest["counts"].get(role, {}).get("videos"):
        raise ValueError(f"{folder} holds no {role} videos (its splits: {sorted(manifest['counts']) or 'none'}): "
                         f"preprocess the dataset with its {role} split (--set 'roles=[train, test]')")


def prepared_from(folder: str | Path, manifest: dict[str, Any]) -> tuple[DatasetCard, str]:
    """The card (the copy beside the shards) and the data root a preprocessed dataset was prepared from."""
    return load_card(Path(folder) / "card.yaml"), manifest["config"]["data_root"]


# where a one-stage run or an evaluation reading a card directly with skip_bad lists the videos it
# left out, with their errors (a preprocessed dataset lists its own in manifest.json's "skipped")
SKIPPED = "skipped_videos.json"


def left_out(manifest: dict[str, Any] | None) -> frozenset[str]:
    """The videos a preprocessed dataset left out as bad (``--skip-bad``); none for a dataset read
    directly (``manifest`` None). A one-stage run on the preprocessed dataset leaves them out too,
    so that it trains and is tested on the videos its two-stage runs are."""
    return frozenset(entry["video"] for entry in manifest["skipped"]) if manifest else frozenset()


def read_videos(folder: str | Path, role: str, manifest: dict[str, Any] | None = None) -> list[PreparedVideo]:
    """Every prepared video of one role, read in the driver (small datasets, tests), by id."""
    return sorted((v for shard in shard_videos(folder, role, manifest) for v in shard), key=lambda v: v.video_id)


def shard_videos(folder: str | Path, role: str, manifest: dict[str, Any] | None = None
                 ) -> Iterator[list[PreparedVideo]]:
    """The prepared videos of one role a shard at a time, each shard's by id: a reader that
    needs one video at a time (evaluation) holds a shard's units, not the split's."""
    manifest = manifest or load_manifest(folder)
    caps = caps_from_manifest(manifest)
    for shard in manifest["shards"]:
        if shard["role"] == role:
            listed = set(shard["videos"])
            yield sorted((row_to_video(r, manifest["dims"], caps) for r in read_shard_rows(Path(folder) / shard["path"])
                          if r["video_id"] in listed), key=lambda v: v.video_id)
