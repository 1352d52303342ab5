"""The subcommands of ``gcm``: their arguments and the stage each one calls (``REGISTRY``, which
:mod:`workflows.cli` turns into the command line)."""
from __future__ import annotations

import argparse
from collections.abc import Callable

from workflows.commands.stages import (
    add_demo, add_evaluate, add_preprocess, add_report, add_train, add_tune, run_demo, run_evaluate, run_preprocess,
    run_report, run_train, run_tune,
)
from workflows.commands.tools import (
    add_detect, add_eval_detections, add_synth, run_detect, run_eval_detections, run_synth,
)

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
REGISTRY: dict[str, Command] = {
    "eval-detections": ("score detections against ground truth under an official protocol",
                        add_eval_detections, run_eval_detections),
    "preprocess": ("pool unit features and candidate edges of every video into Parquet shards (Ray Data)",
                   add_preprocess, run_preprocess),
    "train": ("train SSN+GCM (or a baseline) data-parallel on a preprocessed dataset (Ray Train)",
              add_train, run_train),
    "tune": ("run an ablation grid of train + evaluate trials (Ray Tune)", add_tune, run_tune),
    "evaluate": ("evaluate checkpoints on datasets in parallel (Ray)", add_evaluate, run_evaluate),
    "synth": ("write a synthetic THUMOS'14-like benchmark in the layout of real data", add_synth, run_synth),
    "detect": ("detect actions in new videos (one, or a folder of them) with a trained checkpoint", add_detect,
               run_detect),
    "report": ("write REPORT.md with paper-style tables and figures from run folders", add_report, run_report),
    "demo": ("the main job end to end on a small synthetic benchmark (embedded Ray by default)", add_demo,
             run_demo),
}
