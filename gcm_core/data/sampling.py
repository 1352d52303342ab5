"""Training samples: each unit's role (foreground / incomplete / background), labels and targets.

Following SSN and the authors' code (NOTES.md): against its best-tIoU ground truth, a unit is

- **foreground** if tIoU > 0.7 (the ground-truth instances are added to a training video's units,
  so every instance is one): trains classification, completeness (complete) and regression;
- **incomplete** if tIoU < 0.3 and the share of the unit covered by an instance (``overlap``,
  intersection / unit length) > 0.01: trains completeness (incomplete, for that instance's class);
- **background** if tIoU < 0.01 and the unit covers > 2% of the video: trains classification
  (class 0).

The roles are exclusive, in that order of precedence (SSN's rules let a long unit barely touching
an instance be both incomplete and background; it counts as incomplete here). Other units only
serve as graph neighbours. Each iteration samples a fixed number of units per video in the ratio
fg : incomplete : bg = 1 : 6 : 1 (configurable), with replacement where a video has too few.

Regression targets (Eq. 15) are offsets of centre and log-length from the unit to its instance,
``((c_gt - c) / l, log(l_gt / l))``: the paper prints the opposite sign for both, the authors'
code uses this one, so that decoding is ``c' = c + l * o_c``, ``l' = l * exp(o_l)``. Targets are
z-normalised by statistics of the training foregrounds, kept with the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gcm_core.checks import check_ranges
from gcm_core.units import pairwise_overlap, pairwise_tiou

BACKGROUND, FOREGROUND, INCOMPLETE, IGNORED = 0, 1, 2, 3
ROLE_NAMES = {FOREGROUND: "foreground", INCOMPLETE: "incomplete", BACKGROUND: "background", IGNORED: "ignored"}


@dataclass(frozen=True)
class SamplingConfig:
    """Role thresholds and the per-video sample of each training iteration (the paper's defaults)."""

    fg_iou: float = 0.7
    incomplete_iou: float = 0.3
    incomplete_overlap: float = 0.01
    bg_iou: float = 0.01
    bg_coverage: float = 0.02
    per_video: int = 8
    ratio: tuple[int, int, int] = (1, 6, 1)  # foreground : incomplete : background

    def __post_init__(self) -> None:
        check_ranges(self, fg_iou="in [0, 1]", incomplete_iou="in [0, 1]", incomplete_overlap="in [0, 1]",
                     bg_iou="in [0, 1]", bg_coverage="in [0, 1]", per_video=">= 1", ratio=">= 0")
        if len(self.ratio) != 3 or sum(self.ratio) == 0:
            raise ValueError(f"ratio must be three counts (foreground, incomplete, background), not all 0, "
                             f"got {self.ratio!r}")

    def counts(self) -> dict[int, int]:
        """How many units of each role one video contributes per iteration."""
        total = sum(self.ratio)
        fg, inc, _ = (self.per_video * r // total for r in self.ratio)
        return {FOREGROUND: fg, INCOMPLETE: inc, BACKGROUND: self.per_video - fg - inc}


@dataclass
class UnitLabels:
    """Per unit of one video: its best instance, overlaps, role, class and regression target."""

    best_gt: Tensor      # [N] index of the best-tIoU instance, -1 if the video has none
    tiou: Tensor         # [N] tIoU with it
    overlap: Tensor      # [N] largest share of the unit covered by one instance
    role: Tensor         # [N] FOREGROUND / INCOMPLETE / BACKGROUND / IGNORED
    label: Tensor        # [N] class of the best instance, 1..K (0 for background and no instance)
    reg_target: Tensor   # [N, 2] raw Eq. 15 offsets to the best instance (NaN where undefined)


def with_ground_truth(units: Tensor, gt: Tensor) -> Tensor:
    """A training video's units: its proposals followed by its instances themselves."""
    return torch.cat([units.to(torch.float64), gt.to(torch.float64).reshape(-1, 2)])


def regression_targets(units: Tensor, targets: Tensor) -> Tensor:
    """Eq. 15 offsets ``[(c_gt - c) / l, log(l_gt / l)]`` of ``units`` [N, 2] to ``targets`` [N, 2]."""
    length = units[:, 1] - units[:, 0]
    centre = (units[:, 0] + units[:, 1]) / 2
    t_length = targets[:, 1] - targets[:, 0]
    t_centre = (targets[:, 0] + targets[:, 1]) / 2
    return torch.stack([(t_centre - centre) / length, torch.log(t_length / length)], dim=1)


def apply_regression(units: Tensor, offsets: Tensor) -> Tensor:
    """Inverse of :func:`regression_targets`: the refined (start, end) of each unit."""
    length = units[..., 1] - units[..., 0]
    centre = (units[..., 0] + units[..., 1]) / 2 + length * offsets[..., 0]
    half = length * torch.exp(offsets[..., 1]) / 2
    return torch.stack([centre - half, centre + half], dim=-1)


def label_units(units: Tensor, gt: Tensor, gt_labels: Tensor, duration: float,
                config: SamplingConfig = SamplingConfig()) -> UnitLabels:
    """Roles, classes and regression targets of ``units`` [N, 2] against instances ``gt`` [G, 2].

    ``gt_labels``: 0-based class of each instance; returned labels are 1-based (0 = background).
    """
    units = units.to(torch.float64)
    n = units.shape[0]
    gt = gt.to(torch.float64).reshape(-1, 2)
    if gt.shape[0] == 0:
        tiou = torch.zeros(n, dtype=torch.float64)
        best = torch.full((n,), -1, dtype=torch.long)
        overlap = torch.zeros(n, dtype=torch.float64)
        label = torch.zeros(n, dtype=torch.long)
        reg = torch.full((n, 2), float("nan"), dtype=torch.float64)
    else:
        ious = pairwise_tiou(units, gt)
        tiou, best = ious.max(dim=1)
        overlap = pairwise_overlap(units, gt).max(dim=1).values
        label = gt_labels.long()[best] + 1
        reg = regression_targets(units, gt[best])
    coverage = (units[:, 1] - units[:, 0]) / duration
    role = torch.full((n,), IGNORED, dtype=torch.long)
    role[(tiou < config.bg_iou) & (coverage > config.bg_coverage)] = BACKGROUND
    role[(tiou < config.incomplete_iou) & (overlap > config.incomplete_overlap)] = INCOMPLETE
    role[tiou > config.fg_iou] = FOREGROUND
    label = torch.where(role == BACKGROUND, 0, label)
    reg = torch.where((role == FOREGROUND)[:, None], reg, float("nan"))
    return UnitLabels(best, tiou, overlap, role, label, reg)


def sample_units(role: Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """Indices of one iteration's training units of a video, by role in the configured ratio.

    A role with fewer units than asked is sampled with replacement; a role with none is skipped.
    """
    picked = []
    for r, count in config.counts().items():
        pool = (role == r).nonzero().squeeze(1)
        if pool.numel() == 0 or count == 0:
            continue
        if pool.numel() >= count:
            choice = torch.randperm(pool.numel(), generator=generator)[:count]
        else:
            choice = torch.randint(pool.numel(), (count,), generator=generator)
        picked.append(pool[choice])
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)


@dataclass
class RegressionStats:
    """Mean and standard deviation of the training foregrounds' regression targets."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, targets: Tensor) -> "RegressionStats":
        """From raw targets [M, 2] of every training foreground (rows with NaN are skipped)."""
        valid = targets[~torch.isnan(targets).any(dim=1)]
        if valid.shape[0] < 2:
            return cls(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
        return cls(valid.mean(dim=0), valid.std(dim=0).clamp(min=1e-6))

    def normalize(self, targets: Tensor) -> Tensor:
        return (targets - self.mean.to(targets)) / self.std.to(targets)

    def denormalize(self, offsets: Tensor) -> Tensor:
        return offsets * self.std.to(offsets) + self.mean.to(offsets)

    def as_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, list[float]]) -> "RegressionStats":
        return cls(torch.tensor(d["mean"], dtype=torch.float64), torch.tensor(d["std"], dtype=torch.float64))
