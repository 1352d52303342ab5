"""Training and inference of the two-stage heads as plain functions of (model, data, config).

One process, any device; the Ray workflows call these. Training follows Algorithm 1: every
iteration samples a batch of videos, the training units of each (fg : incomplete : bg), and the
GCM aggregates sampled neighbourhoods of those units only (Eq. 18); evaluation runs every unit of a
video with full neighbourhoods. The default optimiser is the paper's: SGD (momentum 0.9, weight
decay 5e-4) with the learning rate divided by 10 every 15 epochs.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from gcm_core.checks import check_ranges
from gcm_core.data.model import Detections, Video
from gcm_core.data.prepared import PreparedVideo
from gcm_core.data.sampling import RegressionStats, SamplingConfig, sample_units
from gcm_core.detectors.base import ModelConfig, UnitBatch, UnitOutputs, build_detector
from gcm_core.evaluation import evaluate_detections
from gcm_core.graph import Graph, GraphSpec
from gcm_core.losses import LossWeights, ssn_loss
from gcm_core.metrics import MapResult
from gcm_core.postprocess import (
    InferenceConfig, UnitScores, VideoLabels, detect, fuse_streams, unit_scores, with_proposal_scores,
    with_video_labels,
)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 45
    batch_videos: int = 32
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step_epochs: int = 15
    lr_gamma: float = 0.1
    clip_grad_norm: float | None = 20.0
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        check_ranges(self, epochs=">= 0", batch_videos=">= 1", lr="> 0", momentum="in [0, 1)", weight_decay=">= 0",
                     lr_step_epochs=">= 1", lr_gamma="in (0, 1]", clip_grad_norm="> 0")


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from, for deterministic CPU runs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class UnitDataset:
    """Prepared videos seen through one stream and one graph setting, batched for a head."""

    def __init__(self, videos: Sequence[PreparedVideo], stream: str, spec: GraphSpec,
                 comp_input: str | None = "three_part") -> None:
        self.videos, self.stream, self.spec, self.comp_input = list(videos), stream, spec, comp_input

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def dim(self) -> int:
        return int(self.videos[0].features[self.stream]["body"].shape[1])

    def batch(self, indices: Sequence[int], sampling: SamplingConfig | None = None,
              generator: torch.Generator | None = None) -> UnitBatch:
        """The units of videos ``indices``; with ``sampling``, targets for sampled training units."""
        videos = [self.videos[i] for i in indices]
        feats = [v.features[self.stream] for v in videos]
        body = torch.cat([f["body"] for f in feats])
        comp = torch.cat([f[self.comp_input] for f in feats]) if self.comp_input else None
        graph = Graph.batch([v.graph(self.stream, self.spec) for v in videos])
        if sampling is None:
            return UnitBatch(body, comp, graph)
        offsets = graph.ptr[:-1].tolist()
        nodes = torch.cat([sample_units(v.labels.role, sampling, generator) + o for v, o in zip(videos, offsets)])
        role = torch.cat([v.labels.role for v in videos])[nodes]
        label = torch.cat([v.labels.label for v in videos])[nodes]
        target = torch.cat([v.labels.reg_target for v in videos])[nodes]
        return UnitBatch(body, comp, graph, nodes, role, label, target)

    def regression_stats(self) -> RegressionStats:
        """Normalisation statistics of the regression targets of every training foreground."""
        return RegressionStats.fit(torch.cat([v.labels.reg_target for v in self.videos]))


class StreamHeads(nn.ModuleDict):
    """One head per feature stream. Each stream's head only ever sees its own stream's features and
    loss, so training them together is training them separately (the paper's two-stream practice,
    fused late at inference), in one optimiser and, under Ray Train, one DDP model."""

    def forward(self, batches: dict[str, UnitBatch]) -> dict[str, UnitOutputs]:
        return {stream: self[stream](batch) for stream, batch in batches.items()}


def build_heads(model_config: ModelConfig, streams: Sequence[str], dim: int | dict[str, int],
                num_classes: int) -> StreamHeads:
    dims = dim if isinstance(dim, dict) else {s: dim for s in streams}
    return StreamHeads({s: build_detector(model_config, dims[s], num_classes) for s in streams})


def make_optimizer(model: nn.Module, config: TrainConfig, stream_lr: dict[str, float] | None = None
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The configured optimiser and step schedule; ``stream_lr`` gives a head its own rate."""
    heads = model.module if hasattr(model, "module") else model  # DDP-wrapped or not
    if isinstance(heads, StreamHeads):
        groups = [{"params": list(head.parameters()), "lr": (stream_lr or {}).get(s, config.lr)}
                  for s, head in heads.items()]
    else:
        groups = [{"params": list(model.parameters()), "lr": config.lr}]
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    elif config.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}")
    return opt, torch.optim.lr_scheduler.StepLR(opt, config.lr_step_epochs, config.lr_gamma)


def epoch_batches(n: int, batch: int, generator: torch.Generator, steps: int | None = None) -> list[list[int]]:
    """Video indices of each step of an epoch: a fresh permutation, cut into batches.

    ``steps`` fixes the number of steps (workers of a data-parallel run must agree), cycling
    through further permutations when the videos run out.
    """
    steps = steps if steps is not None else math.ceil(n / batch)
    if n == 0 and steps > 0:   # else the loop below would draw empty permutations forever
        raise ValueError("no videos to draw a batch from: a worker's share of the training set is empty "
                         "(use at most as many workers as there are training videos)")
    order: list[int] = []
    while len(order) < steps * batch:
        order += torch.randperm(n, generator=generator).tolist()
    return [order[k * batch:(k + 1) * batch] for k in range(steps)]


def train_one_epoch(model: nn.Module, data: dict[str, UnitDataset], optimizer: torch.optim.Optimizer,
                    config: TrainConfig, stats: RegressionStats, generator: torch.Generator,
                    device: torch.device | str = "cpu", steps: int | None = None,
                    batch_videos: int | None = None) -> dict[str, float]:
    """One epoch of every stream's head; returns the mean of each loss term (summed over streams).

    ``model`` is a :class:`StreamHeads` (possibly DDP-wrapped), ``data`` its datasets by stream.
    """
    model.train()
    heads = model.module if hasattr(model, "module") else model
    n = len(next(iter(data.values())))
    sums: dict[str, float] = {}
    for indices in epoch_batches(n, batch_videos or config.batch_videos, generator, steps):
        batches = {s: d.batch(indices, config.sampling, generator).to(device) for s, d in data.items()}
        outputs = model(batches)
        total = 0.0
        for stream, out in outputs.items():
            b = batches[stream]
            target = stats.normalize(b.reg_target).nan_to_num(0.0)
            terms = ssn_loss(out.logits, out.completeness, out.offsets, b.role, b.label, target, config.loss)
            total = total + terms["total"]
            for name, value in terms.items():
                sums[f"loss_{name}"] = sums.get(f"loss_{name}", 0.0) + float(value.detach())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if config.clip_grad_norm:
            for head in heads.values():  # per stream: the streams stay independent
                nn.utils.clip_grad_norm_(head.parameters(), config.clip_grad_norm)
        optimizer.step()
    steps_done = steps if steps is not None else math.ceil(n / (batch_videos or config.batch_videos))
    return {k: v / max(steps_done, 1) for k, v in sums.items()}


@torch.no_grad()
def predict(model: nn.Module, data: UnitDataset, stats: RegressionStats, device: torch.device | str = "cpu",
            batch_videos: int = 8) -> list[UnitScores]:
    """Per-unit scores and refined extents of every video, full neighbourhoods (no sampling)."""
    model.eval()
    out: list[UnitScores] = []
    for start in range(0, len(data), batch_videos):
        indices = list(range(start, min(start + batch_videos, len(data))))
        batch = data.batch(indices).to(device)
        result: UnitOutputs = model(batch)
        ptr = batch.graph.ptr.tolist()
        for k, i in enumerate(indices):
            a, b = ptr[k], ptr[k + 1]
            offsets = stats.denormalize(result.offsets[a:b].double().cpu())
            comp = None if result.completeness is None else result.completeness[a:b].cpu()
            out.append(unit_scores(data.videos[i].intervals, result.logits[a:b].cpu(), comp, offsets))
    return out


def detections_of(videos: Sequence[PreparedVideo], per_stream: dict[str, list[UnitScores]],
                  classes: Sequence[str], config: InferenceConfig = InferenceConfig(),
                  video_labels: VideoLabels | None = None) -> Detections:
    """Fuse the streams' unit scores (weights of ``config.fusion``), with ``config.proposal_score``
    weigh them by their proposals' scores, with ``video_labels`` give each video's units its
    external classes, and decode every video."""
    weights = config.weights()
    vid, lab, start, end, score = [], [], [], [], []
    for k, video in enumerate(videos):
        fused = fuse_streams({s: scores[k] for s, scores in per_stream.items()}, weights)
        if config.proposal_score:
            if video.proposal_scores is None:
                raise ValueError(f"inference.proposal_score: video {video.video_id} has no proposal scores (its "
                                 "dataset was preprocessed before they were kept: preprocess it again)")
            fused = with_proposal_scores(fused, video.proposal_scores)
        if video_labels is not None:
            fused = with_video_labels(fused, video_labels, video.video_id)
        segments, labels, scores = detect(fused, video.duration, config)
        vid += [video.video_id] * len(labels)
        lab += [classes[c] for c in labels.tolist()]
        start += segments[:, 0].tolist()
        end += segments[:, 1].tolist()
        score += scores.tolist()
    return Detections(vid, lab, np.array(start), np.array(end), np.array(score))


def split_detections(chunks: Iterable[Sequence[PreparedVideo]], heads: StreamHeads, spec: GraphSpec,
                     completeness_features: str, stats: RegressionStats, classes: Sequence[str],
                     config: InferenceConfig, device: torch.device | str = "cpu", each_stream: bool = False,
                     video_labels: VideoLabels | None = None) -> tuple[dict[str, Video], dict[str, Detections]]:
    """Ground truth and detections of a split's videos given a chunk at a time, so that a caller
    holds a chunk's units, never the split's: ``fused`` (the streams fused by ``config.fusion``)
    and, with ``each_stream``, every stream's own (:func:`detections_of`, with ``video_labels``
    if given). Both are ordered by video id, whatever the chunks' order."""
    truth: dict[str, Video] = {}
    found: dict[str, list[Detections]] = {name: [] for name in [*(heads if each_stream else ()), "fused"]}
    for videos in chunks:
        per_stream = {s: predict(head, UnitDataset(videos, s, spec, completeness_features), stats, device)
                      for s, head in heads.items()}
        truth.update(ground_truth(videos, classes))
        for name in found:
            streams = per_stream if name == "fused" else {name: per_stream[name]}
            found[name].append(detections_of(videos, streams, classes, config, video_labels))
    return dict(sorted(truth.items())), {name: Detections.concat(parts).by_video() for name, parts in found.items()}


def evaluate(videos: Sequence[PreparedVideo], detections: Detections, classes: Sequence[str], protocol: str,
             tiou: Sequence[float]) -> MapResult:
    """mAP of ``detections`` on the prepared videos' ground truth under ``protocol``."""
    return evaluate_detections(ground_truth(videos, classes), detections, classes, protocol, tiou)


def ground_truth(videos: Sequence[PreparedVideo], classes: Sequence[str]) -> dict[str, Video]:
    """The prepared videos' annotations, as the evaluators take them."""
    return {v.video_id: v.as_video(classes) for v in videos}


def fit(videos: Sequence[PreparedVideo], streams: Sequence[str], model_config: ModelConfig, spec: GraphSpec,
        config: TrainConfig, num_classes: int, stream_lr: dict[str, float] | None = None,
        device: torch.device | str = "cpu",
        on_epoch: Callable[[int, dict[str, float], StreamHeads], None] | None = None
        ) -> tuple[StreamHeads, RegressionStats]:
    """Train every stream's head from scratch for ``config.epochs`` epochs (seeded, one process)."""
    seed_everything(config.seed)
    comp = model_config.completeness_features
    data = {s: UnitDataset(videos, s, spec, comp) for s in streams}
    model = build_heads(model_config, streams, {s: d.dim for s, d in data.items()}, num_classes).to(device)
    stats = next(iter(data.values())).regression_stats()
    optimizer, schedule = make_optimizer(model, config, stream_lr)
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        metrics = train_one_epoch(model, data, optimizer, config, stats, generator, device)
        schedule.step()
        if on_epoch is not None:
            on_epoch(epoch, metrics, model)
    return model.eval(), stats
