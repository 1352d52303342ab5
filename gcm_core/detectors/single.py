"""The one-GCM head of CBR / R-C3D-style detectors (Eq. 12): GCM3 on the body features, then one
FC for classes (K + background) and one for per-class boundary offsets; no completeness."""
from __future__ import annotations

from torch import nn

from gcm_core.detectors.base import ModelConfig, UnitBatch, UnitOutputs
from gcm_core.detectors.ssn import branch


class SingleGCMHead(nn.Module):
    def __init__(self, config: ModelConfig, dim: int, num_classes: int) -> None:
        super().__init__()
        self.config, self.num_classes = config, num_classes
        self.gcm3 = branch(config.act_module, dim, config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(dim, num_classes + 1)        # FC5
        self.regressor = nn.Linear(dim, 2 * num_classes)         # FC4

    def forward(self, batch: UnitBatch) -> UnitOutputs:
        h = self.gcm3(batch.body, batch.graph, batch.nodes)
        return UnitOutputs(logits=self.classifier(self.dropout(h)), completeness=None,
                           offsets=self.regressor(h).view(h.shape[0], self.num_classes, 2))
