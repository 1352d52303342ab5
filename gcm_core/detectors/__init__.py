"""Detectors that use the GCM: two-stage SSN (Eq. 9-11), the one-GCM head (Eq. 12), D-SSAD."""
from gcm_core.detectors.base import ModelConfig, UnitBatch, UnitOutputs, build_detector

__all__ = ["ModelConfig", "UnitBatch", "UnitOutputs", "build_detector"]
