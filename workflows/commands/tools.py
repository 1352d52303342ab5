"""The subcommands of ``gcm`` that work on files alone, without a stage's settings or folders:
``eval-detections`` (score a result file), ``synth`` (write a synthetic benchmark) and ``detect``
(new videos with a trained checkpoint)."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workflows.commands.common import at_least, ray_session_of
from workflows.tables import markdown_table

if TYPE_CHECKING:   # the commands import the library where they run, so that `gcm --help` starts fast
    from gcm_core.data.cards import DatasetCard
    from gcm_core.data.model import Detections
    from gcm_core.postprocess import VideoLabels


def add_eval_detections(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--ambiguous", type=Path, metavar="FILE",
                   help="THUMOS'14's Ambiguous segments (Ambiguous_test.txt of its test annotations), for ground "
                        "truth without them (thumos14.json): the protocol scores no detection on them")
    p.add_argument("--label-convention", default="official",
                   choices=["official", "zero_based", "one_based"], help="class indices in THUMOS text")
    p.add_argument("--class-agnostic", action="store_true",
                   help="also the AP with every class merged into one: its gap to the mAP is what classification "
                        "costs the detector")
    p.add_argument("--video-scores", type=Path, metavar="FILE",
                   help="also the mAP with external video-level labels (the paper's 'with video labels'): "
                        "class scores per video, as JSON {\"class\": [names], \"results\": {video: [scores]}} "
                        "(ActivityNet's, as BSN and BMN read them) or as UntrimmedNet's THUMOS'14 .npy ([videos, "
                        "101], row i video_test_{i+1:07d}; read by the thumos14 card's class indices); each "
                        "video keeps the detections of its --video-top best classes, their scores multiplied by "
                        "the class's video score (for a gcm-tal checkpoint, gcm evaluate --video-scores labels "
                        "the units before NMS and the top_k cut, as the paper)")
    p.add_argument("--video-top", type=at_least(int, 1), default=2,
                   help="with --video-scores: the classes each video keeps (default: 2, as the paper)")
    p.add_argument("--per-class", action="store_true",
                   help="also each class's AP per tIoU (in --json output always, as per_class)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run_eval_detections(args: argparse.Namespace) -> int:
    from gcm_core.data.cards import load_card
    from gcm_core.data.formats import add_ambiguous, read_annotations, read_detections
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
    if args.ambiguous:
        add_ambiguous(videos, args.ambiguous)
    elif args.protocol == "thumos14" and card is not None and "ambiguous" in card.paths \
            and not any(v.ambiguous for v in videos.values()):   # the dataset has them, the ground truth not
        print(f"note: {args.ground_truth} gives no Ambiguous segments, on which the THUMOS'14 protocol scores no "
              "detection: detections there count as false positives (give --ambiguous Ambiguous_test.txt, or the "
              "official per-class folder as --ground-truth)", file=sys.stderr)
    detections = read_detections(args.detections, card, args.label_convention)
    classes = card.classes if card else sorted({i.label for v in videos.values() for i in v.instances})
    tiou = args.tiou or (card.tiou if card else (THUMOS14_TIOU if args.protocol == "thumos14" else ACTIVITYNET_TIOU))
    summary = evaluate_detections(videos, detections, classes, args.protocol, tiou).as_dict(classes)
    unmatched = unmatched_detections(videos, detections, classes)
    for note in unmatched.notes(len(classes)):
        print(f"note: {note}", file=sys.stderr)
    agnostic = labelled = None
    if args.class_agnostic:
        merged = class_agnostic(videos, detections)
        agnostic = evaluate_detections(*merged, [AGNOSTIC], args.protocol, tiou).as_dict([AGNOSTIC])
    if args.video_scores:
        rescored = with_video_labels(detections, args.video_scores, args.video_top, classes, card)
        labelled = evaluate_detections(videos, rescored, classes, args.protocol, tiou).as_dict(classes)
    if args.json:
        extra = {"unmatched": unmatched.counts(), **({"class_agnostic": agnostic} if agnostic else {}),
                 **({"video_labels": labelled} if labelled else {})}
        print(json.dumps({**summary, **extra}))
        return 0
    n_inst = sum(len(v.instances) for v in videos.values())
    print(f"protocol {args.protocol}: {len(videos)} videos{f' ({subset})' if subset else ''}, "
          f"{n_inst} instances, {len(detections)} detections")
    headers = ["tIoU", *(f"{t:g}" for t in tiou), "average"]
    rows = [["mAP (%)", *summary["mAP"], summary["average"]]]
    if agnostic:
        rows.append(["class-agnostic AP (%)", *agnostic["mAP"], agnostic["average"]])
    if labelled:
        rows.append([f"mAP with video labels, top {args.video_top} (%)", *labelled["mAP"], labelled["average"]])
    print(markdown_table(headers, rows))
    if args.per_class:   # a class without ground truth here (None) has no AP, nor an average
        print("\n" + markdown_table(["AP (%) of class", *headers[1:]], [
            [name, *aps, None if None in aps else sum(aps) / len(aps)] for name, aps in summary["per_class"].items()]))
    return 0


def with_video_labels(detections: Detections, path: Path, top: int, classes: Sequence[str],
                      card: DatasetCard | None) -> Detections:
    """``detections`` rescored with the external video-level scores in ``path``
    (:func:`~gcm_core.data.detections.read_video_scores`): each video keeps its ``top`` classes'
    detections, scores multiplied by the class's video score. A file that scores none of the
    detections' videos is an error; videos it does not score are named in a note."""
    from gcm_core.data.detections import read_video_scores
    from gcm_core.data.model import video_key
    from gcm_core.postprocess import rescore_with_video_labels

    scores = read_video_scores(path, classes, card)
    detected = set(detections.video)
    unscored = sorted(v for v in detected if video_key(v) not in scores)
    if unscored and len(unscored) == len(detected):
        raise ValueError(f"{path} scores none of the detections' videos (e.g. {unscored[0]}; it "
                         f"scores {min(scores)} to {max(scores)})")
    if unscored:   # rescoring leaves their detections out
        print(f"note: {path} scores no class of {len(unscored)} video(s) of the detections "
              f"(e.g. {unscored[0]}): with video labels they have no detections", file=sys.stderr)
    return rescore_with_video_labels(detections, scores, classes, top)


def add_synth(p: argparse.ArgumentParser) -> None:
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


def run_synth(args: argparse.Namespace) -> int:
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


def add_detect(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--video-scores", type=Path, metavar="FILE",
                   help="external video-level class scores (as gcm evaluate --video-scores): every video's units are "
                        "decoded as its --video-top best classes only, scores times the video's score of the class; "
                        "FILE must score every video detected")
    p.add_argument("--video-top", type=at_least(int, 1), default=2,
                   help="with --video-scores: the classes each video is given (default: 2, as the paper)")
    p.add_argument("--card", help="with --video-scores in UntrimmedNet's THUMOS'14 .npy layout: the dataset card "
                                  "whose official class indices select its columns (thumos14)")


def run_detect(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from gcm_core.data.formats import holds_many_videos, result_json, write_result_json
    from workflows.detect import (
        Detector, detect_in_parallel, detect_videos, folder_videos, read_video_facts, resolve_device, task_gpus,
    )
    from workflows.progress import Progress

    inference = inference_overrides(args.overrides)
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
    labels = video_labels_of(args, detector.model.classes, [video for video, _ in videos])
    detector = replace(detector, video_labels=labels)
    facts = read_video_facts(args.video_info) if args.video_info else None
    progress = Progress(len(videos), "videos", "detect: ", stream=sys.stderr) if args.features_dir else None
    if parallel:
        with ray_session_of(args):
            gpus = task_gpus(args.device)
            print(f"detect: {len(videos)} videos as Ray tasks on "
                  + (f"GPUs ({gpus:g} of one each)" if gpus else "CPUs"), file=sys.stderr)
            detections, skipped = detect_in_parallel(args.checkpoint, videos, args.proposals, args.fps, facts,
                                                     args.skip_bad, args.workers, progress, gpus, inference, labels)
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


def video_labels_of(args: argparse.Namespace, classes: Sequence[str], videos: list[str]) -> VideoLabels | None:
    """``gcm detect``'s external video labels (None without ``--video-scores``), read by the
    checkpoint's classes; a video they do not score is an error before any is detected."""
    from gcm_core.data.cards import load_card
    from gcm_core.data.detections import read_video_scores
    from gcm_core.postprocess import VideoLabels

    if args.card and not args.video_scores:
        raise ValueError("--card selects the columns of --video-scores in UntrimmedNet's .npy layout: give both")
    if not args.video_scores:
        return None
    card = load_card(args.card) if args.card else None
    if card is not None and list(card.classes) != list(classes):
        raise ValueError(f"card {card.name}'s classes are not the checkpoint's ({card.num_classes} vs {len(classes)} "
                         "or in another order): give the card of the dataset the checkpoint was trained on")
    labels = VideoLabels(read_video_scores(args.video_scores, classes, card), args.video_top)
    labels.check_covers(videos, str(args.video_scores), "videos to detect")
    return labels


def inference_overrides(pairs: list[str]) -> dict[str, Any]:
    """``gcm detect``'s ``--set inference.KEY=VALUE`` pairs as settings of InferenceConfig."""
    from workflows.settings import ConfigError, parse_overrides

    settings = parse_overrides(pairs)
    other = sorted(set(settings) - {"inference"})
    if other or not isinstance(settings.get("inference", {}), dict):
        raise ConfigError(f"gcm detect --set takes inference.KEY=VALUE (its post-processing), got "
                          f"{', '.join(other) or 'inference'}")
    return settings.get("inference", {})
