"""Parallel evaluation: many checkpoints x many datasets at once, as Ray tasks.

A dataset is a preprocessed one, or (for D-SSAD checkpoints, which read snippet features and no
proposals) a card and a data root read directly. Each (checkpoint, dataset) pair is one task (with
``gpus_per_pair`` of a GPU, on which it runs, where the cluster has GPUs): inference on every test
video without sampling (a two-stage head on the prepared units, or D-SSAD on the snippet
features), post-processed by the checkpoint's inference settings (or, where ``inference`` gives
some, by those), detections written as ActivityNet result JSON, mAP under the dataset's protocol
(or the one asked for); the driver gathers one summary table (``summary.md`` and ``summary.csv``).
"""
from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gcm_core.checkpoint import Checkpoint, check_feature_widths
from gcm_core.data.atomic import atomic_write_text
from gcm_core.data.cards import DatasetCard, absolute_card, data_root_path, load_card
from gcm_core.data.dataset import DatasetSource
from gcm_core.data.detections import read_video_scores
from gcm_core.data.formats import write_result_json
from gcm_core.data.model import Detections, Video
from gcm_core.engine import split_detections
from gcm_core.evaluation import evaluate_detections
from gcm_core.postprocess import VideoLabels
from workflows.config import EvaluateConfig, check_output_folder
from workflows.detect import Detector
from workflows.progress import Progress
from workflows.settings import ConfigError, dump
from workflows.shards import (
    SKIPPED, check_caps, check_split, check_unit_parts, left_out, load_manifest, prepared_from, shard_videos,
)
from workflows.tables import markdown_table
from workflows.train_one_stage import WEIGHTS, OneStageCheckpoint, detect_test_split, is_one_stage_checkpoint


class EvaluationError(RuntimeError):
    """Pairs whose evaluation failed, each named with its error (the others' results are written)."""


@dataclass(frozen=True)
class EvalDataset:
    """A dataset whose test split is evaluated: a preprocessed folder, or a card and a data root
    read directly (D-SSAD checkpoints only: they read snippet features, no proposals)."""

    folder: str | None = None
    card: str | None = None
    data_root: str | None = None
    leave_out: tuple[str, ...] = ()   # read directly with skip_bad: the test videos that fail their checks

    @property
    def name(self) -> str:
        """How the summary names it: the folder, or the card and the data root."""
        return self.folder or f"{self.card} in {self.data_root or '$GCM_DATA_ROOT'}"

    @property
    def folder_name(self) -> str:
        return Path(self.folder).name if self.folder else data_root_path(self.data_root).resolve().name

    def absolute(self) -> "EvalDataset":
        """The same dataset by absolute paths (tasks need not run in our directory)."""
        if self.folder:
            return EvalDataset(folder=str(Path(self.folder).resolve()))
        return EvalDataset(card=absolute_card(self.card), data_root=str(data_root_path(self.data_root).resolve()),
                           leave_out=self.leave_out)

    def open(self) -> tuple[DatasetCard, str | None, dict[str, Any] | None]:
        """Its card, its data root (None: ``$GCM_DATA_ROOT``) and, for a preprocessed one, its manifest."""
        if self.folder:
            manifest = load_manifest(self.folder)
            return *prepared_from(self.folder, manifest), manifest
        return load_card(self.card), self.data_root, None


def datasets_of(config: EvaluateConfig) -> list[EvalDataset]:
    """The preprocessed datasets, then those read directly (cards paired with data roots in order;
    none given: ``$GCM_DATA_ROOT`` for every card)."""
    roots = list(config.data_roots) or [None] * len(config.cards)
    if len(roots) != len(config.cards):
        raise ConfigError(f"{len(config.cards)} cards but {len(roots)} data roots: give one data root per card")
    return ([EvalDataset(folder=d) for d in config.data]
            + [EvalDataset(card=c, data_root=r) for c, r in zip(config.cards, roots)])


def pair_folders(pairs: list[tuple[str, EvalDataset]]) -> list[str]:
    """A folder name per (checkpoint, dataset) pair: the run's and the dataset's folder names
    (an epoch's checkpoint: the run's and the epoch's, ``a_epoch-0019``), numbered where two pairs
    would share one (``runs/a/model.pt`` and ``old/a/model.pt``)."""
    names = []
    for checkpoint, dataset in pairs:
        ckpt = Path(checkpoint)
        run = ckpt.parent.name if ckpt.name in ("model.pt", WEIGHTS) else ckpt.stem  # a run's weights: its name
        if re.fullmatch(r"epoch-\d+", run):
            run = f"{ckpt.parent.parent.name}_{run}"
        names.append(f"{run}__{dataset.folder_name}")
    shared, seen = Counter(names), Counter()
    folders = []
    for name in names:
        seen[name] += 1
        folders.append(f"{name}-{seen[name]}" if shared[name] > 1 else name)
    return folders


def evaluate_pair(checkpoint: str, dataset: EvalDataset, folder: str, protocol: str | None,
                  tiou: list[float] | None, inference: dict[str, Any] | None = None,
                  video_scores: str | None = None, video_top: int = 2) -> dict[str, Any]:
    """Evaluate one checkpoint (a two-stage ``model.pt`` or a D-SSAD ``dssad.pt``) on one
    dataset's test split into ``folder`` (runs as a Ray task, on the GPU Ray gave it if any),
    post-processed by its own inference settings with ``inference`` in their place, and with
    the external video labels of ``video_scores`` if given (:class:`VideoLabels`)."""
    import ray

    from workflows.ray_env import task_device

    torch.set_num_threads(1)
    gpus = [str(g) for g in ray.get_gpu_ids()]
    device = task_device()
    card, data_root, manifest = dataset.open()
    labels = None if video_scores is None else VideoLabels(read_video_scores(video_scores, card.classes, card),
                                                            video_top)
    detector = Detector.load(Path(checkpoint), device, inference)
    if detector.one_stage:
        classes, truth, detections = _one_stage_detections(detector.model, card, data_root,
                                                           left_out(manifest) | set(dataset.leave_out), device,
                                                           labels)
    else:
        classes, truth, detections = _two_stage_detections(detector.model, dataset.folder, manifest, device,
                                                           labels)
    if list(card.classes) != classes:
        raise ValueError(f"{checkpoint} was trained on other classes than dataset {dataset.name} "
                         f"({len(classes)} vs {card.num_classes})")
    protocol = protocol or card.protocol
    thresholds = tiou or list(card.tiou)
    result = evaluate_detections(truth, detections, classes, protocol, thresholds)
    write_result_json(Path(folder) / "detections.json", detections)
    summary = result.as_dict(classes)
    atomic_write_text(Path(folder) / "metrics.json", json.dumps(summary, indent=1))
    return {"checkpoint": checkpoint, "data": dataset.name, "videos": len(truth), "protocol": protocol,
            "tiou": list(thresholds), "mAP": summary["mAP"], "average": summary["average"],
            "detections": str(Path(folder) / "detections.json"), "device": str(device), "gpus": gpus}


def _two_stage_detections(ckpt: Checkpoint, data: str, manifest: dict[str, Any], device: torch.device,
                          video_labels: VideoLabels | None) -> tuple[list[str], dict[str, Video], Detections]:
    """Classes, test ground truth and fused detections of a two-stage head on the prepared units,
    scored a shard at a time (a split's units at once would need a host's memory per pair), in
    the order of the videos' ids."""
    widths = {key.split(":")[0]: width for key, width in manifest["dims"].items() if key.endswith(":body")}
    check_feature_widths(ckpt.dims, widths, Path(data) / "manifest.json")
    comp = ckpt.model_config.completeness_features
    check_unit_parts(data, manifest, list(ckpt.heads), comp)
    check_caps(data, manifest, ckpt.graph)
    classes = list(ckpt.classes)
    truth, detections = split_detections(shard_videos(data, "test", manifest), ckpt.heads, ckpt.graph, comp,
                                         ckpt.stats, classes, ckpt.inference, device, video_labels=video_labels)
    return classes, truth, detections["fused"]


def _one_stage_detections(run: OneStageCheckpoint, card: DatasetCard, data_root: str | None, leave_out: set[str],
                          device: torch.device, video_labels: VideoLabels | None
                          ) -> tuple[list[str], dict[str, Video], Detections]:
    """The same for D-SSAD, which reads the dataset's snippet features, less the videos to
    ``leave_out`` (those its preprocessing, or this evaluation's skip_bad, left out)."""
    truth, detections = detect_test_split(run.models, run.stage, card, data_root, leave_out, device, video_labels)
    return run.classes, truth, detections["fused"]


def run_evaluate(config: EvaluateConfig, quiet: bool = False) -> list[dict[str, Any]]:
    """Every checkpoint on every dataset, in parallel on the connected Ray; writes the summary."""
    import ray

    from workflows.ray_env import gpu_share

    datasets = datasets_of(config)
    if not config.checkpoints or not datasets:
        raise ValueError("give at least one --checkpoint and one dataset: --data (a preprocessed dataset), or for "
                         "D-SSAD checkpoints --card (and --data-root)")
    skipped = _check_inputs(config.checkpoints, datasets, config.skip_bad, config.video_scores)
    datasets = [replace(d, leave_out=tuple(entry["video"] for entry in skipped.get(d.name, []))) for d in datasets]
    out = Path(config.out)
    check_output_folder(out, EvaluateConfig)
    if (out / "summary.md").exists() and not config.overwrite:
        raise FileExistsError(f"{out} holds a previous evaluation: pass --overwrite to replace it, or another --out")
    if config.skip_bad:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / SKIPPED, json.dumps(skipped, indent=1))
        if any(skipped.values()) and not quiet:
            print(f"evaluate: left out {sum(map(len, skipped.values()))} test video(s) that fail their checks; "
                  f"listed in {out / SKIPPED}", file=sys.stderr, flush=True)
    gpus = gpu_share(config.use_gpu, config.gpus_per_pair, "evaluation on GPUs", "leave use_gpu unset or false")
    task = ray.remote(num_cpus=1, num_gpus=gpus)(evaluate_pair)
    pairs = [(c, d) for c in config.checkpoints for d in datasets]
    tiou = list(config.tiou) if config.tiou else None
    # tasks get absolute paths (workers need not share our directory); the table keeps the ones given
    pending = {task.remote(str(Path(c).resolve()), d.absolute(), str((Path(config.out) / folder).resolve()),
                           config.protocol, tiou, config.inference, _absolute(config.video_scores),
                           config.video_top): (c, d.name)
               for (c, d), folder in zip(pairs, pair_folders(pairs))}
    total = len(pending)
    progress = Progress(total, "evaluations", "evaluate: ", quiet)
    rows, failures = [], []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        checkpoint, data = pending.pop(done[0])
        try:
            rows.append({**ray.get(done[0]), "checkpoint": checkpoint, "data": data})
        except ray.exceptions.RayTaskError as err:  # one bad pair must not cost the others' results
            failures.append(f"  {checkpoint} on {data}: {err.cause}")
        progress.update()
    progress.close()
    rows.sort(key=lambda r: (r["data"], r["checkpoint"]))
    atomic_write_text(out / "summary.md", summary_markdown(rows, config))
    atomic_write_text(out / "summary.csv", summary_csv(rows))
    atomic_write_text(out / "config.yaml", dump(config))
    if failures:
        raise EvaluationError(f"{len(failures)} of {total} evaluations failed (the other {len(rows)} are in "
                              f"{out / 'summary.md'}):\n" + "\n".join(sorted(failures)))
    return rows


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _check_inputs(checkpoints: tuple[str, ...], datasets: list[EvalDataset], skip_bad: bool = False,
                  video_scores: str | None = None) -> dict[str, list[dict[str, str]]]:
    """Fail before any task starts, in one line: a missing checkpoint, a dataset that cannot be
    read (where a D-SSAD checkpoint reads its snippet features: a video's missing feature file
    too), a two-stage head paired with a dataset read directly (it scores prepared proposals) or
    with a preprocessed one without a test split, video scores that cannot be read by a dataset's
    classes or lack one of its test videos. With ``skip_bad``, the datasets read directly have
    every test video's features read and checked instead; returns, by dataset name, those failing
    ({video, error})."""
    if skip_bad and not any(d.card for d in datasets):
        raise ConfigError("skip_bad leaves out the bad test videos of datasets read directly (--card): a "
                          "preprocessed --data holds what its gcm preprocess kept (--skip-bad there leaves them out)")
    skipped: dict[str, list[dict[str, str]]] = {}
    for checkpoint in checkpoints:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"no checkpoint {checkpoint} (a model.pt or dssad.pt written by gcm train)")
    two_stage = [c for c in checkpoints if not is_one_stage_checkpoint(c)]
    one_stage = len(two_stage) < len(checkpoints)
    for dataset in datasets:
        card, data_root, manifest = dataset.absolute().open()   # paths named as the tasks read them
        if dataset.card or one_stage:
            source = DatasetSource(card, data_root, "test", left_out(manifest))
            reads_all = skip_bad and dataset.card is not None
            source.check_layout(proposals=False, every_video=not reads_all)
            if reads_all:
                skipped[dataset.name] = [{"video": video, "error": error}
                                         for video, error in source.failing_videos().items()]
        if dataset.folder and two_stage:
            check_split(dataset.folder, manifest, "test")
        if video_scores is not None:
            left = {entry["video"] for entry in skipped.get(dataset.name, [])}
            tests = source.videos if dataset.card else _prepared_test_videos(manifest)
            VideoLabels(read_video_scores(video_scores, card.classes, card)).check_covers(
                [v for v in tests if v not in left], video_scores, f"test videos of {dataset.name}")
    direct = [d.name for d in datasets if d.card]
    if direct and two_stage:
        raise ValueError(f"{two_stage[0]} is not a D-SSAD checkpoint (dssad.pt): a two-stage head scores the units of "
                         f"a preprocessed dataset and cannot be evaluated on {direct[0]} (read directly); evaluate it "
                         "on --data in a command of its own")
    return skipped


def _prepared_test_videos(manifest: dict[str, Any]) -> list[str]:
    """The ids of a preprocessed dataset's test videos, as its shards list them."""
    return [v for shard in manifest["shards"] if shard["role"] == "test" for v in shard["videos"]]


def summary_markdown(rows: list[dict[str, Any]], config: EvaluateConfig) -> str:
    """One table per dataset, protocol and thresholds; a line first says how the detections were
    labelled where ``config`` gives external video labels."""
    blocks = []
    if config.video_scores is not None:
        blocks.append(f"With external video labels: every video's detections are of its {config.video_top} best "
                      f"classes in {config.video_scores}, scores times the video's score of the class.\n")
    for key in sorted({(r["data"], r["protocol"], tuple(r["tiou"])) for r in rows}):
        data, protocol, tiou = key
        mine = [r for r in rows if (r["data"], r["protocol"], tuple(r["tiou"])) == key]
        headers = ["checkpoint", *(f"mAP@{t:g}" for t in tiou), "average"]
        table = markdown_table(headers, [[r["checkpoint"], *r["mAP"], r["average"]] for r in mine])
        blocks.append(f"### {data} (protocol {protocol}, {mine[0]['videos']} test videos, mAP %)\n\n{table}\n")
    return "\n".join(blocks)


def summary_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["checkpoint", "data", "protocol", "tiou", "mAP", "average"])
    for r in rows:
        writer.writerow([r["checkpoint"], r["data"], r["protocol"], " ".join(f"{t:g}" for t in r["tiou"]),
                         " ".join(f"{m:.2f}" for m in r["mAP"]), f"{r['average']:.2f}"])
    return buffer.getvalue()
