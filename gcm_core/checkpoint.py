"""Self-contained checkpoints: weights of every stream's head, the resolved configuration, the
regression statistics and the class list. Loading needs nothing else (no Ray, no dataset, no
pickled objects: plain types and tensors, read with ``weights_only=True``).
"""
from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcm_core.data.atomic import atomic_write
from gcm_core.data.dataset import VideoInputs
from gcm_core.data.features import torch_load_problem
from gcm_core.data.model import Detections, FormatError, Proposals, Video
from gcm_core.data.pooling import SnippetGrid, rate_per_video
from gcm_core.data.prepared import prepare_video
from gcm_core.data.sampling import RegressionStats
from gcm_core.detectors.base import ModelConfig
from gcm_core.engine import StreamHeads, UnitDataset, build_heads, detections_of, predict
from gcm_core.candidates import CandidateCaps
from gcm_core.graph import GraphSpec
from gcm_core.postprocess import InferenceConfig, VideoLabels

FORMAT = "gcm-tal/checkpoint/1"


@dataclass
class Checkpoint:
    classes: list[str]
    model_config: ModelConfig
    graph: GraphSpec
    inference: InferenceConfig
    snippets: dict[str, Any]              # the snippet layout the features follow (card ``snippets``)
    heads: StreamHeads
    stats: RegressionStats
    extra: dict[str, Any] = field(default_factory=dict)   # resolved run config, metrics, epoch
    # a video's best-scored proposals scored at test (its card's units_per_video_test, which its
    # test split was prepared with); None: every proposal
    units_per_video: int | None = None

    @property
    def streams(self) -> list[str]:
        return list(self.heads.keys())

    @property
    def dims(self) -> dict[str, int]:
        """The width of the snippet features each stream's head reads."""
        return {s: int(head.classifier.in_features) for s, head in self.heads.items()}


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` atomically."""
    payload = {
        "format": FORMAT,
        "classes": list(checkpoint.classes),
        "model_config": asdict(checkpoint.model_config),
        "graph": asdict(checkpoint.graph),
        "inference": asdict(checkpoint.inference),
        "snippets": dict(checkpoint.snippets),
        "dims": checkpoint.dims,
        "heads": checkpoint.heads.state_dict(),
        "regression": checkpoint.stats.as_dict(),
        "extra": checkpoint.extra,
        "units_per_video": checkpoint.units_per_video,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    """A checkpoint written by :func:`save_checkpoint`, models rebuilt and in eval mode."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint {path}")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated, corrupt, or holding objects that would need unpickling
        raise ValueError(f"{path}: unreadable checkpoint: {torch_load_problem(err)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a gcm-tal checkpoint")
    model_config = ModelConfig(**payload["model_config"])
    inference = payload["inference"]
    if inference["fusion"] is not None:
        inference["fusion"] = tuple(tuple(x) for x in inference["fusion"])
    heads = build_heads(model_config, list(payload["dims"]), payload["dims"], len(payload["classes"]))
    heads.load_state_dict(payload["heads"])
    return Checkpoint(payload["classes"], model_config, GraphSpec(**payload["graph"]), InferenceConfig(**inference),
                      payload["snippets"], heads.to(device).eval(), RegressionStats.from_dict(payload["regression"]),
                      payload.get("extra", {}), payload.get("units_per_video"))


def check_feature_widths(reads: Mapping[str, int], given: Mapping[str, int], path: str | Path,
                         video: str | None = None) -> None:
    """Stop, naming ``path``, where the features given to a trained model are not those it reads
    (``reads``: each stream's width): a stream missing, or another width (features of another
    extractor, or the streams in another order), instead of a shape error deep inside the model."""
    missing = [s for s in reads if s not in given]
    if missing:
        raise FormatError(path, f"no features of stream(s) {missing}; the model reads {list(reads)}", video=video)
    wrong = [f"{s} features are {given[s]}-d, the model's {s} stream reads {width}-d"
             for s, width in reads.items() if given[s] != width]
    if wrong:
        raise FormatError(path, "; ".join(wrong) + " (features of another extractor, or the streams in another "
                                "order?)", video=video)


def video_layout(snippets: dict[str, Any], num_snippets: int, video_id: str = "video", fps: float | None = None,
                 duration: float | None = None) -> tuple[Video, SnippetGrid]:
    """A new video of ``num_snippets`` snippets on a checkpoint's snippet layout (a card's
    ``snippets``): ``fps`` defaults to the layout's, ``duration`` to the time the snippets cover.
    Snippets laid on each video's own frame rate (``fps: native``, THUMOS'14's I3D features) need
    the video's ``fps``: THUMOS'14 videos run at 24-30 fps, and a rate taken for granted would
    put the detections in other seconds. Features rescaled to a fixed number of positions
    (ActivityNet's) cover the whole video whatever its length: their ``duration`` must be given."""
    if snippets.get("convention") == "rescaled" and duration is None:
        raise ValueError(f"video {video_id}: its features are rescaled to {num_snippets} positions whatever the "
                         "video's length, so its duration must be given (gcm detect: --duration, or --video-info "
                         "for a folder)")
    layout_fps = snippets.get("fps", "native")
    if rate_per_video(snippets) and fps is None:
        raise ValueError(f"video {video_id}: the checkpoint's snippets lie on each video's own frame rate (its "
                         "card's snippets.fps: native), so this video's frame rate must be given (gcm detect: --fps, "
                         "or --video-info with frame rates for a folder)")
    rate = fps or (30.0 if layout_fps == "native" else float(layout_fps))   # (rescaled positions need no rate)
    length = duration or SnippetGrid.of_layout(snippets, num_snippets, 1.0, rate).covered_until()
    return Video(video_id, duration=length, fps=rate), SnippetGrid.of_layout(snippets, num_snippets, length, rate)


def detect_video(checkpoint: Checkpoint, features: dict[str, np.ndarray], intervals: np.ndarray,
                 video_id: str = "video", fps: float | None = None, duration: float | None = None,
                 scores: np.ndarray | None = None) -> Detections:
    """Detections of one new video from its snippet features (per stream) and proposals (seconds;
    with ``scores``, the best-scored are the checkpoint's test units), the video laid out by
    :func:`video_layout`."""
    video, grid = video_layout(checkpoint.snippets, next(iter(features.values())).shape[0], video_id, fps, duration)
    iv = np.asarray(intervals, dtype=np.float64).reshape(-1, 2)
    proposals = Proposals(iv[:, 0], iv[:, 1], np.ones(len(iv)) if scores is None else scores)
    return detect_laid_out(checkpoint, features, proposals, video, grid)


def detect_laid_out(checkpoint: Checkpoint, features: dict[str, np.ndarray], proposals: Proposals, video: Video,
                    grid: SnippetGrid, device: torch.device | str = "cpu",
                    video_labels: VideoLabels | None = None) -> Detections:
    """:func:`detect_video` of a video already laid out (its :func:`video_layout`), pooled and
    scored on ``device``, where the checkpoint's heads must be; of its proposals, the
    checkpoint's number of test units, best-scored first, as its test split was prepared; with
    external ``video_labels`` if given."""
    missing = set(checkpoint.streams) - set(features)
    if missing:
        raise ValueError(f"the checkpoint was trained on streams {sorted(checkpoint.streams)}; "
                         f"features missing for {sorted(missing)}")
    inputs = VideoInputs(video, proposals, {s: features[s] for s in checkpoint.streams}, grid)
    spec = checkpoint.graph
    comp = checkpoint.model_config.completeness_features
    parts = ("body", comp) if comp else ("body",)   # pooled for the head, no more
    prepared = prepare_video(inputs, checkpoint.classes, train=False, caps=CandidateCaps.for_spec(spec), parts=parts,
                             max_units=checkpoint.units_per_video, device=device)
    per_stream = {s: predict(head, UnitDataset([prepared], s, spec, comp), checkpoint.stats, device)
                  for s, head in checkpoint.heads.items()}
    return detections_of([prepared], per_stream, checkpoint.classes, checkpoint.inference, video_labels)
