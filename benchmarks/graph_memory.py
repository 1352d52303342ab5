"""Graph construction for one very long video: time and peak memory growth stay bounded.

    python benchmarks/graph_memory.py [--units 50000] [--dim 256]

Units are random proposals in a video whose length grows with N (about THUMOS'14's density of
TAG proposals per second). Prints N, seconds, edges and the peak RSS growth over the process
before the build, and the ratio against what one dense N x N float64 matrix alone would take.
Target (issue 2): peak growth under 2 GB at N = 50,000.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from gcm_core.graph import GraphSpec, build_graph


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    n = args.units
    video_seconds = n * 0.8  # THUMOS'14 TAG lists: ~250 proposals over ~200 s
    start = torch.rand(n, generator=gen, dtype=torch.float64) * video_seconds
    length = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64) * 30
    intervals = torch.stack([start, start + length], dim=1)
    features = torch.randn(n, args.dim, generator=gen)
    build_graph(intervals[:500], features[:500])  # warm-up outside the measurement

    before = peak_rss_bytes()
    t0 = time.perf_counter()
    graph = build_graph(intervals, features, GraphSpec())
    seconds = time.perf_counter() - t0
    growth = max(0, peak_rss_bytes() - before)
    dense = n * n * 8
    print(f"N={n} dim={args.dim} seconds={seconds:.2f} edges={graph.num_edges} "
          f"peak_rss_growth={growth / 2**30:.3f} GiB")
    print(f"dense N x N float64 matrix alone: {dense / 2**30:.1f} GiB -> ratio growth/dense = {growth / dense:.4f}")
    print("target: peak growth < 2 GiB:", "PASS" if growth < 2 * 2**30 else "FAIL")


if __name__ == "__main__":
    main()
