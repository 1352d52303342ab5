"""Distributed training with Ray Train: a TorchTrainer around :mod:`gcm_core.engine`.

Every worker streams the preprocessed videos (``ray.train.get_dataset_shard``) and keeps a
deterministic share of them (video k of the sorted list goes to rank k mod world size), so that a
restarted run sees the same split; the heads of every stream train as one DDP model, with the
run's graph settings applied to the stored candidate edges. Each epoch reports metrics and a
checkpoint: ``model.pt`` (the engine's self-contained checkpoint, loadable without Ray), the
optimiser and schedule state, and each worker's random state, so that a run that lost a worker
resumes from the last checkpoint and ends as an uninterrupted one would. After the last epoch rank
0 evaluates the test split (detections.json, metrics.json), and with ``evaluate_every`` also every
N epochs (the test mAP joins that epoch's metrics, as OpenTAD's validation interval: a curve of
test mAP against epochs). Logs for TensorBoard go to ``<run>/tensorboard``. What a worker does
besides its loop, shared with the one-stage loop, is in :mod:`workflows.train_worker`.
"""
from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import torch

from gcm_core.checkpoint import Checkpoint, save_checkpoint
from gcm_core.data.atomic import atomic_copy, atomic_write_text
from gcm_core.data.cards import DatasetCard, absolute_card, data_root_path, load_card
from gcm_core.data.dataset import DatasetSource
from gcm_core.data.prepared import PreparedVideo
from gcm_core.data.sampling import RegressionStats
from gcm_core.engine import (
    StreamHeads, UnitDataset, build_heads, make_optimizer, seed_everything, split_detections, train_one_epoch,
)
from workflows.config import TrainStageConfig, check_output_folder, earlier_settings, with_card_fusion
from workflows.progress import Progress, read_epoch_log
from workflows.settings import ConfigError, changed_settings, describe_changes, dump, from_dict, to_dict
from workflows.shards import (
    caps_from_manifest, check_caps, check_split, check_unit_parts, left_out, load_manifest, prepared_from,
    SKIPPED, read_shard_rows, row_to_video, shard_videos,
)
from workflows.train_worker import (
    evaluates_after, log_epoch, mean_over_workers, restore_state, save_state, score_test_split, tensorboard_writer,
    worker_setup, worker_steps,
)

if TYPE_CHECKING:
    import ray.data

SNAPSHOT = "checkpoint_manager_snapshot.json"
T = TypeVar("T")


def run_dir(stage: TrainStageConfig) -> Path:
    return Path(stage.out).resolve() / stage.name


# a fraction of a CPU: whole-CPU read tasks would starve beside the training workers (RAY_NOTES.md)
READ_TASK_CPUS = 0.25


def worker_resources(stage: TrainStageConfig, use_gpu: bool) -> dict[str, float]:
    """What each training worker asks Ray for."""
    return {"CPU": stage.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}


def training_resources(stage: TrainStageConfig, use_gpu: bool) -> dict[str, float]:
    """What one fit holds at once: its workers, and room for one task reading its shards (without
    it the workers wait for data forever)."""
    total = {name: stage.num_workers * amount for name, amount in worker_resources(stage, use_gpu).items()}
    return {**total, "CPU": total["CPU"] + READ_TASK_CPUS}


def shard_dataset(folder: str | Path, manifest: dict[str, Any], role: str) -> "ray.data.Dataset":
    """A Ray dataset of one role's videos, one row per video, read from the shards on the workers
    (only the videos the manifest lists for each shard)."""
    import ray.data

    items = [{"path": str(Path(folder).resolve() / s["path"]), "videos": s["videos"]}
             for s in manifest["shards"] if s["role"] == role]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).flat_map(_listed_rows,
                                                                                       num_cpus=READ_TASK_CPUS)


def _listed_rows(item: dict[str, Any]) -> list[dict[str, Any]]:
    listed = set(item["videos"])
    return [row for row in read_shard_rows(item["path"]) if row["video_id"] in listed]


def collect_videos(iterator: "ray.data.DataIterator", keep: set[str], manifest: dict[str, Any]
                   ) -> list[PreparedVideo]:
    """Prepared videos from a dataset iterator (only the ids in ``keep``), sorted by id."""
    caps = caps_from_manifest(manifest)
    videos = [row_to_video(row, manifest["dims"], caps) for row in iterator.iter_rows() if row["video_id"] in keep]
    return sorted(videos, key=lambda v: v.video_id)


def train_loop(loop: dict[str, Any]) -> None:
    """The per-worker training function (Ray Train ``train_loop_per_worker``)."""
    import ray.train
    import ray.train.torch

    w = worker_setup(loop)
    stage, manifest, rank, world, device, out = w.stage, w.manifest, w.rank, w.world, w.device, w.out

    train_ids = sorted(v for s in manifest["shards"] if s["role"] == "train" for v in s["videos"])
    videos = collect_videos(ray.train.get_dataset_shard("train"), set(train_ids[rank::world]), manifest)
    seed = stage.train.seed * 1009 + rank
    seed_everything(seed)
    comp = stage.model.completeness_features
    data = {s: UnitDataset(videos, s, stage.graph, comp) for s in stage.streams}
    dims = {s: manifest["dims"][f"{s}:body"] for s in stage.streams}
    heads = build_heads(stage.model, stage.streams, dims, len(manifest["classes"]))
    model = ray.train.torch.prepare_model(heads)
    optimizer, schedule = make_optimizer(model, stage.train, stage.stream_lr)
    stats = RegressionStats.from_dict(manifest["regression_stats"])
    generator = torch.Generator().manual_seed(seed)
    start, last_metrics = 0, {}
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as folder:
            from gcm_core.checkpoint import load_checkpoint

            heads.load_state_dict(load_checkpoint(Path(folder) / "model.pt").heads.state_dict())
            start, last_metrics = restore_state(Path(folder), optimizer, schedule, generator, rank)
    if start >= stage.train.epochs:  # a finished run asked to resume: hand its final metrics on again
        ray.train.report(last_metrics)
        return
    per_worker, steps = worker_steps(len(train_ids), stage.train.batch_videos, world)
    writer = tensorboard_writer(out) if rank == 0 else None
    for epoch in range(start, stage.train.epochs):
        began = time.perf_counter()
        metrics = mean_over_workers(train_one_epoch(model, data, optimizer, stage.train, stats, generator, device,
                                                    steps, per_worker), world, device)
        metrics["seconds_per_step"] = (time.perf_counter() - began) / steps  # Table 10's time per iteration
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        schedule.step()
        metrics["epoch"] = epoch + 1
        last = epoch + 1 == stage.train.epochs
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                ckpt = Checkpoint(manifest["classes"], stage.model, stage.graph, stage.inference, loop["snippets"],
                                  heads, stats, {"epoch": epoch + 1, "config": loop["stage"]}, loop["units_per_video"])
                save_checkpoint(Path(tmp) / "model.pt", ckpt)
                if evaluates_after(stage, epoch + 1, stage.train.epochs):
                    metrics.update(_evaluate(heads, stats, stage, manifest, out if last else None, device))
            save_state(Path(tmp), optimizer, schedule, generator, rank, epoch + 1, metrics)
            if rank == 0:
                log_epoch(out, writer, metrics)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch-{epoch + 1:04d}")


def _evaluate(heads: StreamHeads, stats: RegressionStats, stage: TrainStageConfig, manifest: dict[str, Any],
              out: Path | None, device) -> dict[str, float]:
    """Rank 0: the two-stage heads' test metrics (:func:`score_test_split`), the test split read
    from its shard files and scored a shard at a time at each evaluation, as ``gcm evaluate``
    does, rather than held in memory through training."""
    truth, detections = split_detections(shard_videos(stage.data, "test", manifest), heads, stage.graph,
                                         stage.model.completeness_features, stats, manifest["classes"],
                                         stage.inference, device, each_stream=True)
    if not truth:
        return {}
    return score_test_split(truth, detections, manifest["classes"], manifest["protocol"], manifest["tiou"], out)


def run_train(stage: TrainStageConfig, quiet: bool = False, callbacks: list | None = None,
              skipped: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Fit on the connected Ray; returns the final metrics and where the model was written.

    ``callbacks``: Ray Train callbacks (a Tune trial passes its report callback). ``skipped``: the
    videos a ``skip_bad`` run leaves out, where they were found already (a grid checks its dataset
    once for all its trials), instead of reading every feature file again.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from workflows.ray_env import require_resources, use_gpus

    folder = run_dir(stage)
    stage, manifest, card, skipped = _inputs(stage, folder, skipped)
    use_gpu = use_gpus(stage.use_gpu)
    require_resources(f"training {stage.name} ({stage.num_workers} workers)", training_resources(stage, use_gpu),
                      "use fewer --workers (or less cpus_per_worker)")
    check_output_folder(folder, TrainStageConfig)
    if (folder / SNAPSHOT).exists():
        if not stage.resume:
            raise FileExistsError(f"{folder} holds a previous run: pass --resume to continue it, or another --name")
        check_resumable(folder, stage)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.yaml", dump(stage))
    if stage.skip_bad:
        atomic_write_text(folder / SKIPPED, json.dumps(skipped, indent=1))
        if skipped and not quiet:
            print(f"train {stage.name}: left out {len(skipped)} video(s) that fail their checks (e.g. "
                  f"{skipped[0]['error']}); all listed in {folder / SKIPPED}", file=sys.stderr, flush=True)
    loop = {"stage": to_dict(stage), "manifest": manifest, "run_dir": str(folder), "snippets": dict(card.snippets),
            "units_per_video": card.units_per_video_test, "threads": max(1, int(stage.cpus_per_worker)),
            "leave_out": sorted(entry["video"] for entry in skipped)}
    one_stage = stage.kind == "one-stage"
    if one_stage:
        from workflows.train_one_stage import WEIGHTS, one_stage_loop
    trainer = TorchTrainer(
        one_stage_loop if one_stage else train_loop, train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(num_workers=stage.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=worker_resources(stage, use_gpu)),
        datasets={"train": shard_dataset(stage.data, manifest, "train")} if manifest else None,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        run_config=ray.train.RunConfig(
            name=stage.name, storage_path=str(folder.parent),
            failure_config=ray.train.FailureConfig(max_failures=stage.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2), callbacks=callbacks or []),
    )
    epochs = stage.recipe[1].epochs
    summed = f" (losses summed over {' + '.join(stage.streams)})" if len(stage.streams) > 1 else ""
    result = follow(trainer.fit, folder / "progress.jsonl", epochs, f"train {stage.name}: ", quiet, summed)
    if result.checkpoint is None:
        raise RuntimeError(f"training of {stage.name} ended without a checkpoint ({result.error})")
    weights = WEIGHTS if one_stage else "model.pt"
    with result.checkpoint.as_directory() as ckpt_dir:
        atomic_copy(Path(ckpt_dir) / weights, folder / weights)
    metrics = dict(result.metrics or {})
    return {"run_dir": str(folder), "checkpoint": str(folder / weights), "metrics": metrics}


# What a resumed run may change: how long it trains, what it runs on, when it evaluates
RESUMABLE_CHANGES = frozenset({"resume", "train.epochs", "one_stage.train.epochs", "evaluate", "evaluate_every",
                               "use_gpu", "cpus_per_worker", "max_failures"})


def check_resumable(folder: Path, stage: TrainStageConfig) -> None:
    """Refuse to resume a run with other settings than it trained with (its ``config.yaml``): the
    model, graph, data or recipe changed half-way would give a run that no configuration describes,
    and another number of workers finds no random state saved for its new ranks."""
    settings = earlier_settings(folder, TrainStageConfig)
    if settings is None:
        return
    earlier = from_dict(TrainStageConfig, settings)
    changed = {key: values for key, values in changed_settings(earlier, stage).items()
               if key not in RESUMABLE_CHANGES}
    if changed:
        raise ConfigError(f"{folder} trained with other settings than these ({describe_changes(changed)}): --resume "
                          "continues a run for more epochs only; start another --name for new settings")
    trained = max((int(p.name.removeprefix("epoch-")) for p in folder.glob("epoch-[0-9]*") if p.is_dir()), default=0)
    key, recipe = stage.recipe
    if recipe.epochs < trained:  # its record would say fewer epochs than its weights had
        raise ConfigError(f"{folder} has trained {trained} epochs already: --resume continues it to "
                          f"{key}.epochs >= {trained}; start another --name to train for fewer")


def _inputs(stage: TrainStageConfig, folder: Path, skipped: list[dict[str, str]] | None = None
            ) -> tuple[TrainStageConfig, dict[str, Any] | None, DatasetCard, list[dict[str, str]]]:
    """The stage with absolute paths, the manifest of the preprocessed dataset it trains on (None
    for a one-stage run that names its dataset's card and data root), its dataset's card and the
    videos it leaves out (``skip_bad``; a resumed run, those it left out when it started)."""
    stage = absolute_inputs(stage)
    manifest = None if stage.card else load_manifest(stage.data)
    card, data_root = dataset_of(stage, manifest)
    check_inputs(stage, card, manifest)
    stage = with_card_fusion(stage, card)
    if stage.kind != "one-stage":
        return stage, manifest, card, []
    recorded = folder / SKIPPED
    if skipped is None and stage.resume and stage.skip_bad and recorded.is_file():
        skipped = json.loads(recorded.read_text())
    if skipped is None:
        skipped = check_snippet_layout(card, data_root, manifest, stage.evaluate, stage.skip_bad)
    return stage, manifest, card, skipped


def check_snippet_layout(card: DatasetCard, data_root: str | None, manifest: dict[str, Any] | None,
                         evaluate: bool, skip_bad: bool = False) -> list[dict[str, str]]:
    """A one-stage run reads the dataset's annotations and every video's snippet features itself
    (its test split too where it evaluates; of a preprocessed dataset, the videos it kept): a data
    root without them, or a video's missing feature file, is named here, once, not in a training
    worker's traceback. With ``skip_bad`` (a run reading a card) every video's features are read
    and checked here instead, and those failing are returned ({video, role, error}) to be left out."""
    skipped = []
    for role in ("train", "test") if evaluate else ("train",):
        source = DatasetSource(card, data_root, role, left_out(manifest))
        source.check_layout(proposals=False, every_video=not skip_bad)
        if skip_bad:
            skipped += [{"video": video, "role": role, "error": error}
                        for video, error in source.failing_videos().items()]
    return skipped


def check_inputs(stage: TrainStageConfig, card: DatasetCard, manifest: dict[str, Any] | None) -> None:
    """A run reads streams its dataset has and, two-stage, a train split, unit features and
    candidate edges its preprocessing prepared (a graph within the caps it kept candidates under):
    refused here, naming them, rather than failing in every training worker."""
    unknown = [s for s in stage.streams if s not in card.streams]
    if unknown:
        raise ConfigError(f"{stage.card or stage.data}: the dataset's streams are {list(card.streams)}, not "
                          f"{unknown} (streams={list(stage.streams)})")
    if stage.skip_bad and not stage.card:
        raise ConfigError(f"skip_bad leaves out the bad videos of a one-stage run that reads a card (--card): "
                          f"{stage.data} holds what its gcm preprocess kept (--skip-bad there leaves them out)")
    if stage.kind == "two-stage":
        check_split(stage.data, manifest, "train")
        videos = manifest["counts"]["train"]["videos"]
        if videos < stage.num_workers:   # a worker without videos could take no step
            raise ConfigError(f"{stage.data} holds {videos} training videos, fewer than the {stage.num_workers} "
                              "workers that would share them: use fewer workers")
        check_unit_parts(stage.data, manifest, stage.streams, stage.model.completeness_features)
        check_caps(stage.data, manifest, stage.graph)


def absolute_inputs(stage: TrainStageConfig) -> TrainStageConfig:
    """The stage with its dataset named by absolute paths (its workers, and Tune's trials, run in
    other directories); a run that reads a dataset directly, or is given D-SSAD's settings, must be
    one-stage."""
    if stage.card and stage.kind != "one-stage":
        raise ValueError("a dataset read directly (card, data_root) serves one-stage runs only: a two-stage run "
                         "reads the units of a preprocessed dataset (--data)")
    stage.refuse_unread()
    return absolute_paths(stage)


def absolute_paths(stage: TrainStageConfig) -> TrainStageConfig:
    """The stage with the dataset it names (a card and data root, else a preprocessed dataset)
    given by absolute paths."""
    if stage.card:
        return replace(stage, card=absolute_card(stage.card), data_root=str(data_root_path(stage.data_root).resolve()))
    return replace(stage, data=str(Path(stage.data).resolve()))


def dataset_of(stage: TrainStageConfig, manifest: dict[str, Any] | None) -> tuple[DatasetCard, str | None]:
    """The card and data root a run reads: those it names (``card``, ``data_root``, one-stage runs),
    else those the preprocessed dataset it trains on was prepared from (its manifest)."""
    if stage.card:
        return load_card(stage.card), stage.data_root
    return prepared_from(stage.data, manifest)


def follow(fit: Callable[[], T], log: Path, epochs: int, label: str, quiet: bool, loss_note: str = "") -> T:
    """Run ``fit`` in a thread and print progress from the per-epoch log its rank 0 writes; each
    epoch's line of losses says ``loss_note`` after the epoch number."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    earlier = read_epoch_log(log)
    seen = len(earlier)
    progress = Progress(epochs, "epochs", label, quiet)
    progress.skip(max((m["epoch"] for m in earlier), default=0))  # a resumed run
    thread.start()
    while thread.is_alive():
        thread.join(timeout=1.0)
        logged = read_epoch_log(log)
        for metrics in logged[seen:]:
            if metrics["epoch"] > progress.done:  # a restarted worker group repeats epochs: skip them
                progress.update(metrics["epoch"] - progress.done)
                if not quiet:
                    losses = ", ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("loss_"))
                    tested = (f"; test mAP@0.5 {metrics['fused/mAP@0.5']:.2f} (fused)"
                              if "fused/mAP@0.5" in metrics else "")
                    print(f"  epoch {metrics['epoch']}{loss_note}: {losses}{tested}", flush=True)
        seen = len(logged)
    progress.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
