"""What every training worker does besides its detector's loop, shared by the two-stage loop
(:mod:`workflows.train`) and the one-stage one (:mod:`workflows.train_one_stage`): who it is and
on which device, its share of each batch and the steps of an epoch, the run's losses averaged over
the workers, the training state a checkpoint holds besides the weights (optimiser, schedule, every
worker's random state), the per-epoch log and TensorBoard, and the test metrics.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from gcm_core.data.atomic import atomic_write_text
from gcm_core.data.formats import write_result_json
from gcm_core.data.model import Detections, Video
from gcm_core.evaluation import evaluate_detections
from workflows.config import TrainStageConfig
from workflows.settings import from_dict

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter


@dataclass
class Worker:
    """What a training worker knows of itself and its run."""

    stage: TrainStageConfig
    manifest: dict[str, Any] | None   # None: a one-stage run reading its dataset directly
    rank: int
    world: int
    device: torch.device
    out: Path


def worker_setup(loop: dict[str, Any]) -> Worker:
    """Start of every training loop: configuration, rank, device, threads, and a pid file (for
    monitoring, and for the fault tests that kill a worker)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    worker = Worker(from_dict(TrainStageConfig, loop["stage"]), loop["manifest"], ctx.get_world_rank(),
                    ctx.get_world_size(), ray.train.torch.get_device(), Path(loop["run_dir"]))
    torch.set_num_threads(loop["threads"])
    (worker.out / "workers").mkdir(parents=True, exist_ok=True)
    atomic_write_text(worker.out / "workers" / f"rank-{worker.rank}.pid", str(os.getpid()))
    return worker


def worker_steps(items: int, batch_videos: int, world: int) -> tuple[int, int]:
    """A worker's share of each batch, and the number of steps every worker takes in an epoch over
    ``items`` dealt to ``world`` workers (their shares differ by one at most; all must take the same
    number of steps, as each step's gradients are averaged over them)."""
    per_worker = max(1, batch_videos // world)
    return per_worker, math.ceil(math.ceil(items / world) / per_worker)


def mean_over_workers(losses: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """An epoch's losses averaged over the workers (each computes them on its share of the
    videos), so that a run logs its loss, not its rank 0's."""
    if world == 1:
        return losses
    import torch.distributed as dist

    names = sorted(losses)
    summed = torch.tensor([losses[name] for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return {name: float(value) / world for name, value in zip(names, summed.tolist())}


def save_state(folder: Path, optimizer: Optimizer, schedule: LRScheduler, generator: torch.Generator, rank: int,
               epoch: int, metrics: dict[str, Any]) -> None:
    """Rank 0: optimiser, schedule, epoch and metrics; every rank: its random states."""
    if rank == 0:
        torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "metrics": metrics}, folder / "train_state.pt")
    torch.save({"generator": generator.get_state(), "torch": torch.get_rng_state()}, folder / f"rng-rank{rank}.pt")


def restore_state(folder: Path, optimizer: Optimizer, schedule: LRScheduler, generator: torch.Generator,
                  rank: int) -> tuple[int, dict[str, Any]]:
    """Inverse of :func:`save_state`; returns the checkpoint's epoch and the metrics it reported."""
    state = torch.load(folder / "train_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    rng = torch.load(folder / f"rng-rank{rank}.pt", weights_only=True)
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    return int(state["epoch"]), dict(state.get("metrics", {}))


def log_epoch(out: Path, writer: SummaryWriter | None, metrics: dict[str, Any]) -> None:
    """One line per epoch in ``progress.jsonl`` (read by the driver) and TensorBoard scalars."""
    with (out / "progress.jsonl").open("a") as f:
        f.write(json.dumps(metrics) + "\n")
    if writer is not None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "epoch":
                writer.add_scalar(key, value, metrics["epoch"])
        writer.flush()


def tensorboard_writer(out: Path) -> SummaryWriter | None:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional: Ray Tune installs it
        return None
    return SummaryWriter(str(out / "tensorboard"))


def evaluates_after(stage: TrainStageConfig, epoch: int, epochs: int) -> bool:
    """Whether rank 0 evaluates the test split after ``epoch`` (1-based) of ``epochs``."""
    return (epoch == epochs and stage.evaluate) or (stage.evaluate_every > 0 and epoch % stage.evaluate_every == 0)


def score_test_split(truth: dict[str, Video], detections: dict[str, Detections], classes: list[str], protocol: str,
                     tiou: list[float], out: Path | None) -> dict[str, float]:
    """mAP (%) of each stream's and the ``fused`` detections of the test split, as epoch metrics;
    after the last epoch (``out`` given) the fused detections and their metrics are also written to
    the run folder (detections.json, metrics.json)."""
    metrics: dict[str, float] = {}
    for name, dets in detections.items():
        result = evaluate_detections(truth, dets, classes, protocol, tiou)
        for t, value in zip(tiou, result.map.tolist()):
            metrics[f"{name}/mAP@{t:g}"] = 100 * value
        metrics[f"{name}/mAP_avg"] = 100 * result.average
        if name == "fused" and out is not None:
            write_result_json(out / "detections.json", dets)
            atomic_write_text(out / "metrics.json", json.dumps(
                {"fused": {"protocol": protocol, **result.as_dict(classes)}, "metrics": metrics,
                 "videos": len(truth)}, indent=1))
    return metrics
