"""Training and inference of the one-stage D-SSAD (+ GCM) on clips of snippet features.

A video's snippets are cut into windows of ``clip_snippets`` every ``window_stride`` snippets (by
default half a clip; one window for a short video, zero-padded); training uses the windows that
hold an instance, inference all of them, and a video's detections from every window are merged by
per-class NMS. The detector works in snippets; each window is placed in seconds by its own video's
snippet rate, which differs between videos (THUMOS'14's native frame rates run from 24 to 30 fps;
features rescaled to a fixed number of positions give every video its own).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from gcm_core.data.dataset import DatasetSource
from gcm_core.data.model import Detections
from gcm_core.data.pooling import SnippetGrid
from gcm_core.data.sampling import apply_regression
from gcm_core.detectors.dssad import DSSAD, pad_clip
from gcm_core.engine import TrainConfig, epoch_batches, make_optimizer
from gcm_core.losses import AnchorMatching, anchor_loss, match_anchors
from gcm_core.postprocess import InferenceConfig, VideoLabels, stream_weights, suppress


def default_recipe() -> TrainConfig:
    """D-SSAD's training recipe: Adam (lr 2e-3, weight decay 1e-4), 20 epochs, lr / 10 after 14,
    clips in batches of 2.

    The papers do not give one. A dataset holds a few hundred clips, so the batch size decides
    how many steps an epoch takes: on the medium synthetic benchmark (seed 0, flow stream, 10
    epochs, mAP@0.5) batches of 8 at lr 1e-3 gave 15.4, of 4 at 3e-3 37.7, of 2 at 2e-3 41.2 and
    of 1 at 1e-3 41.4 (1.2x the time of batches of 2); 20 epochs in batches of 8 gave 34.1. In
    batches of 2, 20 epochs (lr / 10 after 14) instead of 10 (after 7) lift D-SSAD from 42.46 to
    47.05 and D-SSAD + GCM x3 from 41.92 to 46.51 (flow, 1 thread, mean of seeds 0-2;
    ``benchmarks/quality.py --dssad-epochs 20``).
    """
    return TrainConfig(optimizer="adam", lr=2e-3, weight_decay=1e-4, batch_videos=2, epochs=20, lr_step_epochs=14)


@dataclass
class Clip:
    """One window of a video: padded snippets and the instances it holds (seconds, clip-relative)."""

    video_id: str
    features: Tensor        # [clip_snippets, C], zero-padded past the video's end
    snippets: int           # how many of them are the video's (the rest is padding)
    start: float            # seconds of the window's first snippet boundary in the video
    seconds: float          # seconds per snippet of its video
    gt: Tensor              # [G, 2], clip-relative seconds
    gt_labels: Tensor       # [G]


def clips_of(video_id: str, snippets: np.ndarray, snippet_seconds: float, gt: Tensor, gt_labels: Tensor,
             length: int, stride: int, train: bool, time_offset: float = 0.0) -> list[Clip]:
    """The windows of one video (training: only those with an instance mostly inside).

    Snippet t is taken to span [t, t + 1) * ``snippet_seconds`` + ``time_offset`` (its share of the
    time axis around its centre; the I3D grid's offset is (clip - stride) / 2 frames).
    """
    t = snippets.shape[0]
    starts = list(range(0, max(t - length, 0) + 1, stride))
    if starts[-1] + length < t:
        starts.append(t - length)
    feats = torch.from_numpy(snippets)
    out = []
    for s in starts:
        t0, t1 = s * snippet_seconds + time_offset, (s + length) * snippet_seconds + time_offset
        inside = torch.clamp(torch.minimum(gt[:, 1], torch.tensor(t1)) - torch.maximum(gt[:, 0], torch.tensor(t0)), min=0)
        keep = inside >= 0.5 * (gt[:, 1] - gt[:, 0])
        if train and not bool(keep.any()):
            continue
        rel = (gt[keep] - t0).clamp(0, t1 - t0)
        out.append(Clip(video_id, pad_clip(feats[s:s + length], length), min(length, t - s), t0, snippet_seconds,
                        rel, gt_labels[keep]))
    return out


def dataset_clips(source: DatasetSource, streams: Sequence[str], length: int = 512, stride: int = 256
                  ) -> tuple[dict[str, list[Clip]], dict[str, float]]:
    """Every clip of one role of a dataset for each of ``streams`` (the same windows; each video
    read once) and the videos' durations."""
    card, train = source.card, source.role == "train"
    clips: dict[str, list[Clip]] = {s: [] for s in streams}
    durations = {}
    for vid in source.video_ids:
        video, features, grid = source.snippet_features(vid)
        seconds, offset = snippet_timing(grid)
        gt = torch.tensor([(i.start, i.end) for i in video.instances], dtype=torch.float64).reshape(-1, 2)
        labels = torch.tensor([card.classes.index(i.label) for i in video.instances], dtype=torch.long)
        for s in streams:
            clips[s] += clips_of(vid, features[s], seconds, gt, labels, length, stride, train, offset)
        durations[vid] = video.duration
    return clips, durations


def snippet_timing(grid: SnippetGrid) -> tuple[float, float]:
    """Seconds per snippet and the time at which snippet 0's share of the time axis starts, as
    :func:`clips_of` takes them."""
    seconds = grid.seconds_per_snippet
    return seconds, float(grid.centres()[0]) - seconds / 2


def train_one_epoch(model: nn.Module, clips: Sequence[Clip], optimizer: torch.optim.Optimizer, config: TrainConfig,
                    generator: torch.Generator, matching: AnchorMatching = AnchorMatching(),
                    device: torch.device | str = "cpu", steps: int | None = None,
                    batch_videos: int | None = None) -> dict[str, float]:
    """One epoch of a :class:`DSSAD` over ``clips``; returns the mean of each loss term.

    In a data-parallel run ``model`` is the DSSAD wrapped in DistributedDataParallel, called
    through the wrapper so that every step's gradients are averaged over the workers, and
    ``steps`` (the same on every worker) and ``batch_videos`` (the worker's share of the batch)
    are given; otherwise one permutation of the clips is cut into batches, the last one short.
    """
    model.train()
    detector = model.module if hasattr(model, "module") else model
    anchors = functools.cache(detector.anchors)   # in seconds, once per snippet rate
    targets = [match_anchors(anchors(c.seconds), c.gt, c.gt_labels, matching) for c in clips]
    batch = batch_videos or config.batch_videos
    if steps is None:
        order = torch.randperm(len(clips), generator=generator).tolist()
        batches = [order[start:start + batch] for start in range(0, len(order), batch)]
    else:
        batches = epoch_batches(len(clips), batch, generator, steps)
    sums: dict[str, float] = {}
    for idx in batches:
        logits, offsets = model(torch.stack([clips[i].features for i in idx]).to(device),
                                [clips[i].snippets for i in idx])
        cls_t = torch.cat([targets[i][0] for i in idx]).to(device)
        off_t = torch.cat([targets[i][1] for i in idx]).to(device)
        terms = anchor_loss(logits.reshape(-1, logits.shape[-1]), offsets.reshape(-1, 2), cls_t, off_t, matching)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        if config.clip_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
        optimizer.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    return {f"loss_{k}": v / max(len(batches), 1) for k, v in sums.items()}


@torch.no_grad()
def anchor_scores(model: DSSAD, clips: Sequence[Clip], batch: int = 16,
                  device: torch.device | str = "cpu") -> list[tuple[Tensor, Tensor]]:
    """Per clip: its anchors' class probabilities [A, K] (background left out) and offsets [A, 2],
    float64 on the CPU, computed once whatever fusions they enter."""
    model.eval()
    out: list[tuple[Tensor, Tensor]] = []
    for start in range(0, len(clips), batch):
        chunk = clips[start:start + batch]
        logits, offsets = model(torch.stack([c.features for c in chunk]).to(device), [c.snippets for c in chunk])
        out += zip(torch.softmax(logits.double().cpu(), dim=-1)[..., 1:], offsets.double().cpu())
    return out


def fuse_detections(scores: dict[str, list[tuple[Tensor, Tensor]]], clips: Sequence[Clip],
                    anchors: Callable[[float], Tensor], durations: dict[str, float], classes: Sequence[str],
                    weights: dict[str, float] | None = None, config: InferenceConfig = InferenceConfig(),
                    video_labels: VideoLabels | None = None) -> Detections:
    """Detections of every video whose clips are given, from each stream's :func:`anchor_scores`
    fused late (weighted mean of the anchors' class probabilities and offsets; the streams' clips
    are the same windows), each clip's anchors in seconds at its video's snippet rate
    (``anchors(seconds per snippet)``: :meth:`DSSAD.anchors`), windows merged by ``config``'s
    per-class NMS or Soft-NMS over the video's ``candidates_per_video`` best (anchor, class)
    pairs, as the two-stage heads' units. Each window keeps that many of its own first, which
    bounds the memory a long video takes and changes nothing: the video's best N pairs are among
    its windows' best N each. An anchor is its best class's detection; with ``video_labels``, its
    best of the video's external top classes (:meth:`VideoLabels.restrict`)."""
    w = stream_weights(scores, weights)
    total = sum(w.values())
    anchors = functools.cache(anchors)
    per_video: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {}
    for k, clip in enumerate(clips):
        probs, offsets = 0.0, 0.0
        for s, per_clip in scores.items():
            probs = probs + w[s] * per_clip[k][0]
            offsets = offsets + w[s] * per_clip[k][1]
        segments = apply_regression(anchors(clip.seconds), offsets / total) + clip.start
        if video_labels is None:
            score, label = (probs / total).max(dim=1)
        else:
            restricted, top = video_labels.restrict(clip.video_id, probs / total)
            score, column = restricted.max(dim=1)
            label = top[column]
        keep = torch.argsort(-score, stable=True)[:config.candidates_per_video]
        per_video.setdefault(clip.video_id, []).append((segments[keep], label[keep], score[keep]))
    return _merge(per_video, durations, classes, config)


def detect_video(models: dict[str, DSSAD], features: dict[str, np.ndarray], grid: SnippetGrid, video_id: str,
                 classes: Sequence[str], weights: dict[str, float] | None = None,
                 config: InferenceConfig = InferenceConfig(), device: torch.device | str = "cpu",
                 video_labels: VideoLabels | None = None) -> Detections:
    """Detections of one new video from its snippet features per stream: its windows as in
    :func:`dataset_clips`, every stream's model once over them, fused late (with external
    ``video_labels`` if given)."""
    seconds, offset = snippet_timing(grid)
    layout = next(iter(models.values())).config
    no_gt = torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    clips = {s: clips_of(video_id, features[s], seconds, *no_gt, layout.clip_snippets, layout.stride,
                         train=False, time_offset=offset) for s in models}
    return predict_fused(models, clips, {video_id: grid.duration}, classes, weights, config, device=device,
                         video_labels=video_labels)


def predict_fused(models: dict[str, DSSAD], clips: dict[str, Sequence[Clip]], durations: dict[str, float],
                  classes: Sequence[str], weights: dict[str, float] | None = None,
                  config: InferenceConfig = InferenceConfig(), batch: int = 16,
                  device: torch.device | str = "cpu", video_labels: VideoLabels | None = None) -> Detections:
    """:func:`fuse_detections` of the given streams' models on their clips."""
    streams = list(models)
    scores = {s: anchor_scores(models[s], clips[s], batch, device) for s in streams}
    return fuse_detections(scores, clips[streams[0]], models[streams[0]].anchors, durations, classes, weights,
                           config, video_labels)


def _merge(per_video: dict[str, list[tuple[Tensor, Tensor, Tensor]]], durations: dict[str, float],
           classes: Sequence[str], config: InferenceConfig) -> Detections:
    vid, lab, start, end, score = [], [], [], [], []
    for video_id, parts in per_video.items():
        scores = torch.cat([p[2] for p in parts])
        best = torch.argsort(-scores, stable=True)[:config.candidates_per_video]
        segments = torch.cat([p[0] for p in parts])[best].clamp(0, durations[video_id])
        labels, scores = torch.cat([p[1] for p in parts])[best], scores[best]
        valid = segments[:, 1] > segments[:, 0]
        segments, labels, scores = segments[valid], labels[valid], scores[valid]
        kept, kept_scores = suppress(segments, scores, labels, config)
        vid += [video_id] * len(kept)
        lab += [classes[c] for c in labels[kept].tolist()]
        start += segments[kept, 0].tolist()
        end += segments[kept, 1].tolist()
        score += kept_scores.tolist()
    return Detections(vid, lab, np.array(start), np.array(end), np.array(score))


def fit(model: DSSAD, clips: Sequence[Clip], config: TrainConfig, device: torch.device | str = "cpu"
        ) -> list[dict[str, float]]:
    """Train for ``config.epochs`` epochs with the configured optimiser and schedule."""
    optimizer, schedule = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    for _ in range(config.epochs):
        history.append(train_one_epoch(model, clips, optimizer, config, generator, device=device))
        schedule.step()
    return history
