"""``gcm detect --features-dir``: a folder of new videos in one process against Ray tasks.

    python benchmarks/detect_scaling.py [--scale medium]

Writes the synthetic benchmark once (every video's features in a dataset's layout, its SSN lists
joined into one file) and an SSN+GCM checkpoint of the benchmark's feature width with untrained
weights (the work does not depend on them: every proposal is scored, every video's candidates go
through NMS), then detects every video of the folder:

- in process (``--workers 1``, the default): torch with the machine's 2 threads;
- as Ray tasks (``--workers 2``): 2 tasks at a time of one thread each, on an embedded 2-CPU Ray
  started beforehand, whose start is timed on its own (a command pays it once).

Prints videos/s of each and their ratio, and checks that both wrote the same detections.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from gcm_core.checkpoint import Checkpoint, save_checkpoint
from gcm_core.data.cards import load_card
from gcm_core.data.sampling import RegressionStats
from gcm_core.data.synthetic import generate_dataset
from gcm_core.detectors import ModelConfig
from gcm_core.engine import build_heads
from gcm_core.graph import GraphSpec
from gcm_core.postprocess import InferenceConfig
from workflows.config import RayConfig
from workflows.detect import Detector, detect_in_parallel, detect_videos, folder_videos
from workflows.ray_env import ray_session


def untrained_checkpoint(data: Path, path: Path) -> None:
    card = load_card(data / "card.yaml")
    torch.manual_seed(0)
    heads = build_heads(ModelConfig(), card.streams, int(card.snippets["dim"]), card.num_classes)
    save_checkpoint(path, Checkpoint(list(card.classes), ModelConfig(), GraphSpec(), InferenceConfig(),
                                     dict(card.snippets), heads.eval(), RegressionStats(torch.zeros(2), torch.ones(2))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="medium", choices=["small", "medium", "full"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, checkpoint, proposals = Path(tmp) / "data", Path(tmp) / "model.pt", Path(tmp) / "proposals.txt"
        generate_dataset(data, load_card("synthetic"), args.scale, seed=0)
        proposals.write_text("".join((data / f"proposals/{role}_proposal_list.txt").read_text()
                                     for role in ("train", "test")))
        untrained_checkpoint(data, checkpoint)
        detector = Detector.load(checkpoint)
        videos = folder_videos(data / "features", detector.streams, detector.columns)
        detect_videos(detector, videos[:4], proposals)  # warm-up: imports, first allocations

        began = time.perf_counter()
        alone, _ = detect_videos(detector, videos, proposals)
        in_process = time.perf_counter() - began
        began = time.perf_counter()
        with ray_session(RayConfig(num_cpus=2)):
            start_up = time.perf_counter() - began
            began = time.perf_counter()
            tasks, _ = detect_in_parallel(checkpoint, videos, proposals, workers=2)
            parallel = time.perf_counter() - began
    same = alone.video == tasks.video and alone.label == tasks.label and (alone.score == tasks.score).all()
    n = len(videos)
    print(f"{n} videos ({args.scale}), {len(alone)} detections; the same from both paths: {same}")
    print(f"in process, 2 threads:           {n / in_process:6.1f} videos/s ({in_process:.1f} s)")
    print(f"Ray tasks, 2 workers x 1 thread: {n / parallel:6.1f} videos/s ({parallel:.1f} s), "
          f"ratio x{in_process / parallel:.2f}; the embedded Ray's start: {start_up:.1f} s")


if __name__ == "__main__":
    main()
