"""``gcm detect --features-dir``: a folder of new videos in one process against Ray tasks, or
(``--gpu``) on the CPU against the GPU.

    python benchmarks/detect_scaling.py [--scale medium] [--gpu]

Writes the synthetic benchmark once (every video's features in a dataset's layout, its SSN lists
joined into one file) and an SSN+GCM checkpoint of the benchmark's feature width with untrained
weights (the work does not depend on them: every proposal is scored, every video's candidates go
through NMS), then detects every video of the folder:

- in process (``--workers 1``, the default): torch with the machine's 2 threads;
- as Ray tasks (``--workers 2``): 2 tasks at a time of one thread each, on an embedded 2-CPU Ray
  started beforehand, whose start is timed on its own (a command pays it once);
- with ``--gpu``, instead of the tasks: in process on the GPU (``--device cuda``; no Ray needed),
  after a warm-up of its own.

Prints videos/s of each and their ratio, and checks that both wrote the same detections. On the
GPU it counts the ranks that hold another detection (label, or a boundary 1e-3 s away): the
untrained weights give many overlapping proposals scores equal to float32 rounding, and where two
trade places NMS keeps another survivor and suppresses others (``tests/core/test_detect_device.py``
checks a trained head's detections, where ranked scores agree within 1e-5).
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
from gcm_core.data.model import Detections
from gcm_core.data.synthetic import generate_dataset
from gcm_core.detectors import ModelConfig
from gcm_core.engine import build_heads
from gcm_core.graph import GraphSpec
from gcm_core.postprocess import InferenceConfig
from workflows.config import RayConfig
from workflows.detect import Detector, VideoFiles, detect_in_parallel, detect_videos, folder_videos
from workflows.ray_env import ray_session


def untrained_checkpoint(data: Path, path: Path) -> None:
    card = load_card(data / "card.yaml")
    torch.manual_seed(0)
    heads = build_heads(ModelConfig(), card.streams, int(card.snippets["dim"]), card.num_classes)
    save_checkpoint(path, Checkpoint(list(card.classes), ModelConfig(), GraphSpec(), InferenceConfig(),
                                     dict(card.snippets), heads.eval(), RegressionStats(torch.zeros(2), torch.ones(2))))


def timed_in_process(detector: Detector, videos: list[VideoFiles], proposals: Path) -> tuple[Detections, float]:
    """The folder's detections in this process, and the seconds they took after a warm-up
    (imports, first allocations, CUDA's context and kernels)."""
    detect_videos(detector, videos[:4], proposals)
    began = time.perf_counter()
    found, _ = detect_videos(detector, videos, proposals)
    return found, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="medium", choices=["small", "medium", "full"])
    parser.add_argument("--gpu", action="store_true", help="the CPU against the GPU, both in process (no Ray)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, checkpoint, proposals = Path(tmp) / "data", Path(tmp) / "model.pt", Path(tmp) / "proposals.txt"
        generate_dataset(data, load_card("synthetic"), args.scale, seed=0)
        proposals.write_text("".join((data / f"proposals/{role}_proposal_list.txt").read_text()
                                     for role in ("train", "test")))
        untrained_checkpoint(data, checkpoint)
        detector = Detector.load(checkpoint)
        videos = folder_videos(data / "features", detector.streams, detector.columns)
        alone, in_process = timed_in_process(detector, videos, proposals)
        if args.gpu:
            other, elapsed = timed_in_process(Detector.load(checkpoint, "cuda"), videos, proposals)
            how = f"in process on {torch.cuda.get_device_name()}:"
        else:
            began = time.perf_counter()
            with ray_session(RayConfig(num_cpus=2)):
                start_up = time.perf_counter() - began
                began = time.perf_counter()
                other, _ = detect_in_parallel(checkpoint, videos, proposals, workers=2)
                elapsed = time.perf_counter() - began
            how = "Ray tasks, 2 workers x 1 thread:"
    n = len(videos)
    if args.gpu:
        moved = sum(a != b or abs(s - t) > 1e-3 or abs(e - f) > 1e-3 for a, b, s, t, e, f in
                    zip(alone.label, other.label, alone.start, other.start, alone.end, other.end))
        print(f"{n} videos ({args.scale}), {len(alone)} detections on the CPU, {len(other)} on the GPU; "
              f"ranks holding another detection (near-equal scores traded places): {moved}")
    else:
        same = alone.video == other.video and alone.label == other.label and (alone.score == other.score).all()
        print(f"{n} videos ({args.scale}), {len(alone)} detections; the same from both paths: {same}")
    print(f"in process, {torch.get_num_threads()} threads: {n / in_process:6.1f} videos/s ({in_process:.1f} s)")
    print(f"{how} {n / elapsed:6.1f} videos/s ({elapsed:.1f} s), ratio x{in_process / elapsed:.2f}"
          + ("" if args.gpu else f"; the embedded Ray's start: {start_up:.1f} s"))


if __name__ == "__main__":
    main()
