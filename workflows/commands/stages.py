"""The subcommands of ``gcm`` that run a stage of the workflow from its settings (``--config``,
``--set``): ``preprocess``, ``train``, ``tune``, ``evaluate``, ``report``, and ``demo``, which runs
them all."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workflows import GRID_DIR
from workflows.commands.common import add_stage_options, at_least, ray_session_of, stage_config


def add_preprocess(p: argparse.ArgumentParser) -> None:
    p.add_argument("--card", help="dataset card (name or YAML path)")
    p.add_argument("--data-root", help="folder the card's paths are relative to (default: $GCM_DATA_ROOT)")
    p.add_argument("--out", help="output folder of the shards and manifest")
    p.add_argument("--workers", type=int, help="parallel workers (actors; default: the config's, 2)")
    p.add_argument("--overwrite", action="store_true", default=None, help="redo finished shards")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="leave out videos that fail their checks (listed in the manifest) instead of stopping")
    add_stage_options(p, "videos_per_shard=8")


def run_preprocess(args: argparse.Namespace) -> int:
    from workflows.config import PreprocessConfig
    from workflows.preprocess import run_preprocess

    config = stage_config(PreprocessConfig, args, card=args.card, data_root=args.data_root, out=args.out,
                          num_workers=args.workers, overwrite=args.overwrite, skip_bad=args.skip_bad)
    with ray_session_of(args):
        manifest = run_preprocess(config, args.quiet)
    counts = ", ".join(f"{role}: {c['videos']} videos, {c['units']} units, {c['edges']} candidate edges"
                       for role, c in manifest["counts"].items())
    print(f"preprocess: wrote {len(manifest['shards'])} shards to {config.out} ({counts}); "
          f"skipped {len(manifest['skipped'])} videos")
    return 0


def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="preprocessed dataset folder (gcm preprocess --out)")
    p.add_argument("--card", help="one-stage runs (--set kind=one-stage): read this dataset card's features "
                                  "directly instead of a preprocessed --data (no proposals needed)")
    p.add_argument("--data-root", help="with --card: the folder its paths are relative to (default: $GCM_DATA_ROOT)")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="with --card: leave out videos whose annotation or features fail their checks (listed in "
                        "the run's skipped_videos.json) instead of stopping")
    p.add_argument("--out", help="runs folder")
    p.add_argument("--name", help="run name (a folder under --out)")
    p.add_argument("--workers", type=int, help="data-parallel training workers (default: the config's, 2)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run from its last checkpoint with the settings it was started with (its "
                        "config.yaml; nothing needs repeating), or for more epochs (--set train.epochs=N)")
    add_stage_options(p, "train.lr=0.01")


def run_train(args: argparse.Namespace) -> int:
    from workflows.config import TrainStageConfig
    from workflows.train import run_dir, run_train

    config = stage_config(TrainStageConfig, args, run_dir, data=args.data, card=args.card, data_root=args.data_root,
                          skip_bad=args.skip_bad, out=args.out, name=args.name, num_workers=args.workers,
                          resume=args.resume)
    with ray_session_of(args):
        result = run_train(config, args.quiet)
    fused = {k: v for k, v in result["metrics"].items() if k.startswith("fused/")}
    headline = ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in fused.items())
    print(f"train {config.name}: checkpoint {result['checkpoint']}" + (f"; fused {headline}" if headline else ""))
    return 0


def add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", nargs="+",
                   help="checkpoints written by gcm train (model.pt, or dssad.pt of one-stage runs)")
    p.add_argument("--data", nargs="+", help="preprocessed datasets whose test split is evaluated")
    p.add_argument("--card", nargs="+", help="D-SSAD checkpoints only: datasets read directly by their cards (no "
                                              "preprocessing, no proposals), each with the --data-root in the same place")
    p.add_argument("--data-root", nargs="+", help="with --card: the folders the cards' paths are relative to, in "
                                                   "the same order (default: $GCM_DATA_ROOT for every card)")
    p.add_argument("--out", help="output folder (detections and metrics per pair, summary table)")
    p.add_argument("--protocol", choices=["thumos14", "activitynet"], help="override the datasets' protocols")
    p.add_argument("--tiou", type=float, nargs="+", help="override the datasets' tIoU thresholds")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a previous evaluation in --out")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="with --card: leave out test videos whose features fail their checks (listed in --out's "
                        "skipped_videos.json) instead of stopping")
    p.add_argument("--video-scores", metavar="FILE",
                   help="external video-level class scores, the paper's 'with video labels': every test video's "
                        "units are decoded as its --video-top best classes only, scores times the video's score of "
                        "the class. FILE: .json {\"class\": [names], \"results\": {video: [scores]}} (BSN/BMN's "
                        "ActivityNet layout) or UntrimmedNet's THUMOS'14 .npy")
    p.add_argument("--video-top", type=at_least(int, 1),
                   help="with --video-scores: the classes each video is given (default: 2, as the paper)")
    add_stage_options(p, "inference.nms=soft-nms: post-processing other than the checkpoints' own")


def run_evaluate(args: argparse.Namespace) -> int:
    from workflows.config import EvaluateConfig
    from workflows.evaluate import run_evaluate

    config = stage_config(EvaluateConfig, args, checkpoints=args.checkpoint, data=args.data, cards=args.card,
                          data_roots=args.data_root, out=args.out, protocol=args.protocol, tiou=args.tiou,
                          overwrite=args.overwrite, skip_bad=args.skip_bad, video_scores=args.video_scores,
                          video_top=args.video_top)
    with ray_session_of(args):
        rows = run_evaluate(config, args.quiet)
    print((Path(config.out) / "summary.md").read_text())
    datasets = len(config.data) + len(config.cards)
    print(f"evaluate: {len(config.checkpoints)} checkpoint(s) x {datasets} dataset(s) = {len(rows)} evaluations; "
          f"summary in {Path(config.out) / 'summary.md'}")
    return 0


def add_tune(p: argparse.ArgumentParser) -> None:
    shipped = sorted(path.stem for path in GRID_DIR.glob("*.yaml"))
    p.add_argument("grid", help=f"grid YAML: a path or a shipped name ({', '.join(shipped)})")
    p.add_argument("--data", help="the preprocessed dataset every trial uses")
    p.add_argument("--card", help="one-stage grids (tables 11, 12): read this dataset card's features directly "
                                  "instead of a preprocessed --data (no proposals needed)")
    p.add_argument("--data-root", help="with --card: the folder its paths are relative to (default: $GCM_DATA_ROOT)")
    p.add_argument("--out", help="experiments folder")
    p.add_argument("--resume", action="store_true", default=None,
                   help="finish an interrupted experiment with the settings it started with (its config.yaml; "
                        "nothing needs repeating but the grid and --out)")
    p.add_argument("--seeds", type=at_least(int, 1),
                   help="train every setting with this many seeds (the recipe's and those after it): the table "
                        "gives each metric's mean ± standard deviation (default: 1)")
    add_stage_options(p, "base.train.epochs=10")


def run_tune(args: argparse.Namespace) -> int:
    from workflows.config import TuneStageConfig
    from workflows.tune import experiment_dir, load_grid, run_tune, trial_name, unreported_metrics

    direct = {k: v for k, v in (("card", args.card), ("data_root", args.data_root)) if v is not None}
    config = stage_config(TuneStageConfig, args, experiment_dir, grid=args.grid, data=args.data, out=args.out,
                          resume=args.resume, seeds=args.seeds, base=direct or None)
    with ray_session_of(args):
        rows = run_tune(config, args.quiet)
    grid = load_grid(config.grid)
    table = Path(config.out) / grid.name / f"{grid.name}.md"
    print(table.read_text())
    print(f"tune: table written to {table} (and .csv)")
    unreported = unreported_metrics(grid, rows)
    if unreported:
        print(f"tune: no trial reported {unreported}, so their columns are empty; trials report "
              f"{sorted({name for r in rows for name in r['metrics']})} (correct the grid's metrics and run again "
              "with --resume to rewrite the table)", file=sys.stderr)
    failed = [(trial_name(grid, r["trial"]), r["error"].strip().splitlines()[-1]) for r in rows if r["error"].strip()]
    if failed:
        print(f"tune: {len(failed)} of {len(rows)} trials failed (rerun with --resume to retry them):", file=sys.stderr)
        for name, error in failed:
            print(f"  {name}: {error}", file=sys.stderr)
        return 1
    return 0


def add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("folders", nargs="+", type=Path, help="run, evaluation or tune folders (or folders holding them)")
    p.add_argument("--out", type=Path, help="where REPORT.md and the figures go (default: the first folder)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous report in --out")


def run_report(args: argparse.Namespace) -> int:
    from workflows.report import write_report

    report = write_report(args.folders, args.out, overwrite=args.overwrite)
    print(f"report: {report}")
    return 0


def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"),
                   help="the demo's folder (recreated on every run; a folder it did not make is refused)")
    p.add_argument("--seed", type=at_least(int, 0), default=0, help="seed of the synthetic data and of training")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run_demo(args: argparse.Namespace) -> int:
    from workflows.demo import run_demo

    with ray_session_of(args):
        run_demo(args.out, args.seed, args.quiet)
    return 0
