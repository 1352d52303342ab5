"""Unit-feature pooling speed on one CPU core, against a per-unit loop in the same run.

    python benchmarks/pooling_speed.py [--units 2000] [--snippets 1100] [--dim 1024]

A THUMOS'14-sized video (T = 1100 I3D snippets, 1024-d) and N = 2000 random units: times
body max pooling, and body + extended + three-part together, with gcm_core's sparse-table pooler
and with a loop of one slice-max per unit (what the authors' code does, ~1 s per such video).
Target (issue 3): under 20 ms for the body features.
"""
from __future__ import annotations

import argparse
import time

import torch

from gcm_core.data.pooling import SnippetGrid, unit_features


def loop_pool(features: torch.Tensor, grid: SnippetGrid, intervals: torch.Tensor) -> torch.Tensor:
    first, last = grid.snippet_range(intervals[:, 0], intervals[:, 1])
    return torch.stack([features[f:l + 1].max(dim=0).values for f, l in zip(first.tolist(), last.tolist())])


def best_of(fn, repeat: int = 5) -> tuple[object, float]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, default=2000)
    parser.add_argument("--snippets", type=int, default=1100)
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    grid = SnippetGrid("i3d", args.snippets, duration=(args.snippets * 8 + 56) / 30, fps=30.0)
    features = torch.randn(args.snippets, args.dim, generator=gen)
    start = torch.rand(args.units, generator=gen, dtype=torch.float64) * grid.duration * 0.95
    intervals = torch.stack([start, torch.clamp(start + 0.5 + torch.rand(args.units, generator=gen,
                                                                            dtype=torch.float64) * 40, max=grid.duration)], 1)

    body, t_body = best_of(lambda: unit_features(features, intervals, grid, parts=("body",))["body"])
    _, t_all = best_of(lambda: unit_features(features, intervals, grid))
    looped, t_loop = best_of(lambda: loop_pool(features, grid, intervals), repeat=2)
    assert torch.equal(body, looped), "pooled features differ from the loop"
    print(f"N={args.units} T={args.snippets} C={args.dim}, 1 thread: body {t_body * 1e3:.1f} ms; "
          f"body+extended+three-part {t_all * 1e3:.1f} ms; per-unit loop (body) {t_loop * 1e3:.1f} ms; "
          f"speed-up x{t_loop / t_body:.1f}; target body < 20 ms: {'PASS' if t_body < 0.020 else 'FAIL'}")


if __name__ == "__main__":
    main()
