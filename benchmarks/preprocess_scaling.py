"""Preprocessing throughput with 1 and 2 Ray Data workers, and on a simulated 3-node cluster.

    python benchmarks/preprocess_scaling.py [--scale medium] [--skip-cluster]

Writes the synthetic benchmark once, then runs `gcm preprocess` on it (fresh output each time) on
an embedded 2-CPU Ray with 1 and with 2 workers, and on a ray.cluster_utils.Cluster of a head and
two 2-CPU worker nodes (all on this machine). Prints videos/s two ways, and the 2-worker /
1-worker ratio of each (target >= 1.7 on a 2-core machine); workers run one torch thread each:

- end to end: the whole stage, from the call to the manifest, worker start-up included (each
  worker is a new process that imports torch: a fixed 2-3 s here, whatever the dataset's size);
- processing: from the first shard a worker started to the last one it finished (the times the
  workers record in the manifest), i.e. the rate once the workers are up.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from gcm_core.data.cards import load_card
from gcm_core.data.synthetic import generate_dataset
from workflows.config import PreprocessConfig, RayConfig
from workflows.preprocess import run_preprocess
from workflows.ray_env import quiet_data, quiet_ray_environment, ray_session


def processing_seconds(manifest: dict) -> float:
    """From the first shard a worker started to the last one a worker finished."""
    workers = [shard["worker"] for shard in manifest["shards"]]
    return max(w["finished"] for w in workers) - min(w["started"] for w in workers)


def measure(data: Path, out: Path, workers: int) -> tuple[float, float, int]:
    shutil.rmtree(out, ignore_errors=True)
    began = time.perf_counter()
    manifest = run_preprocess(PreprocessConfig(card=str(data / "card.yaml"), data_root=str(data), out=str(out),
                                               num_workers=workers), quiet=True)
    total = time.perf_counter() - began
    n = sum(c["videos"] for c in manifest["counts"].values())
    return n / total, n / processing_seconds(manifest), n


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
    for name, (end_to_end, processing, n) in results.items():
        print(f"{name:28s} {n} videos: {end_to_end:6.1f} videos/s end to end, {processing:6.1f} videos/s processing")
    one, two = results["1 worker"], results["2 workers"]
    print(f"2 workers / 1 worker: x{two[0] / one[0]:.2f} end to end, x{two[1] / one[1]:.2f} processing "
          f"(target >= 1.7)")


if __name__ == "__main__":
    main()
