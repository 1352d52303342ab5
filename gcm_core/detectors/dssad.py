"""One-stage D-SSAD + GCM (section 3.5): snippet clip -> base 1-D convolutions -> multi-scale
temporal feature maps -> anchors at every cell, with decoupled classification and localisation
branches. A GCM with surrounding and semantic edges only (cells of one map do not overlap) can be
inserted on the maps of 1, 2 or 3 scales (Tables 11, 12); its units are the cells, with their
temporal extents, and its graph is rebuilt for every clip from the cells' current features
(:meth:`DSSAD.cell_graph`).
Cells that lie wholly in the zero padding of a clip shorter than ``clip_snippets`` (a short video)
are not units: the paper does not say, but they are not part of the video, their features are
alike, and as neighbours they would be the "most similar" cells of every background cell.

Where the papers are silent (layer widths, anchor ratios, matching thresholds) the choices are
SSAD-like and written in :class:`DSSADConfig`. An inserted GCM's last layer starts at zero, so the
module starts as the identity through its residual and the trained detector learns how much of
the relations to use (the practice for modules inserted into an existing network, e.g. non-local
blocks); the paper does not say how it initialises them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gcm_core.checks import check_ranges
from gcm_core.graph import Graph, GraphSpec, build_graph
from gcm_core.module import GCM, EdgeWeighting


@dataclass(frozen=True)
class DSSADConfig:
    hidden: int = 256
    clip_snippets: int = 512
    window_stride: int | None = None      # of the windows over longer videos; None: half a clip (256)
    num_scales: int = 3                   # feature maps at 1/4, 1/8, 1/16 of the snippet rate
    anchor_ratios: tuple[float, ...] = (1.0, 2.0, 3.0)   # anchor length / cell length
    gcm_scales: tuple[int, ...] = ()      # indices of the scales that get a GCM (0 = finest)
    graph: GraphSpec = field(default_factory=lambda: GraphSpec(edge_types=("surrounding", "semantic")))
    semantic_disjoint: Literal["extent", "receptive-field"] = "extent"   # see DSSAD.cell_graph
    num_samples: int | None = 4
    weighting: EdgeWeighting = "cos"      # the GCMs' edge weights A_ij (Table 7's variants)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        check_ranges(self, hidden=">= 1", clip_snippets=">= 1", window_stride=">= 1", num_scales=">= 1",
                     anchor_ratios="> 0", num_samples=">= 1", dropout="in [0, 1)")
        if not self.anchor_ratios:
            raise ValueError("anchor_ratios must give at least one anchor per cell")
        if self.window_stride is not None and self.window_stride > self.clip_snippets:
            raise ValueError(f"window_stride must be <= clip_snippets ({self.clip_snippets}), or the windows leave "
                             f"snippets of a long video unseen; got {self.window_stride}")
        coarsest = 4 << (self.num_scales - 1)   # snippets per cell of the coarsest map
        if self.clip_snippets % coarsest:
            raise ValueError(f"clip_snippets must be a multiple of {coarsest} (a cell of the coarsest of "
                             f"{self.num_scales} maps), got {self.clip_snippets}")
        if any(not 0 <= s < self.num_scales for s in self.gcm_scales):
            raise ValueError(f"gcm_scales {self.gcm_scales} outside 0..{self.num_scales - 1}")
        if len(set(self.gcm_scales)) < len(self.gcm_scales):   # one GCM per scale: a repeat would be dropped
            raise ValueError(f"gcm_scales must name each scale once, got {self.gcm_scales}")
        if self.semantic_disjoint not in ("extent", "receptive-field"):
            raise ValueError(f"semantic_disjoint {self.semantic_disjoint!r}: 'extent' or 'receptive-field'")
        if "contextual" in self.graph.edge_types:
            raise ValueError("cells of a feature map never overlap: use surrounding and semantic edges only")


    @property
    def stride(self) -> int:
        """Snippets from one window over a long video to the next."""
        return self.window_stride or self.clip_snippets // 2


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv1d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU())


class DSSAD(nn.Module):
    """D-SSAD with optional GCMs; ``forward`` returns per-anchor logits and offsets of every clip."""

    def __init__(self, config: DSSADConfig, dim: int, num_classes: int) -> None:
        super().__init__()
        h, a = config.hidden, len(config.anchor_ratios)
        self.config, self.dim, self.num_classes = config, dim, num_classes
        self.base = nn.Sequential(_conv(dim, h), _conv(h, h, stride=2), nn.Dropout(config.dropout))
        self.down = nn.ModuleList(_conv(h, h, stride=2) for _ in range(config.num_scales))
        self.cls_branch = nn.ModuleList(nn.Sequential(_conv(h, h), nn.Conv1d(h, a * (num_classes + 1), 3, padding=1))
                                        for _ in range(config.num_scales))
        self.loc_branch = nn.ModuleList(nn.Sequential(_conv(h, h), nn.Conv1d(h, a * 2, 3, padding=1))
                                        for _ in range(config.num_scales))
        # created last, so that the detector's other layers start alike with and without GCMs
        self.gcms = nn.ModuleDict({str(s): GCM(h, num_samples=config.num_samples, weighting=config.weighting)
                                   for s in config.gcm_scales})
        for gcm in self.gcms.values():  # start as the identity (Y = X^(K) + X^(0) with X^(K) = 0)
            nn.init.zeros_(gcm.layers[-1].weight)

    def cells(self, scale: int) -> int:
        """Number of cells of a clip's map at ``scale``."""
        return self.config.clip_snippets // (4 << scale)

    def receptive_field(self, scale: int) -> int:
        """Number of snippets a cell's features at ``scale`` are computed from: the base's two
        convolutions of width 3 (the second of stride 2) and one of stride 2 per scale."""
        return (8 << scale) + 1

    def anchors(self, snippet_seconds: float) -> Tensor:
        """[A, 2] anchors of a clip starting at 0, in seconds for snippets of ``snippet_seconds``,
        scales then cells then ratios (model order); a cell at ``scale`` spans 4 * 2**scale
        snippets."""
        out = []
        for s in range(self.config.num_scales):
            n, length = self.cells(s), snippet_seconds * (4 << s)
            centre = (torch.arange(n, dtype=torch.float64) + 0.5) * length
            ratios = torch.tensor(self.config.anchor_ratios, dtype=torch.float64)
            half = ratios[None, :] * length / 2
            out.append(torch.stack([centre[:, None] - half, centre[:, None] + half], -1).reshape(-1, 2))
        return torch.cat(out)

    def cell_graph(self, scale: int, cells: Tensor, snippets: int) -> Graph:
        """The graph over one clip's cells [n, H] at ``scale``, of which those holding any of the
        clip's first ``snippets`` snippets are units; the others (padding) get no edges. The
        cells' extents are in snippets: the edge rules compare overlaps and distances relative to
        the units' lengths, so a clip's graph is the same at any frame rate.

        Surrounding edges join cells by their extents. Eq. 6 takes a unit's semantic neighbours
        among the units disjoint from it; read on the cells' extents (``semantic_disjoint=
        "extent"``, the default) every other cell is a candidate, the next ones included, whose
        snippets the cell's own features already hold (about a quarter of the semantic edges of a
        trained D-SSAD + GCM x3 join cells at most 2 apart). ``"receptive-field"``, a choice
        beyond the paper, reads "disjoint" on the snippets each cell's features are computed from:
        the candidates are the cells whose receptive fields do not overlap its own (at every
        scale, those more than 2 cells away). Neither beats the other beyond a run's noise on the
        synthetic benchmark (README, "Detection quality").
        """
        n, span = cells.shape[0], 4 << scale
        units = min(n, -(-snippets // span))
        bounds = torch.arange(units + 1, dtype=torch.float64) * span
        extents = torch.stack([bounds[:-1], bounds[1:]], dim=1)
        spec = self.config.graph
        if self.config.semantic_disjoint == "extent" or "semantic" not in spec.edge_types:
            graph = build_graph(extents, cells[:units], spec)
        else:
            reach = (self.receptive_field(scale) - span) / 2
            fields = extents + torch.tensor([-reach, reach], dtype=torch.float64)
            local = tuple(t for t in spec.edge_types if t != "semantic")
            graph = build_graph(extents, cells[:units], replace(spec, edge_types=local)).union(
                build_graph(fields, cells[:units], replace(spec, edge_types=("semantic",))))
        return Graph(n, graph.edge_index, graph.edge_type, graph.weight)

    def _relate(self, scale: int, x: Tensor, snippets: list[int]) -> Tensor:
        """GCM over the cells of every clip of the batch: x [B, H, n] -> [B, H, n]."""
        b, h, n = x.shape
        units = x.transpose(1, 2).reshape(b * n, h)
        detached = units.detach().float().cpu()
        graph = Graph.batch([self.cell_graph(scale, detached[k * n:(k + 1) * n], snippets[k])
                             for k in range(b)]).to(x.device)
        return self.gcms[str(scale)](units, graph).reshape(b, n, h).transpose(1, 2)

    def forward(self, clips: Tensor, snippets: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """``clips`` [B, L, C] snippet features, of which the first ``snippets[b]`` of clip b are the
        video's (default: all) -> logits [B, A, K + 1] and offsets [B, A, 2]."""
        x = self.base(clips.transpose(1, 2))
        real = snippets if snippets is not None else [clips.shape[1]] * clips.shape[0]
        logits, offsets = [], []
        for s, down in enumerate(self.down):
            x = down(x)
            y = self._relate(s, x, real) if str(s) in self.gcms else x
            b, _, n = y.shape
            logits.append(self.cls_branch[s](y).view(b, -1, self.num_classes + 1, n).permute(0, 3, 1, 2)
                          .reshape(b, -1, self.num_classes + 1))
            offsets.append(self.loc_branch[s](y).view(b, -1, 2, n).permute(0, 3, 1, 2).reshape(b, -1, 2))
        return torch.cat(logits, 1), torch.cat(offsets, 1)


def pad_clip(features: Tensor, length: int) -> Tensor:
    """Zero-pad (or cut) a [T, C] snippet sequence to ``length`` snippets."""
    if features.shape[0] >= length:
        return features[:length]
    return F.pad(features, (0, 0, 0, length - features.shape[0]))
