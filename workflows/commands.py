"""The subcommands of ``gcm``: their arguments and the stage each one calls."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from workflows.tables import markdown_table


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
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _run_eval_detections(args: argparse.Namespace) -> int:
    from gcm_core.data.cards import load_card
    from gcm_core.data.formats import read_annotations, read_detections
    from gcm_core.evaluation import evaluate_detections, select_subset
    from gcm_core.metrics import ACTIVITYNET_TIOU, THUMOS14_TIOU

    thumos_inputs = args.protocol == "thumos14" or args.detections.suffix != ".json"
    card = load_card(args.card or "thumos14") if (args.card or thumos_inputs) else None
    videos = read_annotations(args.ground_truth, card)
    subset = args.subset
    if subset is None and len({v.subset for v in videos.values()}) > 1:
        if card is None:
            raise ValueError(f"{args.ground_truth} holds several subsets: choose one with --subset")
        subset = card.subsets["test"]
    videos = select_subset(videos, subset)
    detections = read_detections(args.detections, card, args.label_convention)
    classes = card.classes if card else sorted({i.label for v in videos.values() for i in v.instances})
    tiou = args.tiou or (card.tiou if card else (THUMOS14_TIOU if args.protocol == "thumos14" else ACTIVITYNET_TIOU))
    result = evaluate_detections(videos, detections, classes, args.protocol, tiou)
    if args.json:
        print(json.dumps(result.as_dict(classes)))
        return 0
    summary = result.as_dict(classes)
    n_inst = sum(len(v.instances) for v in videos.values())
    print(f"protocol {args.protocol}: {len(videos)} videos{f' ({subset})' if subset else ''}, "
          f"{n_inst} instances, {len(detections)} detections")
    headers = ["tIoU", *(f"{t:g}" for t in tiou), "average"]
    print(markdown_table(headers, [["mAP (%)", *summary["mAP"], summary["average"]]]))
    return 0


def _add_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--card", default="synthetic", help="synthetic dataset card (name or YAML path)")
    p.add_argument("--out", type=Path, help="output folder (the layout of real data)")
    p.add_argument("--seed", type=int, default=0)
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


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shared-data", type=Path, default=Path("../shared/data"),
                   help="folder holding the real THUMOS'14 files (thumos14/...)")


def _run_demo(args: argparse.Namespace) -> int:
    root = args.shared_data / "thumos14"
    print("gcm demo: the Ray pipeline (synthetic data -> preprocess -> train -> evaluate) is not built yet;")
    print("meanwhile, the evaluation of the real CBR detections on THUMOS'14 test (official protocol):")
    for t in (0.1, 0.2, 0.3, 0.4, 0.5):
        _run_eval_detections(argparse.Namespace(
            protocol="thumos14", ground_truth=root / "annotations/temporal_annotations_test",
            detections=root / f"results/CBR/CBR_THUMOS-14_IoU{t}.txt", tiou=[t], card=None, subset=None,
            label_convention="official", json=False))
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
REGISTRY: dict[str, Command] = {
    "eval-detections": ("score detections against ground truth under an official protocol",
                        _add_eval_detections, _run_eval_detections),
    "synth": ("write a synthetic THUMOS'14-like benchmark in the layout of real data", _add_synth, _run_synth),
    "demo": ("run the main job end to end on the embedded default", _add_demo, _run_demo),
}
