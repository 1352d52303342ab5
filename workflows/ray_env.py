"""Starting or joining Ray: an embedded local Ray bound to 127.0.0.1 by default, quiet, small.

``address`` None starts a local Ray that only this machine can reach (the laptop default);
``auto`` or ``ray://host:port`` joins a cluster started with ``ray up ray_cluster.yaml``.
A session this process started is shut down when the block ends; one it joined is left running.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from workflows.config import RayConfig

if TYPE_CHECKING:
    import torch

# Measured on these machines (see RAY_NOTES.md): these keep a local Ray on loopback and quiet.
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SCHEDULER_EVENTS": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DATA_LOG_LEVEL": "ERROR",   # the stages print their own progress
    "RAY_AIR_NEW_OUTPUT": "0",       # Tune's legacy output honours verbose=0 (the new one prints
                                     # a header and a TensorBoard hint into Ray's temp folder anyway)
}


# A new local Ray turns token authentication on where RAY_AUTH_MODE is unset (kept: it guards the
# embedded Ray against other local users) and says so at every start; for a local start that
# notice is all this logger says.
_AUTH_NOTICE = "ray._private.authentication.authentication_token_setup"

_embedded = False  # whether the Ray in use is one ray_session started here (fixed resources)


def quiet_ray_environment() -> None:
    """Set the environment for a quiet, loopback-only Ray before it starts (keeps user values)."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


@contextmanager
def ray_session(config: RayConfig = RayConfig()) -> Iterator[None]:
    """Run the block with Ray initialised per ``config`` (reusing an initialised one)."""
    quiet_ray_environment()
    import ray

    if ray.is_initialized():
        quiet_data()
        yield
        return
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    global _embedded
    if config.address:
        check_reachable(config.address)
        ray.init(address=config.address, **kwargs)
    else:
        # "local": a new embedded Ray, never one that `ray start` left running (or left a stale
        # address of in Ray's temp folder), which address=None would try to join
        with _quiet_logger(_AUTH_NOTICE):
            ray.init(address="local", num_cpus=config.num_cpus, num_gpus=config.num_gpus,
                     object_store_memory=config.object_store_mb * 1024 ** 2, **kwargs)
        _embedded = True
        _warn_unless_loopback()
    quiet_data()
    try:
        yield
    finally:
        _embedded = False
        ray.shutdown()


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Refuse a cluster address where nothing answers: Ray retries a head (``HOST:PORT``) that
    does not answer forever, logging a warning every few seconds. ``auto`` is left to Ray, which
    finds the cluster this machine belongs to or says there is none."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address {address!r}: expected auto, HOST:PORT (a head node's GCS port, 6379 unless "
                         "changed) or ray://HOST:PORT (its Ray Client port)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()   # [::1]: IPv6
    except OSError as err:
        raise ConnectionError(f"no Ray cluster answers at {address} ({err.strerror or err}): start it (ray up "
                              "ray_cluster.yaml), or give its head node's address; on a node of the cluster, "
                              "--address auto finds it") from None


def refuse_ray_client(command: str) -> None:
    """Stop a stage that runs Ray Data's executor in its own process when that process is a Ray
    Client driver (``ray://``): Ray 2.60's executor needs the driver's core worker, which a client
    has none of, and stopped with an AttributeError from deep inside Ray Data. Training, tuning and
    evaluation only start work that runs on the cluster, and run over Ray Client."""
    import ray.util.client

    if ray.util.client.ray.is_connected():
        raise RuntimeError(f"gcm {command} cannot run over Ray Client (ray://): Ray Data runs its executor in "
                           "this process, which a Ray Client session cannot host. Run it on the cluster instead: "
                           f"ray job submit --address http://HEAD:8265 -- gcm --address auto {command} ... "
                           "(or, on a machine of the cluster's network, --address HEAD:6379)")


def _warn_unless_loopback() -> None:
    """Say so when the embedded Ray listens beyond this machine: Ray reads the switch that keeps
    it on loopback (``LOCAL_ENV``) when ``ray`` is first imported, which code run before this
    session may have done."""
    import ray

    host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    if host != "127.0.0.1":
        print(f"warning: the embedded Ray listens on {host}, not only on 127.0.0.1: ray was imported before "
              "gcm-tal could keep it on loopback (set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray)",
              file=sys.stderr)


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Run the block with the logger ``name`` showing errors only."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quiet_data() -> None:
    """Ray Data without its own progress bars (the stages print their own progress)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": we did
    ctx.execution_options.preserve_order = True


def task_device() -> torch.device:
    """Where a Ray task or actor computes: the GPU Ray gave it (Ray sets CUDA_VISIBLE_DEVICES to
    it, so it is ``cuda``), else the CPU, also where the GPU is a logical one torch cannot see."""
    import ray
    import torch

    return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")


def use_gpus(setting: bool | None) -> bool:
    """A stage's ``use_gpu`` setting, or, when unset, whether the connected cluster has GPUs."""
    import ray

    return setting if setting is not None else ray.cluster_resources().get("GPU", 0) > 0


def gpu_share(setting: bool | None, share: float, what: str, remedy: str) -> float:
    """The GPUs each task or actor of a stage asks for: ``share`` where ``setting`` (a stage's
    ``use_gpu``; None: whether the cluster has GPUs) says so, checked by :func:`require_resources`;
    else 0."""
    if not use_gpus(setting):
        return 0.0
    require_resources(what, {"GPU": share}, remedy)
    return share


def require_resources(what: str, needed: dict[str, float], remedy: str) -> None:
    """Stop with a clear error where Ray would wait forever: ``needed`` (totals such as
    ``{"CPU": 2.25}``) beyond what the embedded Ray has; ``remedy`` ends the message. A cluster may
    still grow (an autoscaler adds nodes), so there the shortfall is printed and the stage waits."""
    import ray

    have = ray.cluster_resources()
    short = [f"{need:g} {name} (the cluster has {have.get(name, 0.0):g})" for name, need in needed.items()
             if need > have.get(name, 0.0) + 1e-9]
    if not short:
        return
    message = f"{what} needs {', '.join(short)}"
    if _embedded:
        raise RuntimeError(f"{message}: Ray would wait for them forever; {remedy}")
    print(f"{message}; waiting for the cluster to provide them", file=sys.stderr)
