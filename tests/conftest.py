"""Shared test fixtures: where the real public data lives, and hypothesis profiles."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from helpers import SHARED_DATA

settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real THUMOS'14 / ActivityNet files beside the project (never copied into it)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data not found at {SHARED_DATA}; set GCM_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """The small synthetic benchmark written to disk once per test session."""
    from gcm_core.data.cards import load_card
    from gcm_core.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("small_synthetic")
    generate_dataset(root, load_card("synthetic"), "small", seed=0)
    return root


@pytest.fixture(scope="session")
def small_prepared(small_dataset):
    """The small benchmark's videos prepared for training (train) and inference (test)."""
    from gcm_core.data.cards import load_card
    from gcm_core.data.dataset import DatasetSource
    from gcm_core.data.prepared import prepare_video

    card = load_card(small_dataset / "card.yaml")
    out = {"card": card}
    for role in ("train", "test"):
        source = DatasetSource(card, small_dataset, role)
        out[role] = [prepare_video(source.load(v), card.classes, role == "train") for v in source.video_ids]
    return out
