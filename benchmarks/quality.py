"""Detection quality on the synthetic benchmark: GCM against its baselines and ablations.

    python benchmarks/quality.py [--scale small|medium|full] [--seeds 3] [--json] [--out DIR]
                                 [--settings ssn+gcm ssn+mlp ...] [--streams rgb flow] [--threads N]
                                 [--class-agnostic] [--dssad-epochs 10] [--dssad-semantic extent]
                                 [--relation NAME=VALUE ...]

For each seed s: writes the synthetic benchmark (seed s) and its relation-free control (every
relation knob at 0), prepares the videos in-process (pooling, candidate edges, labels), trains each
setting on both streams (seeded with s), fuses RGB : Flow = 2 : 3 and evaluates the test split with
the THUMOS'14 protocol. ``--streams flow`` trains and evaluates one stream alone (the paper's
ablations report RGB and Flow apart); ``--threads`` fixes torch's CPU threads, since the order
of float sums, and so a run's result, depends on it; ``--class-agnostic`` adds the AP@0.5 with
every class merged (:func:`gcm_core.evaluation.class_agnostic`: how much of the mAP a detector
loses to its class labels). Prints a table of mean and std over seeds (mAP %, tIoU 0.1-0.5), the
checks of issue 4 and the time taken; ``--json`` prints one JSON object {setting: {"mAP@0.5",
"std"}}.

Settings: ssn+gcm, ssn+mlp (Table 4), ssn+mp (Table 6), ssn+gcm-no-{contextual,surrounding,
semantic} (Table 9), control:ssn+gcm, control:ssn+mlp, dssad, dssad+gcm3 (Table 11, GCM at 3
scales). The SSN recipe below (SGD, lr 0.05 divided by 10 after 30 of 40 epochs, 24 sampled units
per video, batches of 16 videos) replaces the paper's (lr 0.01 / 0.001, 45 epochs, batches of 32),
to fit the CPU budget; D-SSAD trains with gcm-tal's one-stage default
(:func:`gcm_core.one_stage.default_recipe`) cut to 10 epochs (lr / 10 after 7) for the same reason
(``--dssad-epochs 20``, the default's, adds about 4.6 mAP@0.5 to both D-SSAD settings and doubles
their time). ``--dssad-semantic receptive-field`` takes the D-SSAD GCMs' semantic neighbours among
the cells beyond each cell's receptive field (``DSSADConfig.semantic_disjoint``; default: among all
other cells, Eq. 6 read on the cells' extents). Every setting of a kind gets the same recipe.
``--relation shared_look=1.0`` sets one of the card's relation knobs
(:class:`gcm_core.data.synthetic.Relations`) for the benchmark; the control keeps every knob at 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from gcm_core.data.atomic import atomic_write_text
from gcm_core.data.cards import load_card
from gcm_core.data.dataset import DatasetSource
from gcm_core.data.model import Detections
from gcm_core.data.prepared import prepare_video
from gcm_core.data.sampling import SamplingConfig
from gcm_core.data.synthetic import Relations, generate_dataset
from gcm_core.detectors import ModelConfig
from gcm_core.detectors.dssad import DSSAD, DSSADConfig
from gcm_core.engine import TrainConfig, UnitDataset, detections_of, fit, ground_truth, predict, seed_everything
from gcm_core.evaluation import AGNOSTIC, class_agnostic, evaluate_detections
from gcm_core import one_stage
from gcm_core.graph import EDGE_TYPES, GraphSpec

TIOU = [0.1, 0.2, 0.3, 0.4, 0.5]
AT_05 = TIOU.index(0.5)   # the column of the checks
RECIPE = dict(epochs=40, optimizer="sgd", lr=0.05, batch_videos=16, lr_step_epochs=30,
              sampling=SamplingConfig(per_video=24))


def without(edge: str) -> GraphSpec:
    return GraphSpec(edge_types=tuple(t for t in EDGE_TYPES if t != edge))


SSN = {
    "ssn+gcm": (ModelConfig(), GraphSpec()),
    "ssn+mlp": (ModelConfig(act_module="mlp", comp_module="mlp"), GraphSpec()),
    "ssn+mp": (ModelConfig(act_module="mp", comp_module="mp"), GraphSpec()),
    "ssn+gcm-no-contextual": (ModelConfig(), without("contextual")),
    "ssn+gcm-no-surrounding": (ModelConfig(), without("surrounding")),
    "ssn+gcm-no-semantic": (ModelConfig(), without("semantic")),
    "control:ssn+gcm": (ModelConfig(), GraphSpec()),
    "control:ssn+mlp": (ModelConfig(act_module="mlp", comp_module="mlp"), GraphSpec()),
}
DSSAD_SETTINGS = {"dssad": (), "dssad+gcm3": (0, 1, 2)}
DSSAD_BUDGET_EPOCHS = 10   # the default recipe's 20 do not fit the CPU budget
SETTINGS = [*SSN, *DSSAD_SETTINGS]


def prepare(root: Path, scale: str, seed: int, control: bool, relations: dict[str, float]) -> dict:
    card = load_card("synthetic")
    card.extra["relations"] = {**card.extra["relations"], **relations}
    generate_dataset(root, card, scale, seed, control=control)
    card = load_card(root / "card.yaml")
    out = {"card": card, "root": root}
    for role in ("train", "test"):
        source = DatasetSource(card, root, role)
        out[role] = [prepare_video(source.load(v), card.classes, role == "train", max_units=card.units_per_video_test)
                     for v in source.video_ids]
    return out


def run_ssn(data: dict, model: ModelConfig, spec: GraphSpec, seed: int, streams: list[str]) -> Detections:
    card = data["card"]
    config = TrainConfig(seed=seed, **RECIPE)
    heads, stats = fit(data["train"], streams, model, spec, config, card.num_classes)
    per_stream = {s: predict(heads[s], UnitDataset(data["test"], s, spec, model.comp_input), stats)
                  for s in streams}
    return detections_of(data["test"], per_stream, card.classes)


def run_dssad(data: dict, scales: tuple[int, ...], seed: int, streams: list[str], epochs: int,
              semantic_disjoint: str, weighting: str) -> Detections:
    """D-SSAD (+ GCM at ``scales``) trained ``epochs`` epochs, the default recipe's schedule scaled
    to them (lr / 10 after 70% of them)."""
    card = data["card"]
    recipe = one_stage.default_recipe()
    step = round(recipe.lr_step_epochs * epochs / recipe.epochs)
    config = replace(recipe, seed=seed, epochs=epochs, lr_step_epochs=step)
    train, _ = one_stage.dataset_clips(DatasetSource(card, data["root"], "train"), streams)
    tests, durations = one_stage.dataset_clips(DatasetSource(card, data["root"], "test"), streams)
    models = {}
    for stream in streams:
        seed_everything(seed)
        models[stream] = DSSAD(DSSADConfig(gcm_scales=scales, semantic_disjoint=semantic_disjoint, weighting=weighting),
                               train[stream][0].features.shape[1], card.num_classes)
        one_stage.fit(models[stream], train[stream], config)
    return one_stage.predict_fused(models, tests, durations, card.classes, dict(card.stream_fusion))


def score(data: dict, detections: Detections, agnostic: bool) -> list[float]:
    """mAP (%) of the test split at each of TIOU, then, with ``agnostic``, the class-agnostic AP@0.5."""
    truth = ground_truth(data["test"], data["card"].classes)
    out = [100 * v for v in evaluate_detections(truth, detections, data["card"].classes, "thumos14", TIOU).map.tolist()]
    if agnostic:
        out.append(100 * evaluate_detections(*class_agnostic(truth, detections), [AGNOSTIC], "thumos14", [0.5]).map.item())
    return out


def relation_overrides(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, float]:
    """``--relation NAME=VALUE`` pairs as {knob: value}; an unknown knob or a value that is not a
    number stops the command with argparse's usage error."""
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in Relations.__dataclass_fields__:
            parser.error(f"--relation {pair}: no relation knob {name!r} (knobs: {', '.join(Relations.__dataclass_fields__)})")
        try:
            out[name] = float(value)
        except ValueError:
            parser.error(f"--relation {pair}: {value!r} is not a number")
    return out


def checks(per_seed: dict[str, list[float]]) -> list[tuple[str, bool]]:
    """Issue 4's checks on the mean mAP@0.5 of each setting over seeds (``per_seed``: setting ->
    one mAP@0.5 per seed); each comparison also lists its difference seed by seed."""
    mean = {s: statistics.mean(v) for s, v in per_seed.items()}

    def diff(a: str, b: str) -> str:
        gaps = ", ".join(f"{x - y:+.2f}" for x, y in zip(per_seed[a], per_seed[b]))
        return f"{mean[a] - mean[b]:+.2f} (per seed {gaps})"

    out = []
    if {"ssn+gcm", "ssn+mlp"} <= mean.keys():
        out.append((f"SSN+GCM - SSN+MLP = {diff('ssn+gcm', 'ssn+mlp')} >= 3.0",
                    mean["ssn+gcm"] - mean["ssn+mlp"] >= 3.0))
    for edge in EDGE_TYPES:
        key = f"ssn+gcm-no-{edge}"
        if {key, "ssn+gcm"} <= mean.keys():
            out.append((f"removing {edge} edges: {diff(key, 'ssn+gcm')} < 0", mean[key] < mean["ssn+gcm"]))
    if {"ssn+mp", "ssn+gcm"} <= mean.keys():
        out.append((f"GCM - mean pooling = {diff('ssn+gcm', 'ssn+mp')} > 0", mean["ssn+gcm"] > mean["ssn+mp"]))
    if {"control:ssn+gcm", "control:ssn+mlp"} <= mean.keys():
        gain = mean["control:ssn+gcm"] - mean["control:ssn+mlp"]
        out.append((f"control: GCM - MLP = {diff('control:ssn+gcm', 'control:ssn+mlp')} <= 0.5", gain <= 0.5))
    if {"dssad", "dssad+gcm3"} <= mean.keys():
        out.append((f"D-SSAD+GCM(3 scales) - D-SSAD = {diff('dssad+gcm3', 'dssad')} > 0",
                    mean["dssad+gcm3"] > mean["dssad"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="medium", choices=["small", "medium", "full"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    parser.add_argument("--streams", nargs="+", default=["rgb", "flow"], choices=["rgb", "flow"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--dssad-epochs", type=int, default=DSSAD_BUDGET_EPOCHS,
                        help="D-SSAD's training epochs, lr / 10 after 70%% of them (default: 10, the CPU budget; "
                             "gcm-tal's one-stage default trains 20)")
    parser.add_argument("--dssad-semantic", default="extent", choices=["extent", "receptive-field"],
                        help="where D-SSAD's GCMs take a cell's semantic neighbours (DSSADConfig.semantic_disjoint)")
    parser.add_argument("--dssad-weighting", default="cos", choices=["cos", "embed-cos", "binary"],
                        help="D-SSAD's GCMs' edge weights (DSSADConfig.weighting; Table 7's variants)")
    parser.add_argument("--class-agnostic", action="store_true",
                        help="add a column: the AP@0.5 with every class merged (what finding and delimiting "
                             "actions alone achieves)")
    parser.add_argument("--relation", action="append", default=[], metavar="NAME=VALUE",
                        help="set one of the synthetic card's relation knobs (e.g. shared_look=1.0); repeatable")
    args = parser.parse_args()
    relations = relation_overrides(parser, args.relation)
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    results: dict[str, list[list[float]]] = {s: [] for s in args.settings}
    for seed in range(args.seeds):
        datasets = {}
        for control in (False, True):
            if any(s.startswith("control:") == control for s in args.settings):
                datasets[control] = prepare(args.out / f"data-{'control' if control else 'relations'}-{seed}",
                                            args.scale, seed, control, relations)
        for setting in args.settings:
            t0 = time.perf_counter()
            data = datasets[setting.startswith("control:")]
            if setting in SSN:
                dets = run_ssn(data, *SSN[setting], seed, args.streams)
            else:
                dets = run_dssad(data, DSSAD_SETTINGS[setting], seed, args.streams, args.dssad_epochs,
                                 args.dssad_semantic, args.dssad_weighting)
            maps = score(data, dets, args.class_agnostic)
            results[setting].append(maps)
            print(f"seed {seed} {setting:24s} mAP@0.5 {maps[AT_05]:6.2f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    minutes = (time.perf_counter() - began) / 60
    summary = {s: {"mAP@0.5": statistics.mean(r[AT_05] for r in runs),
                   "std": statistics.stdev(r[AT_05] for r in runs) if len(runs) > 1 else 0.0} for s, runs in results.items()}
    streams = "RGB + Flow fused 2:3" if len(args.streams) > 1 else f"{args.streams[0]} stream alone"
    columns = [f"mAP@{t}" for t in TIOU] + (["class-agnostic AP@0.5"] if args.class_agnostic else [])
    lines = [f"Synthetic benchmark ({args.scale}), THUMOS'14 protocol, {streams}, {args.seeds} seeds "
             f"(mean +- std, mAP %), `python benchmarks/quality.py {' '.join(sys.argv[1:])}`, "
             f"{minutes:.0f} min on this machine:", "",
             "| setting | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for setting, runs in results.items():
        cells = [f"{statistics.mean(col):.2f} +- {statistics.stdev(col) if len(col) > 1 else 0:.2f}"
                 for col in zip(*runs)]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    lines += ["", *[f"- [{'PASS' if ok else 'FAIL'}] {text}" for text, ok in
                    checks({s: [r[AT_05] for r in runs] for s, runs in results.items()})]]
    atomic_write_text(args.out / "quality.md", "\n".join(lines) + "\n")
    atomic_write_text(args.out / "quality.json", json.dumps(summary, indent=1))
    print(json.dumps(summary) if args.json else "\n".join(lines))


if __name__ == "__main__":
    main()
