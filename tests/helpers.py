"""Helpers shared by test modules (importable as ``helpers``: tests/ is on the path)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GCM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def read_tag_proposals_frames(path: Path, n_videos: int) -> dict[str, list[tuple[int, int]]]:
    """A deliberately plain reader of the first videos of an SSN/P-GCN proposal list (frames)."""
    lines = path.read_text().splitlines()
    out: dict[str, list[tuple[int, int]]] = {}
    i = 0
    while i < len(lines) and len(out) < n_videos:
        assert lines[i].startswith("#"), lines[i]
        video = lines[i + 1].rstrip("/").split("/")[-1]
        n_gt = int(lines[i + 4])
        i += 5 + n_gt
        n_prop = int(lines[i])
        rows = [line.split() for line in lines[i + 1:i + 1 + n_prop]]
        out[video] = [(int(r[3]), int(r[4])) for r in rows]
        i += 1 + n_prop
    return out


def _join_process_group(rank: int, port: int, fn, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        fn(rank, *args)
        # neither worker tears the group down while the other may still use it: in one make test
        # run a worker aborted at teardown ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_two_workers(fn, *args, timeout_s: int = 120) -> None:
    """Run ``fn(rank, *args)`` in two processes joined in a gloo process group on the loopback (the
    group a data-parallel Ray Train run sets up); bounded: workers that wait on each other forever
    are killed and the call fails."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:   # a free port for the workers' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.spawn(_join_process_group, args=(port, fn, args), nprocs=2, join=False)
    for _ in range(timeout_s):
        if context.join(timeout=1):
            return
    for process in context.processes:
        process.kill()
    raise AssertionError(f"the two workers did not finish within {timeout_s} s")
