"""Preprocessing throughput with 1 and 2 Ray Data workers, and on a simulated 3-node cluster.

    python benchmarks/preprocess_scaling.py [--scale medium] [--skip-cluster]

Writes the synthetic benchmark once, then runs `gcm preprocess` on it (fresh output each time) on
an embedded 2-CPU Ray with 1 and with 2 workers, and on a ray.cluster_utils.Cluster of a head and
two 2-CPU worker nodes (all on this machine). Prints videos/s end to end (actor start-up
included) and in steady state (between 20% and 80% of the videos, timed by when the workers wrote
their shards), and the 2-worker / 1-worker ratio
(target >= 1.7 on a 2-core machine). Workers run one torch thread each.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from gcm_core.data.cards import load_card
from gcm_core.data.synthetic import generate_dataset
from workflows.config import PreprocessConfig, RayConfig
from workflows.preprocess import run_preprocess
from workflows.ray_env import quiet_data, quiet_ray_environment, ray_session


def steady_rate(out: Path) -> float:
    """Videos per second between 20% and 80% of the videos, from when the workers wrote each shard."""
    shards = sorted((p.stat().st_mtime, len(json.loads(p.read_text())["summary"]["video_id"]))
                    for p in (out / "shards").glob("*.json"))
    total = sum(n for _, n in shards)
    done, marks = 0, []
    for stamp, n in shards:
        done += n
        marks.append((stamp, done))
    t20, d20 = next((t, d) for t, d in marks if d >= 0.2 * total)
    t80, d80 = next((t, d) for t, d in marks if d >= 0.8 * total)
    return (d80 - d20) / max(t80 - t20, 1e-9)


def measure(data: Path, out: Path, workers: int) -> tuple[float, float, int]:
    shutil.rmtree(out, ignore_errors=True)
    began = time.perf_counter()
    manifest = run_preprocess(PreprocessConfig(card=str(data / "card.yaml"), data_root=str(data), out=str(out),
                                               num_workers=workers), quiet=True)
    total = time.perf_counter() - began
    n = sum(c["videos"] for c in manifest["counts"].values())
    return n / total, steady_rate(out), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="medium", choices=["small", "medium", "full"])
    parser.add_argument("--skip-cluster", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the shards go (default: a temporary folder); e.g. /dev/shm to leave the disk out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=args.out) as shards:
        data, out = Path(tmp) / "data", Path(shards) / "prep"
        generate_dataset(data, load_card("synthetic"), args.scale, seed=0)
        results = {}
        with ray_session(RayConfig(num_cpus=2)):
            measure(data, out, 2)  # warm-up: the feature files enter the page cache
            for workers in (1, 2):
                results[f"{workers} worker{'s' if workers > 1 else ''}"] = measure(data, out, workers)
        if not args.skip_cluster:
            quiet_ray_environment()
            import ray
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            for _ in range(2):
                cluster.add_node(num_cpus=2)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
            quiet_data()
            try:
                results["3-node cluster (4 workers)"] = measure(data, out, 4)
            finally:
                ray.shutdown()
                cluster.shutdown()
    for name, (end_to_end, steady, n) in results.items():
        print(f"{name:28s} {n} videos: {end_to_end:6.1f} videos/s end to end, {steady:6.1f} videos/s steady")
    one, two = results["1 worker"], results["2 workers"]
    print(f"2 workers / 1 worker: x{two[0] / one[0]:.2f} end to end, x{two[1] / one[1]:.2f} steady "
          f"(target >= 1.7)")


if __name__ == "__main__":
    main()
