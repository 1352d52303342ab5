"""Training samples on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from gcm_core.data.sampling import (
    BACKGROUND, FOREGROUND, IGNORED, INCOMPLETE, RegressionStats, SamplingConfig, apply_regression, label_units,
    regression_targets, sample_units, with_ground_truth,
)


def test_roles_labels_and_targets_by_hand():
    gt = torch.tensor([[10.0, 20.0], [50.0, 60.0]])
    gt_labels = torch.tensor([3, 7])
    units = torch.tensor([
        [10.5, 20.0],   # tIoU 9.5/10 = 0.95 with gt 0 -> foreground, class 4
        [10.0, 14.0],   # tIoU 0.4, between the cut-offs -> ignored
        [18.0, 30.0],   # tIoU 2/20 = 0.1 < 0.3, covers 2/12 of itself -> incomplete, class 4
        [70.0, 95.0],   # disjoint, 25% of the 100 s video -> background
        [96.0, 97.0],   # disjoint but covers 1% of the video -> ignored
        [59.9, 80.0],   # tIoU 0.1/30 = 0.0033 < 0.01, overlap 0.1/20.1 = 0.005 < 0.01, 20% -> background
    ])
    out = label_units(units, gt, gt_labels, duration=100.0)
    assert out.role.tolist() == [FOREGROUND, IGNORED, INCOMPLETE, BACKGROUND, IGNORED, BACKGROUND]
    assert out.label.tolist()[:3] == [4, 4, 4] and out.label[3] == 0 and out.label[5] == 0
    assert out.tiou[0].item() == pytest.approx(0.95) and out.overlap[2].item() == pytest.approx(2 / 12)
    # Eq. 15 for unit 0: centres 15.25 -> 15, lengths 9.5 -> 10
    assert out.reg_target[0].tolist() == pytest.approx([(15 - 15.25) / 9.5, math.log(10 / 9.5)])
    assert torch.isnan(out.reg_target[1:]).all()


def test_ground_truth_units_are_foreground_and_regress_to_zero():
    gt = torch.tensor([[5.0, 9.0]])
    units = with_ground_truth(torch.tensor([[0.0, 1.0]]), gt)
    out = label_units(units, gt, torch.tensor([0]), duration=30.0)
    assert out.role[1] == FOREGROUND and out.reg_target[1].tolist() == [0.0, 0.0]


def test_regression_round_trip():
    units = torch.tensor([[1.0, 5.0], [10.0, 30.0]], dtype=torch.float64)
    targets = torch.tensor([[2.0, 4.5], [8.0, 33.0]], dtype=torch.float64)
    torch.testing.assert_close(apply_regression(units, regression_targets(units, targets)), targets)


def test_sampling_ratio_and_replacement():
    role = torch.tensor([FOREGROUND] * 3 + [INCOMPLETE] * 2 + [BACKGROUND] * 10 + [IGNORED] * 5)
    picked = sample_units(role, SamplingConfig(per_video=8), torch.Generator().manual_seed(0))
    assert torch.bincount(role[picked], minlength=4).tolist() == [1, 1, 6, 0]  # bg, fg, incomplete, ignored
    assert set(picked[role[picked] == INCOMPLETE].tolist()) <= {3, 4}  # 6 drawn from 2, with replacement
    none = sample_units(torch.tensor([IGNORED, IGNORED]), SamplingConfig())
    assert none.numel() == 0


def test_regression_stats_normalise_and_restore():
    raw = torch.tensor([[0.1, 0.2], [0.3, -0.2], [float("nan"), float("nan")], [0.2, 0.0]], dtype=torch.float64)
    stats = RegressionStats.fit(raw)
    assert stats.mean.tolist() == pytest.approx([0.2, 0.0])
    z = stats.normalize(raw[[0, 1, 3]])
    torch.testing.assert_close(stats.denormalize(z), raw[[0, 1, 3]])
    assert RegressionStats.from_dict(stats.as_dict()).std.tolist() == pytest.approx(stats.std.tolist())
