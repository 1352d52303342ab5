"""Preprocessing with Ray Data: every video of a card's dataset -> Parquet shards + manifest.

One row per video (its id and role) goes through Ray Data, in blocks of one shard each
(:func:`shard_count`: shard sizes within one video of each other, as many shards as a multiple of
the workers, so that no worker idles while another writes the last one; :func:`balanced_order`:
the long videos spread over the shards, the costliest shards first). A worker (an actor,
with a GPU when the cluster has them) loads each video's features and proposals, pools unit
features, computes candidate edges and training labels
(:func:`gcm_core.data.prepared.prepare_video`) and writes the shard atomically with a JSON
summary beside it. Nothing but ids and summaries passes through the driver.

Restartable: a shard whose Parquet file and summary exist is skipped unless ``overwrite``, if the
rerun prepares the same dataset the same way (``config.yaml``, written before the first shard,
says how the shards were made); otherwise the rerun is refused. A broken video stops the stage
with an error naming it after the other shards are written (past 20 such videos, the error shows
20 and ``failed_videos.txt`` lists them all), or, with ``skip_bad``, is left out and listed in the
manifest. A data root without a stream's features folder or a role's proposal list stops it
before anything is written. See :mod:`workflows.shards` for the layout.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import shutil
import time
from dataclasses import asdict, replace
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcm_core.data.atomic import atomic_copy, atomic_write_text
from gcm_core.data.cards import DatasetCard, data_root_path, load_card
from gcm_core.data.dataset import DatasetSource
from gcm_core.data.model import FormatError
from gcm_core.data.prepared import prepare_video
from gcm_core.data.sampling import FOREGROUND, RegressionStats
from gcm_core.data.yamlio import read_yaml
from workflows.config import PreprocessConfig, check_output_folder
from workflows.progress import Progress
from workflows.provenance import code_version
from workflows.settings import changed_settings, describe_changes, dump, from_dict, to_dict
from workflows.shards import video_to_row, write_shard

FORMAT = "gcm-tal/preprocessed/1"


class PreprocessError(RuntimeError):
    """Videos that could not be prepared, each named with its file and problem."""


def shard_name(role: str, video_ids: list[str]) -> str:
    """A shard's file stem: its role and a digest of the videos it holds (stable, filesystem-safe)."""
    digest = hashlib.sha1("\n".join(sorted(video_ids)).encode()).hexdigest()[:12]
    return f"{role}-{digest}"


class ShardWriter:
    """Ray Data UDF: prepares the videos of one shard and writes it (runs on a worker)."""

    def __init__(self, card_path: str, data_root: str | None, out: str, config: dict[str, Any]) -> None:

        import pyarrow

        torch.set_num_threads(1)  # one core per worker: workers, not threads, give the parallelism
        pyarrow.set_cpu_count(1)
        import ray

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.gpus = [str(g) for g in ray.get_gpu_ids()]  # logical GPUs this actor was given
        self.card = load_card(card_path)
        self.config = from_dict(PreprocessConfig, config)
        self.data_root, self.out = data_root, Path(out)
        self.sources: dict[str, DatasetSource] = {}

    def source(self, role: str) -> DatasetSource:
        if role not in self.sources:
            self.sources[role] = DatasetSource(self.card, self.data_root, role)
        return self.sources[role]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        summary: dict[str, list] = {"video_id": [], "role": [], "shard": [], "status": [], "units": [], "edges": [],
                                    "error": []}
        for role in sorted(set(map(str, batch["role"]))):
            ids = sorted(str(v) for v, r in zip(batch["video_id"], batch["role"]) if str(r) == role)
            self._write_shard(role, ids, summary)
        return summary

    def _write_shard(self, role: str, ids: list[str], summary: dict[str, list]) -> None:
        started = time.time()
        source, shard = self.source(role), shard_name(role, ids)
        rows, targets, mine = [], [], {k: [] for k in summary}
        for video_id in ids:
            try:
                prepared = prepare_video(source.load(video_id), self.card.classes, role == "train",
                                         caps=self.config.caps, sampling=self.config.sampling,
                                         parts=self.config.parts, reduce=self.config.reduce,
                                         max_units=self.card.units_per_video_test, device=self.device)
            except (FormatError, ValueError) as err:
                summary_row(mine, video_id, role, shard, "error", 0, 0, str(err))
                continue
            rows.append(video_to_row(prepared, role))
            if prepared.labels is not None:
                targets.append(prepared.labels.reg_target[prepared.labels.role == FOREGROUND].numpy())
            edges = sum(c.num_edges for c in prepared.candidates.values())
            summary_row(mine, video_id, role, shard, "ok", prepared.num_units, edges, "")
        if rows and (self.config.skip_bad or "error" not in mine["status"]):
            write_shard(self.out / "shards" / f"{shard}.parquet", rows)
            side = {"summary": mine, "targets": np.concatenate(targets).tolist() if targets else [],
                    "worker": {"device": self.device, "gpus": self.gpus, "started": started, "finished": time.time()}}
            atomic_write_text(self.out / "shards" / f"{shard}.json", json.dumps(side))
        for key, values in mine.items():
            summary[key] += values


def summary_row(summary: dict[str, list], video: str, role: str, shard: str, status: str, units: int,
                edges: int, error: str) -> None:
    for key, value in (("video_id", video), ("role", role), ("shard", shard), ("status", status),
                       ("units", units), ("edges", edges), ("error", error)):
        summary[key].append(value)


def _finished_shards(out: Path) -> dict[str, dict[str, Any]]:
    """Summaries of the shards already written (a Parquet file with its JSON summary beside it)."""
    found = {}
    for side in sorted((out / "shards").glob("*.json")):
        if side.with_suffix(".parquet").is_file():
            found[side.stem] = json.loads(side.read_text())
    return found


def run_preprocess(config: PreprocessConfig, quiet: bool = False) -> dict[str, Any]:
    """Run the stage on the connected Ray; returns the manifest it wrote."""
    import ray.data

    from workflows.ray_env import gpu_share, refuse_ray_client

    refuse_ray_client("preprocess")
    # the data root as an absolute path: workers, and the stages that read the manifest later, run
    # in other directories
    config = replace(config, data_root=str(data_root_path(config.data_root).resolve()))
    card = load_card(config.card)
    plan = _plan(card, config)  # reads the annotations: a wrong card or data root stops before anything is written
    out = Path(config.out)
    check_output_folder(out, PreprocessConfig)
    card_copy = out / "card.yaml"
    if config.overwrite and (out / "shards").exists():
        shutil.rmtree(out / "shards")
    elif _finished_shards(out):
        _check_same_preparation(out, card, config)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / FAILURES).unlink(missing_ok=True)   # an earlier attempt's
    if card.source is not None and card.source.resolve() != card_copy.resolve():
        atomic_copy(card.source, card_copy)
    atomic_write_text(out / "config.yaml", dump(config))  # before any shard: what the shards were made with
    done = {(r, v) for side in _finished_shards(out).values()
            for v, r in zip(side["summary"]["video_id"], side["summary"]["role"])}
    todo = [row for row in plan if (row["role"], row["video_id"]) not in done]
    progress = Progress(len(plan), "videos", "preprocess: ", quiet)
    progress.skip(len(plan) - len(todo))
    failures = []
    if todo:
        use_gpu = gpu_share(config.use_gpu, 1.0, "preprocessing on GPU workers", "leave use_gpu unset or false") > 0
        workers = max(1, config.num_workers)
        shards = shard_count(len(todo), config.videos_per_shard, workers)
        ds = ray.data.from_items(balanced_order(todo, shards), override_num_blocks=shards)
        # a block is a batch is a shard; Ray asks for a batch size with GPUs (it may then pair
        # blocks one row short of it, which only changes how the shards are cut)
        results = ds.map_batches(
            ShardWriter, batch_size=-(-len(todo) // shards) if use_gpu else None, batch_format="numpy",
            fn_constructor_kwargs={"card_path": str(card_copy.resolve()), "data_root": config.data_root,
                                   "out": str(out.resolve()), "config": to_dict(config)},
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1, num_gpus=1 if use_gpu else 0)
        for row in results.iter_rows():
            progress.update()
            if row["status"] != "ok":
                failures.append({"video": str(row["video_id"]), "role": str(row["role"]), "error": str(row["error"])})
    progress.close()
    every = len(failures) == len(plan)   # nothing to leave out: a dataset of no video is no result
    if failures and (every or not config.skip_bad):
        raise PreprocessError(_failure_report(sorted(f"  {f['video']}: {f['error']}" for f in failures), out, every))
    manifest = _manifest(card, config, out, failures)
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


FAILURES = "failed_videos.txt"   # every video that could not be prepared, when there are too many to print
SHOWN_FAILURES = 20


def _failure_report(failures: list[str], out: Path, every: bool) -> str:
    """The videos that could not be prepared, each with its problem; past :data:`SHOWN_FAILURES`
    the rest go to a file in ``out`` (a wrong file naming fails every video, thousands of lines)."""
    head = (f"every video ({len(failures)}) could not be prepared: fix the input and rerun:\n" if every else
            f"{len(failures)} video(s) could not be prepared (the other shards are written; fix the input and "
            "rerun, or rerun with --skip-bad to leave them out):\n")
    if len(failures) <= SHOWN_FAILURES:
        return head + "\n".join(failures)
    atomic_write_text(out / FAILURES, "\n".join(f.strip() for f in failures) + "\n")
    return (head + "\n".join(failures[:SHOWN_FAILURES])
            + f"\n  ... and {len(failures) - SHOWN_FAILURES} more, all listed in {out / FAILURES}")


SHARD_CONTENT = ("data_root", "parts", "reduce", "caps", "sampling")   # settings a shard's rows depend on


def _check_same_preparation(out: Path, card: DatasetCard, config: PreprocessConfig) -> None:
    """A rerun adds the missing shards to an earlier run's: only where both prepare the same
    dataset the same way, or the output would mix two preparations under one manifest."""
    changed = []
    if card.source is not None and (out / "card.yaml").is_file() \
            and card.source.read_text() != (out / "card.yaml").read_text():
        changed.append(f"the card ({config.card} is not {out / 'card.yaml'})")
    if (out / "config.yaml").is_file():
        earlier, now = read_yaml(out / "config.yaml"), to_dict(config)
        changes = changed_settings({k: earlier.get(k) for k in SHARD_CONTENT}, {k: now[k] for k in SHARD_CONTENT})
        if changes:
            changed.append(describe_changes(changes))
    if changed:
        raise FileExistsError(f"{out} holds shards prepared otherwise: {'; '.join(changed)}. Pass --overwrite to "
                              "prepare every video again, or give another --out")


def shard_count(videos: int, videos_per_shard: int, workers: int) -> int:
    """How many shards ``videos`` videos go into: about ``videos_per_shard`` each (sizes differ by
    at most one), as many as a multiple of the workers, so that no worker idles while another one
    writes the last shard."""
    shards = -(-videos // max(1, videos_per_shard))
    return max(1, min(videos, -(-shards // workers) * workers))


def balanced_order(rows: list[dict[str, Any]], shards: int) -> list[dict[str, Any]]:
    """``rows`` reordered so that cutting them into ``shards`` contiguous blocks, as Ray Data's
    ``from_items`` does (sizes differ by at most one, the larger first), gives shards of about
    equal work, the costliest first.

    A video's work grows with the square of its unit count (pairwise relations), its unit count
    with its duration; one long video can hold 40% of a dataset's work (the full synthetic
    benchmark). In id order it may land in the last shard and keep every other worker waiting.
    Here each role's videos, longest first, go to the block of that role's span with the least
    duration^2 so far that has room, so the longest videos start first, each among short ones.
    Rows stay grouped by role and every block keeps its size, so shards are cut as before.
    """
    size, extra = divmod(len(rows), shards)
    bounds = [b * size + min(b, extra) for b in range(shards + 1)]
    ordered: list[dict[str, Any]] = []
    for _, group in groupby(rows, key=lambda row: row["role"]):
        start, members = len(ordered), list(group)
        end = start + len(members)
        room = [min(bounds[b + 1], end) - max(bounds[b], start) for b in range(shards)
                if bounds[b] < end and bounds[b + 1] > start]
        blocks: list[list[dict[str, Any]]] = [[] for _ in room]
        lightest = [(0.0, k) for k in range(len(room))]
        for row in sorted(members, key=lambda r: -r["duration"]):
            load, k = heapq.heappop(lightest)
            blocks[k].append(row)
            if len(blocks[k]) < room[k]:
                heapq.heappush(lightest, (load + row["duration"] ** 2, k))
        ordered += [row for block in blocks for row in sorted(block, key=lambda r: r["video_id"])]
    return ordered


def _plan(card: DatasetCard, config: PreprocessConfig) -> list[dict[str, Any]]:
    """One row per video: its id, role and duration (seconds), grouped by role."""
    rows = []
    for role in config.roles:
        source = DatasetSource(card, config.data_root, role)
        source.check_layout(proposals=True)
        rows += [{"video_id": v, "role": role, "duration": float(source.videos[v].duration or 0.0)}
                 for v in source.video_ids]
    return rows


def _manifest(card: DatasetCard, config: PreprocessConfig, out: Path, failures: list[dict[str, str]]
              ) -> dict[str, Any]:
    """The manifest of every finished shard, and of the videos left out: those of the finished
    shards and this run's ``failures`` (a shard in which no video could be prepared is not
    written, and is tried again by a rerun). A video written twice (a batch re-run after a lost
    node, composed differently) is listed in its first shard only, and readers honour the list."""
    shards, counts, targets, seen = [], {}, [], set()
    left_out: dict[tuple[str, str], str] = {}
    for shard, side in _finished_shards(out).items():
        s = side["summary"]
        ok = [k for k, status in enumerate(s["status"]) if status == "ok" and (s["role"][k], s["video_id"][k]) not in seen]
        seen.update((s["role"][k], s["video_id"][k]) for k in ok)
        left_out.update({(s["role"][k], s["video_id"][k]): s["error"][k] for k, st in enumerate(s["status"]) if st != "ok"})
        role = s["role"][0]
        shards.append({"path": f"shards/{shard}.parquet", "role": role, "videos": [s["video_id"][k] for k in ok],
                       "worker": side.get("worker", {})})
        c = counts.setdefault(role, {"videos": 0, "units": 0, "edges": 0})
        c["videos"] += len(ok)
        c["units"] += sum(s["units"][k] for k in ok)
        c["edges"] += sum(s["edges"][k] for k in ok)
        targets += side["targets"] if len(ok) == len(s["status"]) else []
    for failure in failures:
        left_out.setdefault((failure["role"], failure["video"]), failure["error"])
    stats = RegressionStats.fit(torch.tensor(targets, dtype=torch.float64).reshape(-1, 2))
    return {
        "format": FORMAT, "code_version": code_version(), "card": card.name, "card_file": "card.yaml",
        "classes": list(card.classes), "streams": list(card.streams), "parts": list(config.parts),
        "dims": _dims_from_shard(out, shards, config, card), "protocol": card.protocol, "tiou": list(card.tiou),
        "caps": asdict(config.caps), "sampling": asdict(config.sampling), "counts": counts,
        "regression_stats": stats.as_dict(), "shards": shards,
        "skipped": [{"video": video, "error": error} for (_, video), error in sorted(left_out.items())],
        "config": to_dict(config),
    }


def _dims_from_shard(out: Path, shards: list[dict[str, Any]], config: PreprocessConfig, card: DatasetCard) -> dict[str, int]:
    """Feature widths, read off the first shard."""
    import pyarrow.parquet as pq

    table = pq.read_table(out / shards[0]["path"], columns=["intervals"] + [f"feat:{s}:{p}" for s in card.streams
                                                                            for p in config.parts])
    n = len(table.column("intervals")[0]) // 2
    return {f"{s}:{p}": len(table.column(f"feat:{s}:{p}")[0]) // n for s in card.streams for p in config.parts}
