"""The embedded default starts its own Ray, whatever address the environment names."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT

from workflows.config import PreprocessConfig, RayConfig
from workflows.preprocess import run_preprocess
from workflows.ray_env import ray_session


def test_the_embedded_default_ignores_a_cluster_address_that_is_gone_and_stays_on_loopback(monkeypatch, capsys):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # nothing listens there (e.g. a stopped `ray start`)
    with ray_session(RayConfig(num_cpus=1, object_store_mb=100)):
        assert ray.cluster_resources()["CPU"] == 1
        assert ray.get(ray.put(41)) + 1 == 42
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert not ray.is_initialized()
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("address", ["127.0.0.1:9", "ray://127.0.0.1:9"])
def test_a_cluster_address_where_nothing_answers_is_an_error_not_a_hang(address):
    """Ray itself retries such a head forever, logging a warning every few seconds."""
    import ray

    with pytest.raises(ConnectionError, match=f"^no Ray cluster answers at {re.escape(address)} "
                                              r"\(Connection refused\): start it \(ray up ray_cluster.yaml\)"):
        with ray_session(RayConfig(address=address)):
            pass
    assert not ray.is_initialized()
    with pytest.raises(ValueError, match=r"--address '127\.0\.0\.1': expected auto, HOST:PORT"):
        with ray_session(RayConfig(address="127.0.0.1")):
            pass


def test_gpu_preprocessing_without_gpus_is_an_error_not_a_hang(small_dataset, tmp_path):
    with ray_session(RayConfig(num_cpus=1, object_store_mb=100)):
        config = PreprocessConfig(card=str(small_dataset / "card.yaml"), data_root=str(small_dataset),
                                  out=str(tmp_path), use_gpu=True)
        with pytest.raises(RuntimeError, match=r"needs 1 GPU \(the cluster has 0\).*use_gpu"):
            run_preprocess(config, quiet=True)  # Ray Data would wait for a GPU forever
        assert not list((tmp_path / "shards").glob("*"))


def test_a_stage_prints_its_own_lines_not_rays_notices(small_dataset, tmp_path):
    # as a user runs it: token authentication left to Ray's default (its token goes to $HOME/.ray)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | {"HOME": str(tmp_path)}
    command = [sys.executable, "-m", "workflows.cli", "preprocess", "--card", str(small_dataset / "card.yaml"),
               "--data-root", str(small_dataset), "--out", str(tmp_path / "prep")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout + proc.stderr
    # Ray's notices about what the stage chose (token authentication, no Ray Data progress bars);
    # warnings about the machine (e.g. a small /dev/shm) are the user's to see
    notices = [line for line in proc.stderr.splitlines()
               if re.search(r"\b(WARNING|INFO)\b", line) and re.search("authentication|progress bars", line, re.I)]
    assert not notices


def test_stages_that_run_ray_data_here_refuse_ray_client_before_writing_anything(monkeypatch, small_dataset,
                                                                                  tmp_path):
    """Ray Data's executor failed inside a Ray Client driver (seen against `ray start --head`: an
    AttributeError about the worker's core_worker); the stage says what to run instead."""
    import ray.util.client

    from workflows.demo import run_demo

    monkeypatch.setattr(ray.util.client.ray, "is_connected", lambda: True)   # as after ray.init("ray://...")
    config = PreprocessConfig(card=str(small_dataset / "card.yaml"), data_root=str(small_dataset),
                              out=str(tmp_path / "prep"))
    with pytest.raises(RuntimeError, match=r"^gcm preprocess cannot run over Ray Client \(ray://\).*ray job submit "
                                           r"--address http://HEAD:8265 -- gcm --address auto preprocess"):
        run_preprocess(config, quiet=True)
    with pytest.raises(RuntimeError, match=r"^gcm demo cannot run over Ray Client"):
        run_demo(tmp_path / "demo", quiet=True)
    assert not list(tmp_path.iterdir())


def test_a_trial_asks_for_its_resources_from_any_process_tune_runs_in():
    """Under Ray Client, Tune runs on the cluster and receives the trainable pickled: trials of a
    trainable pickled without its resources asked for Tune's default of 1 CPU each, which on a
    2-CPU cluster left their training workers waiting forever."""
    from ray import cloudpickle

    from workflows.tune import trial_trainable

    read_back = ("import pickle, sys; trainable = pickle.loads(sys.stdin.buffer.read()); "
                 "print(trainable._resources.required_resources)")
    proc = subprocess.run([sys.executable, "-c", read_back], input=cloudpickle.dumps(trial_trainable(
        {"cpu": 0.1, "gpu": 0.25})), capture_output=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "{'CPU': 0.1, 'GPU': 0.25}"
