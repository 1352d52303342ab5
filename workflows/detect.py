"""``gcm detect``: actions in new videos, from their snippet features (and proposals for a
two-stage head), as one Detections for an ActivityNet result JSON.

One video or a folder of many laid out as a dataset's features. A folder runs in this process,
or, with several workers or a cluster, as Ray tasks over chunks of its videos (each task loads
the checkpoint and indexes the proposal file once); every video is detected alone, so the
result is the same either way. In this process the model runs on the ``--device`` asked for (a
GPU where torch sees one, by default); Ray tasks run on GPUs where the cluster has them, each
task on a share of one (inference is light, as in ``gcm evaluate``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcm_core.checkpoint import Checkpoint, check_feature_widths, detect_laid_out, load_checkpoint, video_layout
from gcm_core.data.formats import (
    Detections, FormatError, ProposalSource, Proposals, Video, align_streams, holds_many_videos, load_features,
    read_annotations, read_video_info, read_video_proposals, split_streams,
)
from gcm_core.data.model import video_key
from gcm_core.one_stage import detect_video as detect_video_one_stage
from gcm_core.postprocess import VideoLabels, stream_weights
from workflows.config import check_fusion_streams, overridden
from workflows.progress import Progress
from workflows.train_one_stage import OneStageCheckpoint, is_one_stage_checkpoint, load_one_stage

VideoFiles = tuple[str, list[Path]]   # a video's id and its feature files (one per stream, or one for all)
CHUNKS_PER_WORKER = 4                 # a folder's videos differ in length: smaller chunks balance the workers
GPU_SHARE = 0.25                      # of one GPU, per Ray task on a GPU cluster


def resolve_device(name: str) -> torch.device:
    """The device of ``--device``: ``auto`` is a GPU where torch sees one, else the CPU. A GPU
    torch does not see is refused here rather than at the first tensor moved to it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ValueError(f"--device {name}: torch sees {seen} CUDA device(s) on this machine "
                         f"(torch {torch.__version__}); give --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def folder_videos(folder: Path, streams: list[str], columns: dict[str, list[int]] | None) -> list[VideoFiles]:
    """Every video of a features folder with its files: ``<video>.<ext>`` holding every stream
    (``columns``), else ``<stream>/<video>.<ext>`` per stream (the first stream's folder lists them)."""
    listed = folder if columns else folder / streams[0]
    files = sorted(f for f in listed.glob("*") if f.suffix in (".npy", ".npz", ".pt"))
    if not files:
        layout = "<video>.npy" if columns else f"{streams[0]}/<video>.npy"
        raise FileNotFoundError(f"no feature files in {listed} (expected {layout} under {folder})")
    return [(f.stem, [f] if columns else [folder / s / f.name for s in streams]) for f in files]


@dataclass
class Detector:
    """A checkpoint of either kind loaded for detection: a two-stage head (``model.pt``, scores
    proposals) or a one-stage D-SSAD run (``dssad.pt``, reads the features alone)."""

    model: Checkpoint | OneStageCheckpoint
    one_stage: bool
    streams: list[str]
    columns: dict[str, list[int]] | None   # where one feature file holds every stream
    device: torch.device                   # where its weights are and its videos are computed
    video_labels: VideoLabels | None = None   # external video-level classes, given to every video's units

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu", inference: dict[str, Any] | None = None,
             video_labels: VideoLabels | None = None) -> "Detector":
        """The checkpoint at ``path`` on ``device``, post-processing with ``inference`` (settings
        of :class:`InferenceConfig`) in place of its own (fusion weights: of its streams only) and
        with ``video_labels`` if given."""
        device = torch.device(device)
        inference = inference or {}
        if is_one_stage_checkpoint(path):
            model = load_one_stage(path)
            model.models.to(device)
            # a run's config checks its fusion weights when built (0 in all, streams it does not have)
            model.stage = replace(model.stage, inference=overridden(model.stage.inference, inference))
            return cls(model, True, list(model.stage.streams), model.snippets.get("stream_columns"), device,
                       video_labels)
        model = load_checkpoint(path)
        model.heads.to(device)
        model.inference = overridden(model.inference, inference)
        stream_weights(model.streams, model.inference.weights())   # 0 in all: refused before any video
        if "fusion" in inference:   # the checkpoint's own weights were checked when its run was configured
            check_fusion_streams(model.inference.weights(), model.streams, str(path))
        return cls(model, False, list(model.streams), model.snippets.get("stream_columns"), device, video_labels)


def video_features(paths: list[Path], streams: list[str], columns: dict[str, list[int]] | None,
                   video_id: str) -> dict[str, np.ndarray]:
    """A new video's features of each stream: a file each, in the streams' order, or one file
    holding them all side by side where the checkpoint's snippet layout gives their ``columns``."""
    if columns and len(paths) == 1:
        every = split_streams(load_features(paths[0], video_id), columns, paths[0], video_id)
        return {s: every[s] for s in streams}
    if len(paths) != len(streams):
        raise ValueError(f"the checkpoint has streams {streams}: give one --features file for each, in that order"
                         + (", or the one file holding them all" if columns else ""))
    return align_streams({s: load_features(path, video_id) for s, path in zip(streams, paths)}, paths[0], video_id)


@dataclass(frozen=True)
class VideoFacts:
    """Each video's duration and frame rate as a video-info or annotation file gives them
    (``--video-info``), keyed by :func:`video_key` (ActivityNet ids with or without ``v_``)."""

    path: Path
    videos: dict[str, Video]

    def of(self, video_id: str) -> Video:
        """The facts of ``video_id``. A video the file does not list is an error naming both: laid
        out by the checkpoint's frame rate instead, its detections could be in the seconds of
        another frame rate, unsaid."""
        known = self.videos.get(video_key(video_id))
        if known is None:
            raise FormatError(self.path, "not listed there: give a --video-info file that lists every video, or "
                                         "none to lay the videos out by --fps (or the checkpoint's frame rate)",
                              video=video_id)
        return known


def read_video_facts(path: Path) -> VideoFacts:
    """The facts of a video-info file (:func:`read_video_info`: BSN's ``video_info_new.csv``,
    mmtad's ``TH14_video_info.json``, ...) or of an annotation file."""
    try:
        videos = read_video_info(path)
    except FormatError as as_info:  # not a video-info file: annotation files give durations too
        try:
            videos = read_annotations(path)
        except FormatError as as_annotations:
            raise FormatError(path, f"neither a video-info file ({as_info}) nor an annotation file "
                                    f"({as_annotations})") from None
    return VideoFacts(path, {video_key(vid): video for vid, video in videos.items()})


def detect_videos(detector: Detector, videos: list[VideoFiles], proposals: Path | None = None,
                  fps: float | None = None, duration: float | None = None, facts: VideoFacts | None = None,
                  skip_bad: bool = False, progress: Progress | None = None) -> tuple[Detections, dict[str, str]]:
    """Detections of ``videos``, in their order, and the videos left out with the reason.

    A two-stage head scores the ``proposals`` (a file of one video's, or of many, indexed once).
    Each video's frame rate and duration come from its ``facts`` (:func:`read_video_facts`), else
    from ``fps`` / ``duration``, else from the checkpoint's layout and the span of the features.
    A video whose files fail their checks, or that the ``facts`` do not list, stops the run, or
    with ``skip_bad`` is left out.
    """
    many = ProposalSource(proposals, {}) if proposals and holds_many_videos(proposals) else None
    proposals_of = many.of if many else partial(read_video_proposals, proposals)
    found, skipped = [], {}
    for video_id, paths in videos:
        try:
            known = facts.of(video_id) if facts else None
            rate, length = (known.fps or fps, known.duration) if known else (fps, duration)
            found.append(_detect_one(detector, video_id, paths, rate, length, proposals_of))
        except FormatError as err:
            if not skip_bad:
                raise
            skipped[video_id] = str(err)
        if progress:
            progress.update()
    return Detections.concat(found), skipped


def _detect_one(detector: Detector, video_id: str, paths: list[Path], fps: float | None, duration: float | None,
                proposals_of: Callable[[Video], Proposals]) -> Detections:
    model = detector.model
    features, files = video_features(paths, detector.streams, detector.columns, video_id), ", ".join(map(str, paths))
    check_feature_widths(model.dims, {s: f.shape[1] for s, f in features.items()}, files, video_id)
    video, grid = video_layout(model.snippets, next(iter(features.values())).shape[0], video_id, fps, duration)
    if grid.misfit():  # e.g. a duration or frame rate (--duration, --fps, --video-info) that is not this video's
        raise FormatError(files, grid.misfit(), video=video_id)
    if detector.one_stage:
        return detect_video_one_stage(dict(model.models), features, grid, video_id, model.classes,
                                      model.stage.inference.weights(), model.stage.inference, detector.device,
                                      detector.video_labels)
    return detect_laid_out(model, features, proposals_of(video), video, grid, detector.device, detector.video_labels)


def task_gpus(device: str) -> float:
    """The share of a GPU each Ray task of :func:`detect_in_parallel` asks for, by ``--device``:
    ``auto`` :data:`GPU_SHARE` where the connected cluster has GPUs, ``cuda`` that share or an
    error where Ray would never give it, ``cpu`` none."""
    from workflows.ray_env import gpu_share

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device!r} with Ray tasks: Ray gives each task its GPU; give auto, cuda or cpu")
    setting = {"auto": None, "cpu": False, "cuda": True}[device]
    return gpu_share(setting, GPU_SHARE, "detection on GPUs", "give --device cpu")


def detect_in_parallel(checkpoint: Path, videos: list[VideoFiles], proposals: Path | None = None,
                       fps: float | None = None, facts: VideoFacts | None = None, skip_bad: bool = False,
                       workers: int | None = None, progress: Progress | None = None, gpus: float = 0.0,
                       inference: dict[str, Any] | None = None, video_labels: VideoLabels | None = None
                       ) -> tuple[Detections, dict[str, str]]:
    """:func:`detect_videos` as Ray tasks (one CPU and one thread each, and ``gpus`` of a GPU, on
    which the task then runs) over consecutive chunks of ``videos``, joined in their order;
    ``workers`` defaults to the CPUs of the Ray session (which must be running). The checkpoint,
    feature and proposal paths must be readable on every node; each task loads the checkpoint
    as :meth:`Detector.load` with ``inference`` and ``video_labels``."""
    import ray

    # Ray's workers do not run where the command was typed: they get absolute paths
    checkpoint, proposals = checkpoint.resolve(), proposals and proposals.resolve()
    videos = [(video_id, [path.resolve() for path in paths]) for video_id, paths in videos]
    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    count = min(len(videos), workers * CHUNKS_PER_WORKER)
    bounds = [len(videos) * k // count for k in range(count + 1)]
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_detect_chunk)
    facts, video_labels = ray.put(facts), ray.put(video_labels)  # once in the object store, not once per task
    chunks = {task.remote(checkpoint, videos[a:b], proposals, fps, facts, skip_bad, inference, video_labels): b - a
              for a, b in zip(bounds, bounds[1:])}
    pending = list(chunks)
    while pending:  # count each chunk's videos as it finishes
        done, pending = ray.wait(pending, num_returns=1)
        if progress:
            progress.update(chunks[done[0]])
    parts = ray.get(list(chunks))
    skipped = {video_id: why for _, left_out in parts for video_id, why in left_out.items()}
    return Detections.concat([found for found, _ in parts]), skipped


def _detect_chunk(checkpoint: Path, videos: list[VideoFiles], proposals: Path | None, fps: float | None,
                  facts: VideoFacts | None, skip_bad: bool, inference: dict[str, Any] | None,
                  video_labels: VideoLabels | None) -> tuple[Detections, dict[str, str]]:
    from workflows.ray_env import task_device

    torch.set_num_threads(1)  # the tasks share the node's cores
    return detect_videos(Detector.load(checkpoint, task_device(), inference, video_labels), videos, proposals, fps,
                         facts=facts, skip_bad=skip_bad)
