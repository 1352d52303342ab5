"""A synthetic THUMOS'14-like benchmark on which relation modelling can be measured honestly.

Real snippet features of THUMOS'14 cannot be had here, so this module writes a dataset in the
same files as real data (ActionFormer-style annotation JSON, ``features/<stream>/<video>.npy``
on the I3D snippet grid, SSN proposal lists), from a generative model with one knob per relation
that the Graph Convolutional Module is meant to exploit:

- **structure** (card ``structure``, measured from the real THUMOS'14 annotations by
  :func:`measure_structure`): video durations, per-class action lengths, foreground fraction
  (about 29%, so 71% background), a second co-occurring class in about 15% of videos;
- **class coherence** (``class_coherence``): the instances of a video belong to its one or two
  classes (as in THUMOS'14), rather than to any class: disjoint instances inform each other;
- **scene** (``scene_tie``, ``scene_in_action``): every video has a scene, a vector shared by its
  background and (weakly) its actions; each class has a home scene it occurs in with probability
  ``scene_tie``. Background units around an action tell its scene: surrounding edges;
- **confusable pairs** (``confusion``): classes 2j and 2j+1 share most of their body pattern
  (like CliffDiving and Diving) and have different home scenes, so context separates them;
- **phases** (``phase_fraction``, ``phase_identity``): an action starts and ends with distinct
  phases; the class identity shows in those phases, which a slightly shifted unit misses but
  its overlapping neighbours include: contextual edges; they also make completeness observable;
- **instance quality** (``weak_fraction``, ``weak_amplitude``): some instances are weak copies;
  the clear instances of the same class elsewhere in the video help: semantic edges;
- **shared look** (``shared_look``): the instances of a video are one event filmed one way (the
  same athletes, venue and cameras), so part of what sets an instance's features apart from
  its class's pattern is common to every instance of the video, weak or clear, and links a weak
  instance to the video's clear ones (semantic edges). 0 in the shipped card: at 1 it makes
  D-SSAD's GCM help but SSN's contextual edges stop helping (README, "Detection quality");
- **streams**: rgb (strong scene, weaker action, more noise) and flow (the more informative).

The relation-free control sets every relation knob to 0. Proposals imitate TAG/BSN: jittered
clusters around instances (a few instances missed, for a recall at tIoU 0.5 near 0.85), partial
and merged units, and background windows, listed best first (SSN lists carry no score).
Everything is deterministic for a seed; each video draws from its own seeded stream.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gcm_core.data.annotations import write_annotations_json
from gcm_core.data.atomic import atomic_save_npy, atomic_write_text
from gcm_core.data.cards import DatasetCard
from gcm_core.data.model import Instance, Proposals, Video
from gcm_core.data.proposals import write_ssn_list
from gcm_core.metrics import Segments, average_recall

FPS, STRIDE, CLIP = 30.0, 8, 64


@dataclass(frozen=True)
class Relations:
    """Strength of each relation carried by the features (0 everywhere: the control)."""

    class_coherence: float = 1.0
    scene_tie: float = 0.9
    scene_in_action: float = 0.3
    confusion: float = 0.85
    phase_fraction: float = 0.2
    phase_identity: float = 1.0
    weak_fraction: float = 0.4
    weak_amplitude: float = 0.35
    shared_look: float = 0.0

    @classmethod
    def control(cls) -> "Relations":
        return cls(**{k: 0.0 for k in asdict(cls())})


@dataclass(frozen=True)
class StreamProfile:
    """Amplitudes of the scene and action signals and of the noise in one stream.

    ``segment_noise``: the share of the noise variance that is constant over an instance (or a
    background stretch between instances): the nuisance of real features (who acts, how it is
    filmed) changes between instances, not between consecutive snippets (the relation knob
    ``shared_look`` makes part of it common to a video's instances). The rest varies from snippet
    to snippet, smoothly: an AR(1) process over 8-frame blocks with time constant ``noise_time``
    seconds (content changes slowly), averaged over each snippet's 64 frames.
    """

    scene: float
    action: float
    noise: float
    segment_noise: float = 0.0
    noise_time: float = 0.0     # seconds over which the snippet-level noise stays correlated


STREAMS = {"rgb": StreamProfile(scene=1.0, action=0.8, noise=0.9),
           "flow": StreamProfile(scene=0.5, action=1.1, noise=0.8)}


@dataclass(frozen=True)
class Scale:
    train_videos: int
    test_videos: int
    dim: int
    max_duration: float


SCALES = {"small": Scale(48, 24, 128, 120.0),
          "medium": Scale(200, 213, 256, 900.0),
          "full": Scale(200, 213, 1024, 1800.0)}


@dataclass(frozen=True)
class Structure:
    """Video statistics (measured from THUMOS'14; see the synthetic card)."""

    log_duration: tuple[float, float] = (4.98, 0.878)
    min_duration: float = 9.0
    foreground_fraction: tuple[float, float] = (0.292, 0.205)
    second_class_probability: float = 0.148
    class_log_length: tuple[tuple[float, float], ...] = field(default_factory=lambda: ((1.11, 0.835),) * 20)
    num_scenes: int = 5
    distractors_per_minute: float = 1.0


def measure_structure(videos: dict[str, Video], classes: list[str]) -> dict[str, Any]:
    """Statistics of real annotations, in the form of the card's ``structure`` section."""
    annotated = [v for v in videos.values() if v.instances and v.duration]
    durations = np.log([v.duration for v in annotated])
    fractions = []
    for v in annotated:
        grid = np.zeros(int(v.duration * 10) + 1, dtype=bool)
        for i in v.instances:
            grid[int(i.start * 10):int(i.end * 10)] = True
        fractions.append(grid.mean())
    lengths = {c: [] for c in classes}
    for v in annotated:
        for i in v.instances:
            lengths[i.label].append(np.log(max(i.end - i.start, 1e-3)))
    return {
        "log_duration": [round(float(durations.mean()), 3), round(float(durations.std()), 3)],
        "min_duration": round(float(np.exp(durations.min())), 1),
        "foreground_fraction": [round(float(np.mean(fractions)), 3), round(float(np.std(fractions)), 3)],
        "second_class_probability": round(float(np.mean([len({i.label for i in v.instances}) > 1 for v in annotated])), 3),
        "class_log_length": [[round(float(np.mean(lengths[c])), 3), round(float(np.std(lengths[c])), 3)] for c in classes],
        "videos": len(annotated),
        "instances": sum(len(v.instances) for v in annotated),
    }


def home_scene(label: int, num_scenes: int) -> int:
    return label % num_scenes


def partner(label: int) -> int:
    """The confusable partner of a class (classes 2j and 2j + 1)."""
    return label ^ 1


def sample_video(rng: np.random.Generator, vid: str, subset: str, classes: list[str], structure: Structure,
                 relations: Relations, max_duration: float) -> tuple[Video, dict[str, Any]]:
    """One video's annotation and its latent facts (scene, instance qualities, distractors)."""
    mean, std = structure.log_duration
    duration = float(np.clip(np.exp(rng.normal(mean, std)), structure.min_duration, max_duration))
    n_scenes = structure.num_scenes
    first = int(rng.integers(len(classes)))
    scene = home_scene(first, n_scenes) if rng.random() < relations.scene_tie else int(rng.integers(n_scenes))
    labels = [first]
    if rng.random() < structure.second_class_probability:
        same_scene = [c for c in range(len(classes)) if home_scene(c, n_scenes) == home_scene(first, n_scenes) and c != first]
        labels.append(int(rng.choice(same_scene)))
    m, s = structure.foreground_fraction
    concentration = max(m * (1 - m) / max(s * s, 1e-6) - 1, 0.5)
    target = float(rng.beta(m * concentration, (1 - m) * concentration)) * duration
    spans, total = [], 0.0
    while total < target or not spans:
        label = labels[int(rng.integers(len(labels)))]
        if rng.random() >= relations.class_coherence:  # an instance unrelated to the video's classes
            label = int(rng.integers(len(classes)))
        mu, sigma = structure.class_log_length[label]
        length = float(np.clip(np.exp(rng.normal(mu, sigma)), 0.4, 0.5 * duration))
        if total + length > 0.95 * duration:
            break
        spans.append((label, length))
        total += length
    gaps = rng.dirichlet(np.ones(len(spans) + 1)) * (duration - total)
    instances, t = [], 0.0
    for (label, length), gap in zip(spans, gaps):
        t += gap
        instances.append(Instance(classes[label], round(t, 2), round(min(t + length, duration), 2)))
        t += length
    instances = [i for i in instances if i.end - i.start > 0.1]
    quality = np.where(rng.random(len(instances)) < relations.weak_fraction, relations.weak_amplitude, 1.0)
    n_distractors = rng.poisson(structure.distractors_per_minute * duration / 60)
    distractors = [(float(s), float(s + rng.uniform(0.5, 2.5)), int(rng.integers(len(classes))))
                   for s in rng.uniform(0, max(duration - 3, 0.1), n_distractors)]
    n_frames = int(duration * FPS)
    video = Video(vid, duration=round(n_frames / FPS, 4), fps=FPS, n_frames=n_frames, subset=subset, instances=instances)
    return video, {"scene": scene, "quality": quality.tolist(), "distractors": distractors}


class Directions:
    """The random latent directions of one stream (unit vectors in the feature space)."""

    def __init__(self, seed: int, stream: str, dim: int, num_classes: int, num_scenes: int) -> None:
        rng = np.random.default_rng([seed, 7919, list(STREAMS).index(stream)])

        def unit(n: int) -> np.ndarray:
            v = rng.standard_normal((n, dim))
            return v / np.linalg.norm(v, axis=1, keepdims=True)

        self.scene = unit(num_scenes)
        self.own = unit(num_classes)
        self.shared = unit((num_classes + 1) // 2)
        self.identity = unit(num_classes)
        self.start = unit((num_classes + 1) // 2)
        self.end = unit((num_classes + 1) // 2)

    def body(self, label: int, confusion: float) -> np.ndarray:
        v = np.sqrt(1 - confusion) * self.own[label] + np.sqrt(confusion) * self.shared[label // 2]
        return v / np.linalg.norm(v)


def snippet_windows(n_frames: int) -> np.ndarray:
    """[T, 2] seconds covered by each I3D snippet (frames [8t, 8t + 64))."""
    t = np.arange(max(1, (n_frames - CLIP) // STRIDE + 1))
    return np.stack([t * STRIDE / FPS, (t * STRIDE + CLIP) / FPS], axis=1)


def _coverage(windows: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """[T, R] share of each snippet window inside each region."""
    inter = np.minimum(windows[:, None, 1], regions[None, :, 1]) - np.maximum(windows[:, None, 0], regions[None, :, 0])
    return np.clip(inter, 0, None) / (windows[:, 1:2] - windows[:, 0:1])


def render_features(rng: np.random.Generator, video: Video, latent: dict[str, Any], classes: list[str],
                    directions: Directions, profile: StreamProfile, relations: Relations) -> np.ndarray:
    """The [T, C] float32 snippet features of one video in one stream."""
    index = {c: k for k, c in enumerate(classes)}
    windows = snippet_windows(video.n_frames)
    regions, signals = [], []
    for inst, amp in zip(video.instances, latent["quality"]):
        label = index[inst.label]
        length = inst.end - inst.start
        phase = relations.phase_fraction * length
        body = directions.body(label, relations.confusion) * profile.action * amp
        regions.append((inst.start, inst.end))
        signals.append(body)
        if phase > 0:
            identity = relations.phase_identity * directions.identity[label]
            for where, d in (((inst.start, inst.start + phase), directions.start[label // 2]),
                             ((inst.end - phase, inst.end), directions.end[label // 2])):
                regions.append(where)
                signals.append((d + identity) * profile.action * amp)
    for s, e, label in latent["distractors"]:
        regions.append((s, e))
        signals.append(0.5 * profile.action * directions.body(label, relations.confusion))
    cover = _coverage(windows, np.array(regions).reshape(-1, 2))
    x = cover @ np.array(signals)
    in_action = np.clip(_coverage(windows, np.array([(i.start, i.end) for i in video.instances]).reshape(-1, 2)).sum(1), 0, 1)
    scene_weight = profile.scene * (1 - in_action * (1 - relations.scene_in_action))
    dim = directions.scene.shape[1]
    scene = directions.scene[latent["scene"]] + 0.5 * rng.standard_normal(dim) / np.sqrt(dim)  # per-video look
    x = x + scene_weight[:, None] * (scene / np.linalg.norm(scene))
    # noise of each 8-frame block, averaged over the 8 blocks of a snippet's 64 frames: consecutive
    # snippets share 7/8 of their frames, and of their noise, as real I3D snippets do
    blocks = CLIP // STRIDE
    block_noise = rng.standard_normal((windows.shape[0] + blocks - 1, dim))
    if profile.noise_time > 0:
        rho = float(np.exp(-STRIDE / FPS / profile.noise_time))
        for t in range(1, block_noise.shape[0]):  # stationary AR(1): unit variance kept
            block_noise[t] = rho * block_noise[t - 1] + np.sqrt(1 - rho * rho) * block_noise[t]
    smooth = np.lib.stride_tricks.sliding_window_view(block_noise, blocks, axis=0).sum(-1) / np.sqrt(blocks)
    scale = profile.noise / np.sqrt(dim)  # |noise| ~ profile.noise per snippet
    x = x + scale * np.sqrt(1 - profile.segment_noise) * smooth
    if profile.segment_noise > 0:
        segments, instances = _segments(video)
        nuisance = rng.standard_normal((len(segments), dim))
        if relations.shared_look > 0:  # the instances' nuisance: partly the video's look, variance kept
            look = rng.standard_normal(dim)
            share = relations.shared_look
            nuisance[instances] = np.sqrt(1 - share) * nuisance[instances] + np.sqrt(share) * look
        x = x + scale * np.sqrt(profile.segment_noise) * (_coverage(windows, segments) @ nuisance)
    return x.astype(np.float32)


def _segments(video: Video) -> tuple[np.ndarray, np.ndarray]:
    """[S, 2] the instances and the background stretches between them, covering the video, and
    [S] which of them are instances."""
    spans = sorted((i.start, i.end) for i in video.instances)
    out, instance, t = [], [], 0.0
    for s, e in spans:
        if s > t:
            out.append((t, s))
            instance.append(False)
        out.append((s, e))
        instance.append(True)
        t = max(t, e)
    out.append((t, max(video.duration, t + 1e-3)))
    instance.append(False)
    return np.array(out), np.array(instance)


def sample_proposals(rng: np.random.Generator, video: Video) -> np.ndarray:
    """[P, 2] TAG-like proposals in seconds, best first (see the module docstring)."""
    d = video.duration
    spans = np.array([(i.start, i.end) for i in video.instances]).reshape(-1, 2)
    out = []
    for s, e in spans:
        length = e - s
        jitter = rng.uniform(0.05, 0.3) if rng.random() < 0.85 else 1.0  # some instances are missed
        for _ in range(int(rng.integers(6, 14))):
            a, b = s + rng.normal(0, jitter) * length, e + rng.normal(0, jitter) * length
            out.append((a, b, 1.0 - jitter))
        for _ in range(int(rng.integers(2, 6))):  # partial units: incomplete samples
            share = rng.uniform(0.2, 0.6)
            a = s + rng.uniform(0, 1 - share) * length
            out.append((a, a + share * length, 0.3))
    for k in range(len(spans) - 1):  # merged neighbours
        if rng.random() < 0.3:
            out.append((spans[k, 0], spans[k + 1, 1], 0.2))
    for _ in range(int(rng.poisson(0.45 * d))):  # background windows of TAG-like scales
        length = float(np.exp(rng.uniform(np.log(0.8), np.log(min(40.0, d)))))
        a = rng.uniform(0, max(d - length, 1e-3))
        out.append((a, a + length, 0.0))
    props = np.array(out, dtype=np.float64).reshape(-1, 3)
    props[:, :2] = np.clip(props[:, :2], 0, d)
    props = props[props[:, 1] - props[:, 0] > 2 * STRIDE / FPS]
    confidence = props[:, 2] + rng.normal(0, 0.25, len(props))
    return props[np.argsort(-confidence, kind="stable"), :2]


def generate_dataset(out_dir: str | Path, card: DatasetCard, scale: str = "small", seed: int = 0,
                     control: bool = False, structure_from: dict[str, Video] | None = None,
                     proposals_from: dict[str, Proposals] | None = None) -> dict[str, Any]:
    """Write a synthetic dataset laid out as real data under ``out_dir``; return its summary.

    The card gives classes, structure, relations and stream profiles; ``control`` zeroes every
    relation. ``structure_from``: real annotated videos whose durations and instances are used
    instead of sampled ones (their labels must be the card's classes, or are mapped onto them by
    sorted order); ``proposals_from``: real proposals for those videos.
    """
    out = Path(out_dir)
    size = SCALES[scale]
    relations = Relations.control() if control else Relations(**card.extra.get("relations", {}))
    structure = Structure(**{k: tuple(map(tuple, v)) if k == "class_log_length" else (tuple(v) if isinstance(v, list) else v)
                             for k, v in card.extra.get("structure", {}).items() if k in Structure.__dataclass_fields__})
    profiles = {s: StreamProfile(**p) for s, p in card.extra.get("stream_profiles", {}).items()} or STREAMS
    classes = list(card.classes)
    if structure_from is not None:
        _check_structure_source(structure_from, classes, card.subsets)
    videos, latents = _structures(seed, classes, structure, relations, size, structure_from)
    if proposals_from is None:
        proposals = {vid: _as_proposals(sample_proposals(np.random.default_rng([seed, 2, k]), v))
                     for k, (vid, v) in enumerate(videos.items())}
    else:
        proposals = {vid: proposals_from[vid] for vid in videos if vid in proposals_from}
    for stream in card.streams:
        directions = Directions(seed, stream, size.dim, len(classes), structure.num_scenes)
        for k, (vid, video) in enumerate(videos.items()):
            rng = np.random.default_rng([seed, 3, k, list(STREAMS).index(stream)])
            feats = render_features(rng, video, latents[vid], classes, directions, profiles[stream], relations)
            atomic_save_npy(card.path("features", out, stream=stream, video=vid), feats)
    write_annotations_json(card.path("annotations", out), videos, classes)
    for role in ("train", "test"):
        subset = card.subsets[role]
        chosen = {vid: p for vid, p in proposals.items() if videos[vid].subset == subset}
        write_ssn_list(card.path(f"proposals.{role}", out), videos, chosen, classes)
    summary = _summary(videos, proposals, relations, scale, seed, size.dim, control)
    resolved = {**card.extra, "name": card.name, "classes": [{"name": c} for c in classes],
                "subsets": card.subsets, "streams": list(card.streams), "stream_fusion": card.stream_fusion,
                "snippets": {**card.snippets, "dim": size.dim}, "evaluation": card.evaluation,
                "units_per_video_test": card.units_per_video_test, "paths": card.paths,
                "relations": asdict(relations), "generated": summary}
    atomic_write_text(out / "card.yaml", yaml.safe_dump(resolved, sort_keys=False))
    return summary


def _check_structure_source(real: dict[str, Video], classes: list[str], subsets: dict[str, str]) -> None:
    """Real videos lend their structure only where the card can hold it: labels among its classes
    or at most as many (mapped onto them), and videos in its train or test subset."""
    names = {i.label for v in real.values() for i in v.instances}
    if not names <= set(classes) and len(names) > len(classes):
        raise ValueError(f"the real annotations name {len(names)} classes, the synthetic card {len(classes)}: give "
                         "--card a synthetic card with as many classes (its classes and structure.class_log_length)")
    found = {(v.subset or "").lower() for v in real.values()}
    if not found & {s.lower() for s in subsets.values()}:
        raise ValueError(f"the real videos' subsets {sorted(found)} are not the card's {sorted(subsets.values())}: "
                         "give --card a synthetic card whose subsets name them")


def _structures(seed: int, classes: list[str], structure: Structure, relations: Relations, size: Scale,
                real: dict[str, Video] | None) -> tuple[dict[str, Video], dict[str, dict[str, Any]]]:
    videos, latents = {}, {}
    if real is None:
        plan = [("validation", k) for k in range(size.train_videos)] + [("test", k) for k in range(size.test_videos)]
        for n, (subset, k) in enumerate(plan):
            rng = np.random.default_rng([seed, 1, n])
            video, latent = sample_video(rng, f"synth_{subset}_{k:05d}", subset, classes, structure, relations,
                                         size.max_duration)
            videos[video.id], latents[video.id] = video, latent
        return videos, latents
    real_names = sorted({i.label for v in real.values() for i in v.instances})
    rename = dict(zip(real_names, classes)) if not set(real_names) <= set(classes) else {c: c for c in real_names}
    for n, (vid, v) in enumerate(real.items()):
        if not v.instances or not v.duration:
            continue
        rng = np.random.default_rng([seed, 1, n])
        fps = v.fps or FPS
        instances = [Instance(rename[i.label], i.start, min(i.end, v.duration)) for i in v.instances]
        video = Video(vid, v.duration, FPS, int(v.duration * FPS), v.subset, instances)
        first = classes.index(instances[0].label)
        scene = home_scene(first, structure.num_scenes) if rng.random() < relations.scene_tie \
            else int(rng.integers(structure.num_scenes))
        quality = np.where(rng.random(len(instances)) < relations.weak_fraction, relations.weak_amplitude, 1.0)
        videos[vid] = video
        latents[vid] = {"scene": scene, "quality": quality.tolist(), "distractors": [], "source_fps": fps}
    return videos, latents


def _as_proposals(intervals: np.ndarray) -> Proposals:
    return Proposals(intervals[:, 0], intervals[:, 1], np.linspace(1.0, 0.0, len(intervals)))


def _summary(videos: dict[str, Video], proposals: dict[str, Proposals], relations: Relations, scale: str,
             seed: int, dim: int, control: bool) -> dict[str, Any]:
    gt = [(k, 0, i.start, i.end) for k, v in enumerate(videos.values()) for i in v.instances]
    index = {vid: k for k, vid in enumerate(videos)}
    props = [(index[vid], 0, s, e, sc) for vid, p in proposals.items() for s, e, sc in zip(p.start, p.end, p.score)]
    recall = average_recall(Segments(*zip(*gt)), Segments(*zip(*props)), [50, 100, 200], [0.5, 0.7]) if props else None
    total = sum(v.duration for v in videos.values())
    fg = sum(i.end - i.start for v in videos.values() for i in v.instances)
    return {
        "scale": scale, "seed": seed, "dim": dim, "control": control,
        "videos": {s: sum(v.subset == s for v in videos.values()) for s in sorted({v.subset for v in videos.values()})},
        "instances": len(gt), "instances_per_video": round(float(len(gt) / len(videos)), 2),
        "background_fraction": round(float(1 - fg / total), 3),
        "proposals_per_video": round(float(len(props) / max(len(proposals), 1)), 1),
        "recall": None if recall is None else {f"AN={an}": {f"tIoU={t}": round(float(recall[ti, ai]), 3)
                                                              for ti, t in enumerate((0.5, 0.7))}
                                               for ai, an in enumerate((50, 100, 200))},
    }
