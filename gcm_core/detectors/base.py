"""What the two-stage heads share: their configuration, input batch and outputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from gcm_core.checks import check_ranges
from gcm_core.graph import Graph
from gcm_core.module import EdgeWeighting, ModuleKind


@dataclass(frozen=True)
class ModelConfig:
    """A two-stage head. Defaults are the paper's SSN + GCM (section 4.2)."""

    detector: Literal["ssn", "single"] = "ssn"
    act_module: ModuleKind = "gcm"          # GCM1 (ssn) or GCM3 (single): on body features
    comp_module: ModuleKind = "gcm"         # GCM2 (ssn): on completeness features
    comp_input: Literal["three_part", "extended"] = "three_part"
    num_layers: int = 2
    num_samples: int | None = 4
    weighting: EdgeWeighting = "cos"
    self_add: bool = True
    module_dropout: float = 0.0
    dropout: float = 0.8                    # before the classifier

    def __post_init__(self) -> None:
        check_ranges(self, num_layers=">= 1", num_samples=">= 1", module_dropout="in [0, 1)", dropout="in [0, 1)")

    @property
    def completeness_features(self) -> str | None:
        """The unit features the head reads besides the body: SSN's completeness input; None for
        the single-GCM head, which reads the body alone."""
        return self.comp_input if self.detector == "ssn" else None


@dataclass
class UnitBatch:
    """The units of a batch of videos (one block-diagonal graph) and, in training, their targets.

    ``nodes``: the units whose outputs are needed (the sampled training units), None for all.
    """

    body: Tensor
    comp: Tensor | None
    graph: Graph
    nodes: Tensor | None = None
    role: Tensor | None = None
    label: Tensor | None = None
    reg_target: Tensor | None = None

    def to(self, device: torch.device | str) -> "UnitBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return UnitBatch(self.body.to(device), move(self.comp), self.graph.to(device), move(self.nodes),
                         move(self.role), move(self.label), move(self.reg_target))


@dataclass
class UnitOutputs:
    """Per output unit: class logits [M, K+1], completeness [M, K] (SSN only), offsets [M, K, 2]."""

    logits: Tensor
    completeness: Tensor | None
    offsets: Tensor


def build_detector(config: ModelConfig, dim: int, num_classes: int) -> nn.Module:
    """The two-stage head of ``config`` for ``dim``-d body features and ``num_classes`` classes."""
    from gcm_core.detectors.single import SingleGCMHead
    from gcm_core.detectors.ssn import SSNHead

    if config.detector == "ssn":
        return SSNHead(config, dim, num_classes)
    if config.detector == "single":
        return SingleGCMHead(config, dim, num_classes)
    raise ValueError(f"unknown detector {config.detector!r}; choose ssn or single")
