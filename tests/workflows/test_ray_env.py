"""The embedded default starts its own Ray, whatever address the environment names."""
from __future__ import annotations

from workflows.config import RayConfig
from workflows.ray_env import ray_session


def test_the_embedded_default_ignores_a_cluster_address_that_is_gone(monkeypatch):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # nothing listens there (e.g. a stopped `ray start`)
    with ray_session(RayConfig(num_cpus=1, object_store_mb=100)):
        assert ray.cluster_resources()["CPU"] == 1
        assert ray.get(ray.put(41)) + 1 == 42
    assert not ray.is_initialized()
