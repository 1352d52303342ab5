"""A simulated 3-node cluster (ray.cluster_utils.Cluster): the same stages, and a lost node."""
from __future__ import annotations

import threading
import time

import pytest

from workflows.config import PreprocessConfig, TrainStageConfig
from workflows.preprocess import run_preprocess
from workflows.ray_env import quiet_data, quiet_ray_environment
from workflows.settings import from_dict
from workflows.train import run_train

FAST_DETECTION = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                  "health_check_initial_delay_ms": 1000}


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs and two 2-CPU worker nodes, all on this machine's loopback."""
    quiet_ray_environment()
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_DETECTION})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    quiet_data()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def config(small_dataset, out):
    return PreprocessConfig(card=str(small_dataset / "card.yaml"), data_root=str(small_dataset), out=str(out),
                            videos_per_shard=4, num_workers=2)


def test_preprocess_and_train_on_three_nodes(cluster, small_dataset, tmp_path):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}  # the nodes talk over loopback
    manifest = run_preprocess(config(small_dataset, tmp_path / "prep"), quiet=True)
    assert manifest["counts"]["train"]["videos"] == 48 and manifest["counts"]["test"]["videos"] == 24
    stage = from_dict(TrainStageConfig, {"data": str(tmp_path / "prep"), "out": str(tmp_path), "name": "run",
                                         "stream_lr": {}, "train": {"epochs": 2, "lr": 0.05, "batch_videos": 8}})
    result = run_train(stage, quiet=True)
    assert result["metrics"]["epoch"] == 2 and "fused/mAP@0.5" in result["metrics"]


def test_a_node_lost_during_preprocessing_loses_and_repeats_no_video(cluster, small_dataset, tmp_path):
    handle, workers = cluster
    out = tmp_path / "prep"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("manifest", run_preprocess(config(small_dataset, out),
                                                                                             quiet=True)))
    thread.start()
    deadline = time.time() + 60
    while len(list((out / "shards").glob("*.parquet"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    handle.remove_node(workers[1])
    thread.join(timeout=300)
    assert not thread.is_alive()
    manifest = outcome["manifest"]
    ids = [(s["role"], v) for s in manifest["shards"] for v in s["videos"]]
    assert len(ids) == len(set(ids)) == 72, "a video is missing or repeated"
    workers[1] = handle.add_node(num_cpus=2)  # leave the cluster as we found it
    handle.wait_for_nodes()
