"""A video made ready for training and inference: pooled unit features, candidate edges, labels.

Preprocessing turns each :class:`~gcm_core.data.dataset.VideoInputs` into a
:class:`PreparedVideo` once (``prepare_video``); every later run only selects graph edges from
the stored candidates (rule 2 of ARCHITECTURE.md) and samples units. A training video's units
are its proposals followed by its ground-truth instances (SSN's practice); a test video's are its
proposals, capped at the card's units per video.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from gcm_core.data.dataset import VideoInputs
from gcm_core.data.model import Instance, Video
from gcm_core.data.pooling import PARTS, Reduce, unit_features
from gcm_core.data.sampling import SamplingConfig, UnitLabels, label_units, with_ground_truth
from gcm_core.candidates import CandidateCaps, CandidateEdges, candidate_edges, select_edges
from gcm_core.graph import Graph, GraphSpec


@dataclass
class PreparedVideo:
    """One video's units with everything a model needs, per feature stream."""

    video_id: str
    duration: float
    intervals: Tensor                                  # [N, 2] seconds (float64)
    features: dict[str, dict[str, Tensor]]             # stream -> part -> [N, C or 3C]
    candidates: dict[str, CandidateEdges]              # stream -> candidate edges (semantic by that stream)
    gt: Tensor                                          # [G, 2] instances, seconds
    gt_labels: Tensor                                   # [G] 0-based classes
    ambiguous: Tensor                                   # [A, 2] segments excluded from evaluation
    labels: UnitLabels | None = None                   # training videos only
    proposal_scores: Tensor | None = None              # [N] test units' proposal scores (1: a list without)
    graphs: dict[str, Graph] = field(default_factory=dict, repr=False)  # cache: stream -> selected graph

    @property
    def num_units(self) -> int:
        return int(self.intervals.shape[0])

    def as_video(self, classes: tuple[str, ...] | list[str]) -> Video:
        """The ground truth as a :class:`Video` (for evaluation)."""
        instances = [Instance(classes[c], s, e) for (s, e), c in zip(self.gt.tolist(), self.gt_labels.tolist())]
        return Video(self.video_id, self.duration, instances=instances,
                     ambiguous=[tuple(a) for a in self.ambiguous.tolist()])

    def graph(self, stream: str, spec: GraphSpec) -> Graph:
        """The graph of ``spec`` for ``stream`` (selected once per spec, then cached)."""
        key = f"{stream}:{spec}"
        if key not in self.graphs:
            self.graphs[key] = select_edges(self.candidates[stream], spec)
        return self.graphs[key]


def prepare_video(inputs: VideoInputs, classes: tuple[str, ...] | list[str], train: bool, *,
                  caps: CandidateCaps = CandidateCaps(), sampling: SamplingConfig = SamplingConfig(),
                  parts: tuple[str, ...] = PARTS, reduce: Reduce = "max", max_units: int | None = None,
                  device: torch.device | str = "cpu") -> PreparedVideo:
    """Pool unit features, compute candidate edges (per stream) and, for training, unit labels.

    Test units are the proposals best-scored first (a list without scores, as SSN's, keeps its
    order), at most ``max_units`` of them (the card's ``units_per_video_test``).
    ``device``: where pooling and edge computation run (a GPU worker passes ``cuda``); results
    come back on the CPU.
    """
    video = inputs.video
    index = {c: k for k, c in enumerate(classes)}
    gt = torch.tensor([(i.start, i.end) for i in video.instances], dtype=torch.float64).reshape(-1, 2)
    gt_labels = torch.tensor([index[i.label] for i in video.instances], dtype=torch.long)
    units = torch.as_tensor(inputs.proposals.intervals, dtype=torch.float64)
    proposal_scores = None
    if train:
        units = with_ground_truth(units, gt)
    else:
        best = torch.from_numpy(np.argsort(-inputs.proposals.score, kind="stable")[:max_units])
        units, proposal_scores = units[best], torch.as_tensor(inputs.proposals.score, dtype=torch.float64)[best]
    features, candidates = {}, {}
    for stream, snippets in inputs.features.items():
        pooled = unit_features(torch.from_numpy(snippets).to(device), units.to(device), inputs.grid, reduce, parts)
        features[stream] = {k: v.cpu() for k, v in pooled.items()}
        edges = candidate_edges(units.to(device), pooled["body"], caps)
        candidates[stream] = _to_cpu(edges)
    labels = label_units(units, gt, gt_labels, video.duration, sampling) if train else None
    ambiguous = torch.tensor(video.ambiguous, dtype=torch.float64).reshape(-1, 2)
    return PreparedVideo(video.id, float(video.duration), units, features, candidates, gt, gt_labels, ambiguous,
                         labels, proposal_scores)


def _to_cpu(edges: CandidateEdges) -> CandidateEdges:
    cols = {k: v.cpu() for k, v in edges.columns().items()}
    return CandidateEdges.from_columns(edges.num_nodes, edges.caps, cols)
