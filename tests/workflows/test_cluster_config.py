"""ray_cluster.yaml passes the validation `ray up` runs first (offline, no credentials)."""
from __future__ import annotations

import copy

import pytest
import yaml

from helpers import ROOT


def validate(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_config_is_valid():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate(config)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for t in types if "gpu" in t]
    assert gpu and types[gpu[0]]["max_workers"] >= types[gpu[0]]["min_workers"]
    assert any("pip install -e" in c for c in config["setup_commands"])


def test_validation_catches_a_broken_config():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    config["head_node_type"] = "no_such_type"
    with pytest.raises(Exception):
        validate(config)
