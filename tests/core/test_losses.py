"""Eq. 13-17 and the one-stage loss on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from gcm_core.data.sampling import BACKGROUND, FOREGROUND, IGNORED, INCOMPLETE
from gcm_core.losses import (
    AnchorMatching, anchor_loss, classification_loss, completeness_loss, match_anchors, regression_loss, ssn_loss,
)


def test_classification_uses_foreground_and_background_only():
    logits = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [5.0, -5.0, 5.0]])
    role = torch.tensor([FOREGROUND, BACKGROUND, INCOMPLETE])
    label = torch.tensor([1, 2, 2])  # the background unit's label is ignored: its class is 0
    fg = -math.log(math.exp(2) / (2 + math.exp(2)))
    bg = -math.log(math.e / (math.e + 2))
    assert classification_loss(logits, role, label).item() == pytest.approx((fg + bg) / 2)


def test_completeness_hinge_keeps_the_hardest_incomplete_units():
    scores = torch.tensor([[0.5, 9.0], [0.2, 0.0], [-2.0, 0.0], [0.0, 0.9], [3.0, 3.0]])
    role = torch.tensor([FOREGROUND, INCOMPLETE, INCOMPLETE, INCOMPLETE, BACKGROUND])
    label = torch.tensor([1, 1, 1, 2, 0])
    # own-class scores: fg 0.5 -> hinge 0.5; incomplete 0.2, -2, 0.9 -> hinges 1.2, 0, 1.9
    assert completeness_loss(scores, role, label, ohem_ratio=1 / 3).item() == pytest.approx((0.5 + 1.9) / 2)
    assert completeness_loss(scores, role, label, ohem_ratio=1.0).item() == pytest.approx((0.5 + 1.2 + 0 + 1.9) / 4)


def test_regression_on_foregrounds_own_class():
    offsets = torch.zeros(3, 2, 2)
    offsets[0, 1] = torch.tensor([0.5, 2.0])   # fg of class 2 (label 2 -> index 1)
    offsets[1, 0] = torch.tensor([9.0, 9.0])   # background: ignored
    role = torch.tensor([FOREGROUND, BACKGROUND, IGNORED])
    label = torch.tensor([2, 0, 1])
    target = torch.zeros(3, 2)
    # smooth-L1: 0.5 * 0.5^2 = 0.125 and 2 - 0.5 = 1.5, mean 0.8125
    assert regression_loss(offsets, role, label, target).item() == pytest.approx(0.8125)


def test_total_is_eq17():
    logits = torch.randn(4, 3)
    comp = torch.randn(4, 2)
    offsets = torch.randn(4, 2, 2)
    role = torch.tensor([FOREGROUND, INCOMPLETE, BACKGROUND, FOREGROUND])
    label = torch.tensor([1, 2, 0, 2])
    target = torch.randn(4, 2)
    terms = ssn_loss(logits, comp, offsets, role, label, target)
    assert terms["total"].item() == pytest.approx(terms["cls"].item() + 0.5 * terms["com"].item()
                                                  + 0.5 * terms["reg"].item())


def test_anchor_matching_by_hand():
    anchors = torch.tensor([[0.0, 10.0], [0.0, 4.0], [20.0, 30.0], [40.0, 50.0]])
    gt = torch.tensor([[1.0, 10.0], [24.0, 36.0]])
    cls, offsets = match_anchors(anchors, gt, torch.tensor([3, 5]), AnchorMatching(0.5, 0.3))
    # tIoU: a0-g0 0.9 (positive, class 4); a1-g0 3/10 -> ignored; a2-g1 6/16 = 0.375 but it is g1's
    # best anchor, so it is forced positive (class 6); a3 matches nothing -> background
    assert cls.tolist() == [4, -1, 6, 0]
    assert offsets[0].tolist() == pytest.approx([(5.5 - 5) / 10, math.log(9 / 10)])


def test_anchor_loss_mines_hard_negatives():
    logits = torch.tensor([[0.0, 3.0], [5.0, 0.0], [0.0, 5.0], [0.0, 1.0], [9.0, 0.0]])
    cls = torch.tensor([1, 0, 0, 0, -1])
    offsets = torch.zeros(5, 2)
    out = anchor_loss(logits, offsets, cls, torch.zeros(5, 2), AnchorMatching(negatives_per_positive=2))
    ce = lambda z, y: -torch.log_softmax(z, 0)[y].item()  # noqa: E731
    # one positive; the two hardest of the three negatives are anchors 2 and 3
    expected = (ce(logits[0], 1) + ce(logits[2], 0) + ce(logits[3], 0)) / 3
    assert out["cls"].item() == pytest.approx(expected)
    assert out["reg"].item() == 0.0
