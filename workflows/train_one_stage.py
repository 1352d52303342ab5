"""Ray Train loop of the one-stage D-SSAD (+ GCM), used by the training stage when ``kind`` is
``one-stage`` (Tables 11 and 12).

D-SSAD reads snippet features, not the preprocessed units: each worker builds the clips of the
dataset that preprocessing read (the card and data root in its manifest), or of the dataset the
run names (``card``, ``data_root``: no proposals, no preprocessing), and keeps a deterministic
share (clip k to rank k mod world size). Checkpoints hold ``dssad.pt`` (each
stream's weights and the model config, plain types) and the same training state and random
states as the two-stage loop, so resuming works the same way.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gcm_core.checkpoint import check_feature_widths
from gcm_core.data.cards import DatasetCard
from gcm_core.data.dataset import DatasetSource
from gcm_core.data.model import Detections, Video
from gcm_core.detectors.dssad import DSSAD
from gcm_core.engine import make_optimizer, seed_everything
from gcm_core.one_stage import anchor_scores, dataset_clips, fuse_detections, train_one_epoch
from gcm_core.postprocess import VideoLabels
from workflows.config import TrainStageConfig, stage_settings
from workflows.settings import from_dict
from workflows.shards import left_out
from workflows.train_worker import (
    evaluates_after, log_epoch, mean_over_workers, restore_state, save_state, score_test_split, tensorboard_writer,
    worker_setup, worker_steps,
)


WEIGHTS = "dssad.pt"


class OneStageModels(torch.nn.ModuleDict):
    """One D-SSAD per stream (trained independently, fused late)."""


def save_one_stage(path: Path, models: OneStageModels, stage: dict[str, Any], card: DatasetCard, dim: int) -> None:
    """``dssad.pt``: each stream's weights with what rebuilding them and reading a new video's
    features need (plain types only)."""
    torch.save({"models": models.state_dict(), "config": stage, "classes": list(card.classes), "dim": dim,
                "snippets": dict(card.snippets)}, path)


@dataclass
class OneStageCheckpoint:
    """A D-SSAD run as ``dssad.pt`` holds it, models rebuilt."""

    models: OneStageModels          # in eval mode
    stage: TrainStageConfig         # the run's resolved config
    classes: list[str]
    snippets: dict[str, Any]        # the features' snippet layout (card ``snippets``); {} in files written
                                    # before it was recorded, which video_layout reads as its defaults

    @property
    def dims(self) -> dict[str, int]:
        """The width of the snippet features each stream's model reads."""
        return {s: model.dim for s, model in self.models.items()}


def is_one_stage_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a D-SSAD run's weights (``dssad.pt``) rather than a two-stage head
    (an unreadable file is left to the two-stage loader to report)."""
    try:  # mapped, not read: only the keys are looked at
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(payload, dict) and {"models", "config", "classes", "dim"} <= payload.keys()


def load_one_stage(path: str | Path) -> OneStageCheckpoint:
    """The D-SSAD run of ``dssad.pt``, models rebuilt."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    stage = from_dict(TrainStageConfig, stage_settings(payload["config"]))
    models = OneStageModels({s: DSSAD(stage.one_stage.model, payload["dim"], len(payload["classes"]))
                             for s in stage.streams})
    models.load_state_dict(payload["models"])
    return OneStageCheckpoint(models.eval(), stage, list(payload["classes"]), payload.get("snippets", {}))


def detect_test_split(models: OneStageModels, stage: TrainStageConfig, card: DatasetCard, data_root: str | None,
                      leave_out: Iterable[str] = (), device: torch.device | str = "cpu",
                      video_labels: VideoLabels | None = None) -> tuple[dict[str, Video], dict[str, Detections]]:
    """Every test video's ground truth, and detections per stream and ``fused`` (all streams; each
    model runs once over the clips; with ``video_labels`` if given), less the videos to
    ``leave_out`` (those a preprocessing or the run left out as bad)."""
    source = DatasetSource(card, data_root, "test", leave_out)
    tests, durations = dataset_clips(source, stage.streams, stage.one_stage.model.clip_snippets,
                                     stage.one_stage.model.stride)
    first = tests[stage.streams[0]][0].video_id   # features of another width: named, not a shape error
    check_feature_widths({s: models[s].dim for s in stage.streams},
                         {s: tests[s][0].features.shape[1] for s in stage.streams},
                         ", ".join(str(source.feature_path(first, s)) for s in stage.streams), first)
    scores = {s: anchor_scores(models[s], tests[s], device=device) for s in stage.streams}
    anchors = models[stage.streams[0]].anchors
    groups = [(s, [s]) for s in stage.streams] + [("fused", list(stage.streams))]
    detections = {name: fuse_detections({s: scores[s] for s in streams}, tests[stage.streams[0]], anchors, durations,
                                        card.classes, stage.inference.weights(), stage.inference, video_labels)
                  for name, streams in groups}
    return dict(source.videos), detections


def one_stage_loop(loop: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from workflows.train import dataset_of

    w = worker_setup(loop)
    stage, rank, world, device, out = w.stage, w.rank, w.world, w.device, w.out
    card, data_root = dataset_of(stage, w.manifest)
    leave_out = left_out(w.manifest) | set(loop["leave_out"])   # as preprocessing or the run's skip_bad chose
    source = DatasetSource(card, data_root, "train", leave_out)
    every, _ = dataset_clips(source, stage.streams, stage.one_stage.model.clip_snippets,
                             stage.one_stage.model.stride)
    clips = {s: every[s][rank::world] for s in stage.streams}
    if not clips[stage.streams[0]]:
        raise ValueError(f"the dataset has {len(every[stage.streams[0]])} training clips, fewer than the {world} "
                         "workers that would share them: use fewer workers")
    config = stage.one_stage.train
    seed = config.seed * 1009 + rank
    seed_everything(seed)
    dim = clips[stage.streams[0]][0].features.shape[1]
    models = OneStageModels({s: DSSAD(stage.one_stage.model, dim, card.num_classes) for s in stage.streams})
    # one DistributedDataParallel per stream, trained through it (the streams train one after the
    # other); the workers split each batch and take the same number of steps, as the two-stage loop
    replicas = {s: ray.train.torch.prepare_model(models[s]) for s in stage.streams}
    optimizer, schedule = make_optimizer(models, config)
    per_worker, steps = worker_steps(len(every[stage.streams[0]]), config.batch_videos, world)
    steps = steps if world > 1 else None   # one worker: as gcm_core.one_stage.fit, the last batch short
    generator = torch.Generator().manual_seed(seed)
    start, last_metrics = 0, {}
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as folder:
            models.load_state_dict(torch.load(Path(folder) / WEIGHTS, weights_only=True)["models"])
            start, last_metrics = restore_state(Path(folder), optimizer, schedule, generator, rank)
    if start >= config.epochs:
        ray.train.report(last_metrics)
        return
    writer = tensorboard_writer(out) if rank == 0 else None
    for epoch in range(start, config.epochs):
        began = time.perf_counter()
        losses: dict[str, float] = {}
        for stream in stage.streams:
            for k, v in train_one_epoch(replicas[stream], clips[stream], optimizer, config, generator,
                                        device=device, steps=steps, batch_videos=per_worker).items():
                losses[k] = losses.get(k, 0.0) + v
        metrics: dict[str, Any] = mean_over_workers(losses, world, device)
        schedule.step()
        metrics.update(epoch=epoch + 1, seconds_per_epoch=time.perf_counter() - began)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                if evaluates_after(stage, epoch + 1, config.epochs):
                    metrics.update(_evaluate(models, stage, card, data_root, leave_out,
                                             out if epoch + 1 == config.epochs else None, device))
                save_one_stage(Path(tmp) / WEIGHTS, models, loop["stage"], card, dim)
            save_state(Path(tmp), optimizer, schedule, generator, rank, epoch + 1, metrics)
            if rank == 0:
                log_epoch(out, writer, metrics)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch-{epoch + 1:04d}")


def _evaluate(models: OneStageModels, stage: TrainStageConfig, card: DatasetCard, data_root: str,
              leave_out: Iterable[str], out: Path | None, device: torch.device) -> dict[str, float]:
    """Rank 0: the D-SSAD models' test metrics (:func:`workflows.train_worker.score_test_split`)."""
    videos, detections = detect_test_split(models, stage, card, data_root, leave_out, device)
    return score_test_split(videos, detections, list(card.classes), card.protocol, list(card.tiou), out)
