"""The subcommands of ``gcm``: their arguments and the stage each one calls."""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workflows import GRID_DIR
from workflows.tables import markdown_table


def at_least(kind: type[int] | type[float], minimum: int, strict: bool = False) -> Callable[[str], int | float]:
    """An argparse type: a finite number >= ``minimum`` (> with ``strict``): a frame rate, a
    duration, a count of workers, a seed, where 0 or less would otherwise silently mean 'the
    default' or fail far from the option that caused it."""
    bound = f"{'>' if strict else '>='} {minimum}"

    def parse(text: str) -> int | float:
        value = kind(text)
        if not (math.isfinite(value) and (value > minimum if strict else value >= minimum)):
            raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid float value: 'x'"
    return parse


def _add_eval_detections(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", required=True, choices=["thumos14", "activitynet"],
                   help="thumos14: the challenge's official protocol (older literature); "
                        "activitynet: the official ActivityNet evaluator (ActionFormer/OpenTAD)")
    p.add_argument("--ground-truth", required=True, type=Path,
                   help="THUMOS'14 per-class folder, ActivityNet/ActionFormer JSON or annotation CSV")
    p.add_argument("--detections", required=True, type=Path,
                   help="ActivityNet result JSON, or THUMOS text 'video start end class_index score'")
    p.add_argument("--tiou", type=float, nargs="+", help="tIoU thresholds (default: the card's)")
    p.add_argument("--card", help="dataset card name or YAML path (default: thumos14 for that protocol)")
    p.add_argument("--subset", help="evaluate the ground-truth videos of this subset only "
                                    "(default: the card's test subset when the file holds several)")
    p.add_argument("--label-convention", default="official",
                   choices=["official", "zero_based", "one_based"], help="class indices in THUMOS text")
    p.add_argument("--class-agnostic", action="store_true",
                   help="also the AP with every class merged into one: its gap to the mAP is what classification "
                        "costs the detector")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _run_eval_detections(args: argparse.Namespace) -> int:
    from gcm_core.data.cards import load_card
    from gcm_core.data.formats import read_annotations, read_detections
    from gcm_core.evaluation import AGNOSTIC, class_agnostic, evaluate_detections, select_subset, unmatched_detections
    from gcm_core.metrics import ACTIVITYNET_TIOU, THUMOS14_TIOU

    thumos_inputs = args.protocol == "thumos14" or args.detections.suffix != ".json"
    card = load_card(args.card or "thumos14") if (args.card or thumos_inputs) else None
    videos = read_annotations(args.ground_truth, card)
    subset = args.subset
    subsets = sorted({v.subset for v in videos.values()})
    if subset is None and len(subsets) > 1:
        if card is None:
            raise ValueError(f"{args.ground_truth} holds the subsets {subsets}: choose one with --subset, or give "
                             "the dataset's --card, whose test subset is taken (e.g. ActivityNet's is 'validation')")
        subset = card.subsets["test"]
    videos = select_subset(videos, subset)
    detections = read_detections(args.detections, card, args.label_convention)
    classes = card.classes if card else sorted({i.label for v in videos.values() for i in v.instances})
    tiou = args.tiou or (card.tiou if card else (THUMOS14_TIOU if args.protocol == "thumos14" else ACTIVITYNET_TIOU))
    summary = evaluate_detections(videos, detections, classes, args.protocol, tiou).as_dict(classes)
    unmatched = unmatched_detections(videos, detections, classes)
    for note in unmatched.notes(len(classes)):
        print(f"note: {note}", file=sys.stderr)
    agnostic = None
    if args.class_agnostic:
        merged = class_agnostic(videos, detections)
        agnostic = evaluate_detections(*merged, [AGNOSTIC], args.protocol, tiou).as_dict([AGNOSTIC])
    if args.json:
        extra = {"unmatched": unmatched.counts(), **({"class_agnostic": agnostic} if agnostic else {})}
        print(json.dumps({**summary, **extra}))
        return 0
    n_inst = sum(len(v.instances) for v in videos.values())
    print(f"protocol {args.protocol}: {len(videos)} videos{f' ({subset})' if subset else ''}, "
          f"{n_inst} instances, {len(detections)} detections")
    headers = ["tIoU", *(f"{t:g}" for t in tiou), "average"]
    rows = [["mAP (%)", *summary["mAP"], summary["average"]]]
    if agnostic:
        rows.append(["class-agnostic AP (%)", *agnostic["mAP"], agnostic["average"]])
    print(markdown_table(headers, rows))
    return 0


def _add_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--card", default="synthetic", help="synthetic dataset card (name or YAML path)")
    p.add_argument("--out", type=Path, help="output folder (the layout of real data)")
    p.add_argument("--seed", type=at_least(int, 0), default=0,
                   help="random seed: the same seed writes the same files")
    p.add_argument("--scale", default="small", choices=["small", "medium", "full"],
                   help="small: a few dozen videos (demo); medium: THUMOS'14 size, 256-d; full: 1024-d")
    p.add_argument("--control", action="store_true", help="relation-free control: every relation knob at 0")
    p.add_argument("--structure-from", type=Path, nargs="+", metavar="ANNOTATIONS",
                   help="use the videos and instances of real annotation files or folders")
    p.add_argument("--proposals", type=Path, nargs="+", metavar="LIST",
                   help="with --structure-from: real proposal lists to use")
    p.add_argument("--structure-card", default="thumos14", help="card of the --structure-from annotations")
    p.add_argument("--measure-from", type=Path, nargs="+", metavar="ANNOTATIONS",
                   help="print the structure statistics of real annotations (for a card) and exit")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")


def _run_synth(args: argparse.Namespace) -> int:
    import yaml

    from gcm_core.data.cards import load_card
    from gcm_core.data.formats import read_annotations, read_proposals
    from gcm_core.data.synthetic import generate_dataset, measure_structure

    if args.measure_from:
        card = load_card(args.structure_card)
        videos = {}
        for path in args.measure_from:
            videos.update(read_annotations(path, card))
        print(yaml.safe_dump({"structure": measure_structure(videos, list(card.classes))},
                             default_flow_style=None, sort_keys=False))
        return 0
    if args.out is None:
        raise ValueError("--out is required (the folder to write the dataset into)")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise ValueError(f"{args.out} is not empty; pass --overwrite to write into it")
    real = proposals = None
    if args.structure_from:
        real = {}
        for path in args.structure_from:
            real.update(read_annotations(path, load_card(args.structure_card)))
        if args.proposals:
            proposals = {}
            for path in args.proposals:
                proposals.update(read_proposals(path, real, skip_unknown=True))
            real = {k: v for k, v in real.items() if k in proposals}
    summary = generate_dataset(args.out, load_card(args.card), args.scale, args.seed, args.control, real, proposals)
    print(f"wrote {args.out} ({args.scale}, seed {args.seed}{', control' if args.control else ''}): "
          f"{summary['videos']} videos, {summary['instances']} instances, "
          f"{summary['proposals_per_video']} proposals/video, background {summary['background_fraction']:.0%}")
    print(f"proposal recall: {summary['recall']}; card: {args.out / 'card.yaml'}")
    return 0


def _add_detect(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a checkpoint written by gcm train: a two-stage model.pt (needs --proposals) or a "
                        "one-stage dssad.pt (reads the features alone)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", type=Path, nargs="+",
                        help="snippet features of the video, one file per stream in the checkpoint's order (rgb "
                             "flow), or one file holding every stream where the dataset's card gives "
                             "snippets.stream_columns")
    source.add_argument("--features-dir", type=Path,
                        help="a folder of many videos' features, laid out as a dataset's (<stream>/<video>.npy, or "
                             "<video>.npy holding every stream): each video is detected, all into one result file")
    p.add_argument("--proposals", type=Path,
                   help="the video's proposals: text with one 'start end [score]' (seconds) per line or its "
                        "BSN/BMN CSV; or a file or folder of many videos' (SSN list, CSV with a video column, "
                        "folder of <video>.csv), of which those of --video-id are used")
    p.add_argument("--out", type=Path, help="ActivityNet result JSON to write (default: print it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--video-id", default=None,
                   help="name of the video in the output (default: the features' stem; not with --features-dir)")
    p.add_argument("--fps", type=at_least(float, 0, strict=True),
                   help="frame rate of the video (default: the checkpoint's snippet layout)")
    p.add_argument("--duration", type=at_least(float, 0, strict=True),
                   help="duration in seconds (default: what the snippets cover; not with --features-dir)")
    p.add_argument("--video-info", type=Path,
                   help="each video's duration and frame rate, looked up by its id: a video-info file (BSN's "
                        "video_info_new.csv, TH14_video_info.json, ...) or an annotation file; needed for features "
                        "rescaled to a fixed number of positions (ActivityNet), which do not tell a video's length")
    p.add_argument("--skip-bad", action="store_true",
                   help="with --features-dir: leave out the videos whose files fail their checks (named on stderr) "
                        "instead of stopping")
    p.add_argument("--workers", type=at_least(int, 1),
                   help="with --features-dir: detect the folder's videos as this many parallel Ray tasks (default: "
                        "in this process; with --address, the cluster's CPUs)")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (default: a GPU where torch sees one, else the CPU; Ray tasks: "
                        "GPUs where the cluster has them, a quarter of one per task), cpu, cuda, or cuda:N in this "
                        "process")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="inference.KEY=VALUE",
                   help="post-process with this setting in place of the checkpoint's own (nms=soft-nms, top_k, "
                        "nms_threshold, soft_nms_sigma, candidates_per_video, fusion); repeatable")


def _run_detect(args: argparse.Namespace) -> int:
    from gcm_core.data.formats import holds_many_videos, result_json, write_result_json
    from workflows.detect import (
        Detector, detect_in_parallel, detect_videos, folder_videos, read_video_facts, resolve_device, task_gpus,
    )
    from workflows.progress import Progress

    inference = _inference_overrides(args.overrides)
    parallel = args.features_dir and ((args.workers or 1) > 1 or args.address)
    # in this process the model runs here; Ray tasks each load it on their own device
    detector = Detector.load(args.checkpoint, "cpu" if parallel else resolve_device(args.device), inference)
    if detector.one_stage and args.proposals:
        raise ValueError(f"{args.checkpoint} holds a one-stage D-SSAD run, which finds actions in the features "
                         "alone: leave out --proposals")
    if not detector.one_stage and not args.proposals:
        raise ValueError(f"{args.checkpoint} holds a two-stage head, which scores proposals: give --proposals")
    if args.features_dir and (args.video_id or args.duration):
        raise ValueError("--video-id and --duration describe one video: give them with --features")
    if args.features_dir and args.proposals and not holds_many_videos(args.proposals):
        raise ValueError(f"{args.proposals} holds one video's proposals: with --features-dir give a file or folder "
                         "of every video's (SSN list, CSV with a video column, folder of <video>.csv)")
    if (args.workers or args.skip_bad) and not args.features_dir:
        raise ValueError("--workers and --skip-bad are about the videos of a --features-dir folder")
    if args.out and args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists: pass --overwrite to replace it, or another --out")
    videos = (folder_videos(args.features_dir, detector.streams, detector.columns) if args.features_dir
              else [(args.video_id or args.features[0].stem, args.features)])
    facts = read_video_facts(args.video_info) if args.video_info else None
    progress = Progress(len(videos), "videos", "detect: ", stream=sys.stderr) if args.features_dir else None
    if parallel:
        with _session(args):
            gpus = task_gpus(args.device)
            print(f"detect: {len(videos)} videos as Ray tasks on "
                  + (f"GPUs ({gpus:g} of one each)" if gpus else "CPUs"), file=sys.stderr)
            detections, skipped = detect_in_parallel(args.checkpoint, videos, args.proposals, args.fps, facts,
                                                     args.skip_bad, args.workers, progress, gpus, inference)
    else:
        if progress:
            print(f"detect: {len(videos)} videos in this process on {detector.device}", file=sys.stderr)
        detections, skipped = detect_videos(detector, videos, args.proposals, args.fps, args.duration, facts,
                                            args.skip_bad, progress)
    if progress:
        progress.close()
    for reason in skipped.values():
        print(f"skipped: {reason}", file=sys.stderr)
    if len(skipped) == len(videos):
        raise ValueError(f"every one of the {len(videos)} videos of {args.features_dir} failed its checks (above): "
                         "nothing written")
    if args.out:
        write_result_json(args.out, detections)
        which = videos[0][0] if len(videos) == 1 else f"{len(videos) - len(skipped)} videos"
        print(f"wrote {len(detections)} detections of {which} to {args.out}"
              + (f"; skipped {len(skipped)} (above)" if skipped else ""))
    else:
        print(json.dumps(result_json(detections)))
    return 0


def _inference_overrides(pairs: list[str]) -> dict[str, Any]:
    """``gcm detect``'s ``--set inference.KEY=VALUE`` pairs as settings of InferenceConfig."""
    from workflows.config import ConfigError, parse_overrides

    settings = parse_overrides(pairs)
    other = sorted(set(settings) - {"inference"})
    if other or not isinstance(settings.get("inference", {}), dict):
        raise ConfigError(f"gcm detect --set takes inference.KEY=VALUE (its post-processing), got "
                          f"{', '.join(other) or 'inference'}")
    return settings.get("inference", {})


def _add_stage_options(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--config", type=Path, help="YAML file overriding the stage's defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override one setting, dotted keys, YAML values (e.g. --set {example}); repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _stage(cls, args: argparse.Namespace, folder_of: Callable[[Any], Path] | None = None, **explicit):
    """The stage's settings from the command line; with ``--resume``, based on those the run or
    experiment in ``folder_of(settings)`` was started with, changed only where the command says so."""
    from workflows.config import earlier_settings, resolve

    config = resolve(cls, args.config, args.overrides, **explicit)
    if folder_of is not None and config.resume:
        config = resolve(cls, args.config, args.overrides, earlier_settings(folder_of(config), cls), **explicit)
    return config


def _session(args: argparse.Namespace):
    from workflows.config import RayConfig
    from workflows.ray_env import ray_session

    return ray_session(RayConfig(address=args.address))


def _add_preprocess(p: argparse.ArgumentParser) -> None:
    p.add_argument("--card", help="dataset card (name or YAML path)")
    p.add_argument("--data-root", help="folder the card's paths are relative to (default: $GCM_DATA_ROOT)")
    p.add_argument("--out", help="output folder of the shards and manifest")
    p.add_argument("--workers", type=int, help="parallel workers (actors; default: the config's, 2)")
    p.add_argument("--overwrite", action="store_true", default=None, help="redo finished shards")
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="leave out videos that fail their checks (listed in the manifest) instead of stopping")
    _add_stage_options(p, "videos_per_shard=8")


def _run_preprocess(args: argparse.Namespace) -> int:
    from workflows.config import PreprocessConfig
    from workflows.preprocess import run_preprocess

    config = _stage(PreprocessConfig, args, card=args.card, data_root=args.data_root, out=args.out,
                    num_workers=args.workers, overwrite=args.overwrite, skip_bad=args.skip_bad)
    with _session(args):
        manifest = run_preprocess(config, args.quiet)
    counts = ", ".join(f"{role}: {c['videos']} videos, {c['units']} units, {c['edges']} candidate edges"
                       for role, c in manifest["counts"].items())
    print(f"preprocess: wrote {len(manifest['shards'])} shards to {config.out} ({counts}); "
          f"skipped {len(manifest['skipped'])} videos")
    return 0


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="preprocessed dataset folder (gcm preprocess --out)")
    p.add_argument("--card", help="one-stage runs (--set kind=one-stage): read this dataset card's features "
                                  "directly instead of a preprocessed --data (no proposals needed)")
    p.add_argument("--data-root", help="with --card: the folder its paths are relative to (default: $GCM_DATA_ROOT)")
    p.add_argument("--out", help="runs folder")
    p.add_argument("--name", help="run name (a folder under --out)")
    p.add_argument("--workers", type=int, help="data-parallel training workers (default: the config's, 2)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run from its last checkpoint with the settings it was started with (its "
                        "config.yaml; nothing needs repeating), or for more epochs (--set train.epochs=N)")
    _add_stage_options(p, "train.lr=0.01")


def _run_train(args: argparse.Namespace) -> int:
    from workflows.config import TrainStageConfig
    from workflows.train import run_dir, run_train

    config = _stage(TrainStageConfig, args, run_dir, data=args.data, card=args.card, data_root=args.data_root,
                    out=args.out, name=args.name, num_workers=args.workers, resume=args.resume)
    with _session(args):
        result = run_train(config, args.quiet)
    fused = {k: v for k, v in result["metrics"].items() if k.startswith("fused/")}
    headline = ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in fused.items())
    print(f"train {config.name}: checkpoint {result['checkpoint']}" + (f"; fused {headline}" if headline else ""))
    return 0


def _add_evaluate(p: argparse.ArgumentParser) -> None:
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
    _add_stage_options(p, "inference.nms=soft-nms: post-processing other than the checkpoints' own")


def _run_evaluate(args: argparse.Namespace) -> int:
    from workflows.config import EvaluateConfig
    from workflows.evaluate import run_evaluate

    config = _stage(EvaluateConfig, args, checkpoints=args.checkpoint, data=args.data, cards=args.card,
                    data_roots=args.data_root, out=args.out, protocol=args.protocol, tiou=args.tiou,
                    overwrite=args.overwrite)
    with _session(args):
        rows = run_evaluate(config, args.quiet)
    print((Path(config.out) / "summary.md").read_text())
    datasets = len(config.data) + len(config.cards)
    print(f"evaluate: {len(config.checkpoints)} checkpoint(s) x {datasets} dataset(s) = {len(rows)} evaluations; "
          f"summary in {Path(config.out) / 'summary.md'}")
    return 0


def _add_tune(p: argparse.ArgumentParser) -> None:
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
    _add_stage_options(p, "base.train.epochs=10")


def _run_tune(args: argparse.Namespace) -> int:
    from workflows.config import TuneStageConfig
    from workflows.tune import experiment_dir, load_grid, run_tune, trial_name, unreported_metrics

    direct = {k: v for k, v in (("card", args.card), ("data_root", args.data_root)) if v is not None}
    config = _stage(TuneStageConfig, args, experiment_dir, grid=args.grid, data=args.data, out=args.out,
                    resume=args.resume, base=direct or None)
    with _session(args):
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


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("folders", nargs="+", type=Path, help="run, evaluation or tune folders (or folders holding them)")
    p.add_argument("--out", type=Path, help="where REPORT.md and the figures go (default: the first folder)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous report in --out")


def _run_report(args: argparse.Namespace) -> int:
    from workflows.report import write_report

    report = write_report(args.folders, args.out, overwrite=args.overwrite)
    print(f"report: {report}")
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"),
                   help="the demo's folder (recreated on every run; a folder it did not make is refused)")
    p.add_argument("--seed", type=at_least(int, 0), default=0, help="seed of the synthetic data and of training")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _run_demo(args: argparse.Namespace) -> int:
    from workflows.demo import run_demo

    with _session(args):
        run_demo(args.out, args.seed, args.quiet)
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
REGISTRY: dict[str, Command] = {
    "eval-detections": ("score detections against ground truth under an official protocol",
                        _add_eval_detections, _run_eval_detections),
    "preprocess": ("pool unit features and candidate edges of every video into Parquet shards (Ray Data)",
                   _add_preprocess, _run_preprocess),
    "train": ("train SSN+GCM (or a baseline) data-parallel on a preprocessed dataset (Ray Train)",
              _add_train, _run_train),
    "tune": ("run an ablation grid of train + evaluate trials (Ray Tune)", _add_tune, _run_tune),
    "evaluate": ("evaluate checkpoints on datasets in parallel (Ray)", _add_evaluate, _run_evaluate),
    "synth": ("write a synthetic THUMOS'14-like benchmark in the layout of real data", _add_synth, _run_synth),
    "detect": ("detect actions in new videos (one, or a folder of them) with a trained checkpoint", _add_detect,
               _run_detect),
    "report": ("write REPORT.md with paper-style tables and figures from run folders", _add_report, _run_report),
    "demo": ("the main job end to end on a small synthetic benchmark (embedded Ray by default)", _add_demo,
             _run_demo),
}
