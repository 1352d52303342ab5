"""Losses of Eq. 13-17 (two-stage) and of the one-stage anchor detector.

Two-stage (SSN + GCM), on the sampled units of a batch:

- L_cls (Eq. 13): cross-entropy over K + 1 classes on foreground and background units;
- L_com (Eq. 14): per-class completeness hinge ``max(0, 1 - e * c_y)`` (e = +1 for foreground, -1
  for incomplete, c_y the completeness score of the unit's class), with online hard-negative
  mining: only the hardest ``ohem_ratio`` of the incomplete units count (SSN's default keeps one
  in six, as many as there are foregrounds at the 1 : 6 sampling ratio);
- L_reg (Eq. 16): smooth-L1 between the normalised Eq. 15 targets and the regression of the unit's
  own class, on foreground units;
- L_total = L_cls + lambda1 L_com + lambda2 L_reg, lambda1 = lambda2 = 0.5 (Eq. 17).

One-stage (D-SSAD): anchors are matched to the instance of highest tIoU (positive above
``positive_iou``, negative below ``negative_iou``); cross-entropy over positives and the hardest
negatives (``negatives_per_positive``), smooth-L1 on the positives' Eq. 15 offsets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from gcm_core.checks import check_ranges
from gcm_core.data.sampling import BACKGROUND, FOREGROUND, INCOMPLETE, regression_targets
from gcm_core.units import pairwise_tiou


@dataclass(frozen=True)
class LossWeights:
    completeness: float = 0.5   # lambda1
    regression: float = 0.5     # lambda2
    ohem_ratio: float = 1 / 6

    def __post_init__(self) -> None:
        check_ranges(self, completeness=">= 0", regression=">= 0", ohem_ratio="in (0, 1]")


def classification_loss(logits: Tensor, role: Tensor, label: Tensor) -> Tensor:
    """Eq. 13 on foreground (class ``label``) and background (class 0) units."""
    keep = (role == FOREGROUND) | (role == BACKGROUND)
    if not bool(keep.any()):
        return logits.sum() * 0
    return F.cross_entropy(logits[keep], torch.where(role[keep] == BACKGROUND, 0, label[keep]))


def completeness_loss(scores: Tensor, role: Tensor, label: Tensor, ohem_ratio: float = 1 / 6) -> Tensor:
    """Eq. 14: hinge on each unit's own-class completeness, hardest incomplete units only."""
    fg = role == FOREGROUND
    inc = role == INCOMPLETE
    keep = fg | inc
    if not bool(keep.any()):
        return scores.sum() * 0
    own = scores[keep].gather(1, (label[keep] - 1).clamp(min=0)[:, None]).squeeze(1)
    sign = torch.where(fg[keep], 1.0, -1.0).to(own.dtype)
    hinge = F.relu(1 - sign * own)
    positive, negative = hinge[sign > 0], hinge[sign < 0]
    n_hard = max(1, int(round(negative.numel() * ohem_ratio))) if negative.numel() else 0
    hard = negative.topk(n_hard).values if n_hard else negative
    return torch.cat([positive, hard]).sum() / max(positive.numel() + hard.numel(), 1)


def regression_loss(offsets: Tensor, role: Tensor, label: Tensor, targets: Tensor) -> Tensor:
    """Eq. 16: smooth-L1 of the own-class offsets [N, K, 2] against normalised targets, foregrounds."""
    fg = role == FOREGROUND
    if not bool(fg.any()):
        return offsets.sum() * 0
    own = offsets[fg].gather(1, (label[fg] - 1)[:, None, None].expand(-1, 1, 2)).squeeze(1)
    return F.smooth_l1_loss(own, targets[fg].to(own.dtype))


def ssn_loss(logits: Tensor, completeness: Tensor | None, offsets: Tensor, role: Tensor, label: Tensor,
             targets: Tensor, weights: LossWeights = LossWeights()) -> dict[str, Tensor]:
    """Eq. 17: the three terms and their weighted sum (``completeness`` None: Eq. 12's head)."""
    terms = {"cls": classification_loss(logits, role, label),
             "reg": regression_loss(offsets, role, label, targets)}
    total = terms["cls"] + weights.regression * terms["reg"]
    if completeness is not None:
        terms["com"] = completeness_loss(completeness, role, label, weights.ohem_ratio)
        total = total + weights.completeness * terms["com"]
    terms["total"] = total
    return terms


@dataclass(frozen=True)
class AnchorMatching:
    positive_iou: float = 0.5
    negative_iou: float = 0.3
    negatives_per_positive: int = 3


def match_anchors(anchors: Tensor, gt: Tensor, gt_labels: Tensor,
                  matching: AnchorMatching = AnchorMatching()) -> tuple[Tensor, Tensor]:
    """Per anchor [A, 2]: class target (1..K, 0 background, -1 ignored) and Eq. 15 offsets [A, 2].

    Each instance also claims its best anchor, so that no instance goes unmatched.
    """
    n = anchors.shape[0]
    cls = torch.zeros(n, dtype=torch.long, device=anchors.device)
    offsets = torch.zeros(n, 2, dtype=torch.float64, device=anchors.device)
    if gt.shape[0] == 0:
        return cls, offsets
    ious = pairwise_tiou(anchors.to(torch.float64), gt.to(torch.float64))
    best_iou, best = ious.max(dim=1)
    best_iou[ious.argmax(dim=0)] = 1.0
    best[ious.argmax(dim=0)] = torch.arange(gt.shape[0], device=anchors.device)
    cls = torch.where(best_iou >= matching.positive_iou, gt_labels[best] + 1, cls)
    cls = torch.where((best_iou >= matching.negative_iou) & (best_iou < matching.positive_iou), -1, cls)
    offsets = regression_targets(anchors.to(torch.float64), gt.to(torch.float64)[best])
    return cls, offsets


def anchor_loss(logits: Tensor, offsets: Tensor, cls_target: Tensor, offset_target: Tensor,
                matching: AnchorMatching = AnchorMatching(), regression_weight: float = 1.0) -> dict[str, Tensor]:
    """One-stage loss: CE on positives and hardest negatives, smooth-L1 on positives."""
    positive = cls_target > 0
    ce = F.cross_entropy(logits, cls_target.clamp(min=0), reduction="none")
    negative_loss = torch.where(cls_target == 0, ce, torch.full_like(ce, -1.0))
    n_neg = min(int((cls_target == 0).sum()), max(1, int(positive.sum()) * matching.negatives_per_positive))
    hard = negative_loss.topk(n_neg).values if n_neg else negative_loss[:0]
    cls_loss = (ce[positive].sum() + hard.sum()) / max(int(positive.sum()) + n_neg, 1)
    reg_loss = (F.smooth_l1_loss(offsets[positive], offset_target[positive].to(offsets.dtype))
                if bool(positive.any()) else offsets.sum() * 0)
    return {"cls": cls_loss, "reg": reg_loss, "total": cls_loss + regression_weight * reg_loss}
