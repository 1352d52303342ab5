"""SSN + GCM (Eq. 9-11): GCM1 on body features classifies, GCM2 on completeness features
scores completeness and regresses boundaries, both over the same unit graph and, in training,
the same sampled neighbourhoods (Algorithm 1 samples once per iteration)."""
from __future__ import annotations

from torch import nn

from gcm_core.detectors.base import ModelConfig, UnitBatch, UnitOutputs
from gcm_core.module import make_module, shared_plan


def branch(kind: str, dim: int, config: ModelConfig) -> nn.Module:
    """A GCM or baseline module for one branch, configured alike in every head."""
    return make_module(kind, dim, num_layers=config.num_layers, dropout=config.module_dropout,
                       num_samples=config.num_samples, weighting=config.weighting, self_add=config.self_add)


class SSNHead(nn.Module):
    def __init__(self, config: ModelConfig, dim: int, num_classes: int) -> None:
        super().__init__()
        comp_dim = 3 * dim if config.comp_input == "three_part" else dim
        self.config, self.num_classes = config, num_classes
        self.gcm1 = branch(config.act_module, dim, config)
        self.gcm2 = branch(config.comp_module, comp_dim, config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(dim, num_classes + 1)        # FC1, softmax over K + background
        self.completeness = nn.Linear(comp_dim, num_classes)     # FC3
        self.regressor = nn.Linear(comp_dim, 2 * num_classes)    # FC2, per-class (centre, length)

    def forward(self, batch: UnitBatch) -> UnitOutputs:
        plan = shared_plan((self.gcm1, self.gcm2), batch.graph, batch.nodes)   # one sample per iteration
        given = {} if plan is None else {"plan": plan}
        act = self.gcm1(batch.body, batch.graph, batch.nodes, **given)
        comp = self.gcm2(batch.comp, batch.graph, batch.nodes, **given)
        return UnitOutputs(
            logits=self.classifier(self.dropout(act)),
            completeness=self.completeness(comp),
            offsets=self.regressor(comp).view(comp.shape[0], self.num_classes, 2),
        )
