"""Detection evaluation speed against a plain-Python loop of the same algorithm, in one run.

    python benchmarks/eval_speed.py [--skip-activitynet-scale]

1. 200 videos x 100 detections x 20 classes (THUMOS'14-like ground truth, 15 instances per
   video), 10 thresholds: gcm_core.metrics against tests/reference_metrics.py's loop
   transcription of the official ActivityNet evaluator; the two must agree. Target < 0.3 s.
2. ActivityNet scale (4,926 videos x 100 detections, 200 classes, 10 thresholds): the whole
   ``gcm eval-detections --protocol activitynet`` command in a subprocess, start-up and JSON
   parsing included, against the loop on the same files (which is not charged its JSON parsing).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from reference_metrics import loop_activitynet_ap  # noqa: E402

from gcm_core.metrics import ACTIVITYNET_TIOU, Segments, activitynet_ap, thumos14_ap  # noqa: E402


def synthetic(n_videos: int, n_classes: int, gt_per_video: float, det_per_video: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    gt, det = [], []
    for v in range(n_videos):
        duration = rng.uniform(60, 300)
        for _ in range(max(1, rng.poisson(gt_per_video))):
            s = rng.uniform(0, duration - 5)
            gt.append((v, int(rng.integers(n_classes)), s, min(duration, s + rng.uniform(1, 30))))
        mine = [g for g in gt if g[0] == v]
        for _ in range(det_per_video):
            if rng.random() < 0.5:  # near a ground truth, sometimes the wrong class
                _, c, s, e = mine[rng.integers(len(mine))]
                c = c if rng.random() < 0.8 else int(rng.integers(n_classes))
                s, e = s + rng.normal(0, 2), e + rng.normal(0, 2)
            else:
                c, s = int(rng.integers(n_classes)), rng.uniform(0, duration)
                e = s + rng.uniform(1, 30)
            det.append((v, c, min(s, e), max(s, e) + 1e-3, float(rng.random())))
    return gt, det


def segments(rows, scored):
    cols = list(zip(*rows))
    return Segments(cols[0], cols[1], cols[2], cols[3], cols[4] if scored else None)


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def thumos_scale() -> None:
    gt, det = synthetic(200, 20, 15, 100)
    g, d = segments(gt, False), segments(det, True)
    thresholds = list(ACTIVITYNET_TIOU)
    activitynet_ap(g, d, thresholds, 20)  # warm-up
    fast, t_fast = timed(lambda: activitynet_ap(g, d, thresholds, 20), repeat=3)
    _, t_thumos = timed(lambda: thumos14_ap(g, d, thresholds, 20), repeat=3)
    loop, t_loop = timed(lambda: loop_activitynet_ap(gt, det, thresholds, 20))
    assert np.allclose(fast.ap.numpy(), loop, atol=1e-12, equal_nan=True), "implementations disagree"
    print(f"[200 videos x 100 det x 20 classes, 10 tIoU] activitynet: {t_fast:.3f} s; loop: {t_loop:.2f} s; "
          f"speed-up x{t_loop / t_fast:.0f}; same APs; thumos14 protocol: {t_thumos:.3f} s; "
          f"target < 0.3 s: {'PASS' if t_fast < 0.3 else 'FAIL'}")


def activitynet_scale() -> None:
    gt, det = synthetic(4926, 200, 1.65, 100, seed=1)
    classes = [f"class_{c:03d}" for c in range(200)]
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, det_path = Path(tmp) / "gt.json", Path(tmp) / "det.json"
        database = {f"v{v}": {"subset": "validation", "duration": 300.0, "annotations": []} for v in range(4926)}
        for v, c, s, e in gt:
            database[f"v{v}"]["annotations"].append({"label": classes[c], "segment": [s, e]})
        results = {f"v{v}": [] for v in range(4926)}
        for v, c, s, e, sc in det:
            results[f"v{v}"].append({"label": classes[c], "score": sc, "segment": [s, e]})
        gt_path.write_text(json.dumps({"version": "1.3", "database": database}))
        det_path.write_text(json.dumps({"version": "1.3", "results": results}))
        command = [sys.executable, "-m", "workflows.cli", "eval-detections", "--protocol", "activitynet",
                   "--ground-truth", str(gt_path), "--detections", str(det_path), "--json"]
        proc, t_cli = timed(lambda: subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT))
    cli_map = json.loads(proc.stdout)["average"]
    loop, t_loop = timed(lambda: loop_activitynet_ap(gt, det, list(ACTIVITYNET_TIOU), 200))
    loop_map = 100 * float(np.nanmean(loop))
    assert abs(cli_map - loop_map) < 1e-3, (cli_map, loop_map)
    print(f"[ActivityNet scale: 4926 videos x 100 det, 200 classes, 10 tIoU] gcm eval-detections "
          f"(whole command): {t_cli:.2f} s; plain-Python loop: {t_loop:.2f} s; ratio x{t_loop / t_cli:.1f}; "
          f"average mAP {cli_map:.3f} both; {'PASS' if t_cli < t_loop else 'FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-activitynet-scale", action="store_true")
    args = parser.parse_args()
    thumos_scale()
    if not args.skip_activitynet_scale:
        activitynet_scale()


if __name__ == "__main__":
    main()
