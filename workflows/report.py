"""`gcm report RUN_DIR...`: REPORT.md and PNG figures from what the stages wrote.

Reads training runs (config.yaml, metrics.json, detections.json, progress.jsonl), evaluation
folders (summary.csv) and Tune experiments (<grid>.csv), and the dataset they used (preprocessed,
or for one-stage runs read directly: then without unit graph and proposal recall), and writes,
beside REPORT.md:

- the paper's tables with this run's numbers (Table 1-style mAP per tIoU and method; each grid's
  table: Tables 4 / 6 / 9 / 10 ...), each stating dataset, protocol, streams and command;
- ``map_vs_tiou.png`` (one line per method), ``ablation_<grid>.png`` (bars, baseline marked),
  ``timeline_<video>.png`` (ground truth and each method's detections, as the paper's Figs. 5-6),
  ``graph_unit.png`` (the graph around one unit, as Fig. 3), ``ar_an.png`` (proposal AR@AN) and
  ``training_<run>.png`` (losses per epoch, and the test mAP where the run evaluated).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import torch  # noqa: E402

from gcm_core.data.atomic import atomic_write, atomic_write_text  # noqa: E402
from gcm_core.data.formats import read_detections  # noqa: E402
from gcm_core.data.cards import load_card  # noqa: E402
from gcm_core.data.dataset import DatasetSource  # noqa: E402
from gcm_core.data.model import Video, video_key  # noqa: E402
from gcm_core.data.prepared import PreparedVideo  # noqa: E402
from gcm_core.data.yamlio import read_yaml  # noqa: E402
from gcm_core.graph import EDGE_TYPES, GraphSpec  # noqa: E402
from gcm_core.metrics import Segments, average_recall  # noqa: E402
from workflows.progress import epoch_history, read_epoch_log  # noqa: E402
from workflows.shards import load_manifest, read_videos  # noqa: E402
from workflows.tables import markdown_table  # noqa: E402

COLOURS = {"contextual": "#0072B2", "surrounding": "#E69F00", "semantic": "#009E73"}  # colour-blind safe
PALETTE = plt.get_cmap("tab10")


@dataclass
class Run:
    """A training run folder."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    progress: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        if self.config.get("kind") == "one-stage":
            scales = self.config.get("one_stage", {}).get("model", {}).get("gcm_scales", [])
            return f"{self.name} (D-SSAD{f', GCM at {len(scales)} scales' if scales else ''})"
        model = self.config.get("model", {})
        return f"{self.name} ({model.get('act_module', '?')}/{model.get('comp_module', '?')})"


def discover(folders: list[Path]) -> dict[str, list]:
    """Runs, evaluation summaries and grid tables found in (or directly under) ``folders``."""
    found: dict[str, list] = {"runs": [], "evaluations": [], "grids": []}
    candidates = []
    for folder in folders:
        candidates += [folder, *sorted(p for p in folder.glob("*") if p.is_dir())]
    for folder in dict.fromkeys(candidates):
        if (folder / "metrics.json").is_file() and (folder / "config.yaml").is_file():
            found["runs"].append(Run(folder, read_yaml(folder / "config.yaml"),
                                     json.loads((folder / "metrics.json").read_text()),
                                     epoch_history(read_epoch_log(folder / "progress.jsonl"))))
        if (folder / "summary.csv").is_file():
            found["evaluations"].append(folder)
        for table in folder.glob("*.csv"):
            if (folder / f"{table.stem}.md").is_file() and table.name != "summary.csv":
                found["grids"].append(table)
    return found


def _why_nothing(folder: Path) -> str:
    weights = [folder / name for name in ("model.pt", "dssad.pt") if (folder / name).is_file()]
    if weights and (folder / "config.yaml").is_file():  # a run whose test split was never scored
        return (f"the run has no test metrics (metrics.json): trained with evaluate: false, or not finished; "
                f"score its checkpoint with `gcm evaluate --checkpoint {weights[0]} --data ...` and report the "
                "evaluation folder")
    return ("no finished run (metrics.json and config.yaml), evaluation (summary.csv) or grid table (NAME.csv and "
            "NAME.md) in it or in a folder directly under it")


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_map_vs_tiou(runs: list[Run]) -> Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, run in enumerate(runs):
        fused = run.metrics["fused"]
        ax.plot(fused["tiou"], fused["mAP"], marker="o", color=PALETTE(k % 10), label=run.label)
    ax.set_xlabel("tIoU threshold")
    ax.set_ylabel("mAP (%)")
    ax.set_title(f"mAP against tIoU (fused streams, {runs[0].metrics['fused']['protocol']} protocol)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_training(run: Run) -> Figure:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    epochs = [p["epoch"] for p in run.progress]
    for key in sorted(k for k in run.progress[0] if k.startswith("loss_")):
        ax.plot(epochs, [p[key] for p in run.progress], label=key[5:])
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("loss (sum over streams)")
    ax.set_title(f"Training: {run.name}")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    tested = [p for p in run.progress if "fused/mAP@0.5" in p]   # evaluate_every, and the last epoch
    if len(tested) > 1:
        right = ax.twinx()
        right.plot([p["epoch"] for p in tested], [p["fused/mAP@0.5"] for p in tested], "ko--", label="test mAP@0.5")
        right.set_ylabel("test mAP@0.5 (%, fused)")
        right.legend(fontsize=8, loc="upper right")
    return fig


def read_grid(table: Path) -> tuple[list[str], list[list[str]]]:
    with table.open() as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def plot_ablation(table: Path) -> Figure:
    """Bars of the table's last metric, one per trial (with several seeds: the mean, the standard
    deviation as an error bar), the first trial marked as the baseline."""
    header, rows = read_grid(table)
    number = lambda text: float(text) if text not in ("", "nan") else 0.0  # noqa: E731
    metric_cols = [k for k, h in enumerate(header) if ("/" in h or h.startswith("seconds")) and not h.startswith("std ")]
    metric = metric_cols[-1] if metric_cols else len(header) - 2
    names = [" / ".join(r[:min(metric_cols or [1])]) for r in rows]
    values = [number(r[metric]) for r in rows]
    spread = f"std {header[metric]}"
    errors = [number(r[header.index(spread)]) for r in rows] if spread in header else None
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(rows) + 2), 4.2))
    bars = ax.bar(range(len(rows)), values, yerr=errors, capsize=3,
                  color=[PALETTE(1)] + [PALETTE(0)] * (len(rows) - 1))
    ax.axhline(values[0], color="black", linestyle="--", linewidth=1, label=f"baseline: {names[0]}")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(header[metric] + (" (%)" if "mAP" in header[metric] else ""))
    ax.set_title(f"Ablation {table.stem}")
    ax.legend(fontsize=8)
    return fig


def plot_timeline(video: Video, detections: dict[str, Any], top: int = 8) -> Figure:
    """Ground truth and each method's best detections of one video on a seconds axis."""
    rows = [("ground truth", [(i.start, i.end, i.label, 1.0) for i in video.instances])]
    for name, dets in detections.items():
        mine = sorted((sc, s, e, lab) for v, lab, s, e, sc in zip(dets.video, dets.label, dets.start, dets.end, dets.score)
                      if video_key(v) == video_key(video.id))[::-1][:top]  # result JSON ids are bare
        rows.append((name, [(s, e, lab, sc) for sc, s, e, lab in mine]))
    present = sorted({lab for _, items in rows for _, _, lab, _ in items})
    qualitative = plt.get_cmap("tab10" if len(present) <= 10 else "tab20")
    colour = {lab: qualitative(k % qualitative.N) for k, lab in enumerate(present)}
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.7 * len(rows)))
    for y, (name, items) in enumerate(rows):
        for s, e, lab, sc in items:
            ax.barh(y, e - s, left=s, height=0.6, color=colour[lab], alpha=0.5 + 0.5 * min(1.0, float(sc)),
                    edgecolor="black", linewidth=0.4)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, video.duration)
    ax.set_xlabel("time (s)")
    ax.set_title(f"{video.id}: ground truth and top-{top} detections (opacity = score)")
    handles = [matplotlib.patches.Patch(color=colour[lab], label=lab) for lab in present]
    ax.legend(handles=handles, title="class", fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_unit_graph(video: PreparedVideo, stream: str, spec: GraphSpec) -> tuple[Figure, dict[str, int]]:
    """The unit best matching an instance and its neighbours by edge type, weights written on them;
    also which unit that is and how many neighbours it has."""
    graph = video.graph(stream, spec)
    ious = torch.zeros(video.num_units)
    if video.gt.shape[0]:
        from gcm_core.units import pairwise_tiou
        ious = pairwise_tiou(video.intervals, video.gt).max(dim=1).values
    src, dst = graph.edge_index
    has_all = [i for i in range(video.num_units) if all(bool(graph.has_type(t)[src == i].any()) for t in EDGE_TYPES)]
    centre = max(has_all or range(video.num_units), key=lambda i: float(ious[i]))
    mine = (src == centre).nonzero().squeeze(1)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.35 * (mine.numel() + 1)))
    s, e = video.intervals[centre].tolist()
    ax.barh(0, e - s, left=s, height=0.6, color="black", label="the unit")
    for row, k in enumerate(mine.tolist(), start=1):
        j = int(dst[k])
        kinds = [t for t in EDGE_TYPES if bool(graph.has_type(t)[k])]
        a, b = video.intervals[j].tolist()
        ax.barh(row, b - a, left=a, height=0.6, color=COLOURS[kinds[0]], label=kinds[0])
        ax.text(b, row, f"  {'+'.join(kinds)}, A={float(graph.weight[k]):.2f}", va="center", fontsize=7)
    for (gs, ge) in video.gt.tolist():
        ax.axvspan(gs, ge, color="grey", alpha=0.15)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="lower right")
    ax.set_yticks([])
    ax.invert_yaxis()
    ax.set_xlabel("time (s); grey: ground-truth instances")
    ax.set_title(f"Graph around unit {centre} of {video.video_id} ({stream} features; A = edge weight, Eq. 8)")
    return fig, {"unit": centre, "neighbours": int(mine.numel())}


def plot_ar_an(videos: list[PreparedVideo],
               an_values: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200)) -> tuple[Figure, torch.Tensor]:
    """AR@AN of the videos' test units in their order (best-scored first, or the list's where it
    gives no scores), and the recall [tIoU, AN] it is drawn from."""
    gt = [(k, 0, s, e) for k, v in enumerate(videos) for s, e in v.gt.tolist()]
    props = [(k, 0, s, e, -r) for k, v in enumerate(videos) for r, (s, e) in enumerate(v.intervals.tolist())]
    recall = average_recall(Segments(*zip(*gt)), Segments(*zip(*props)), list(an_values))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(an_values, (100 * recall.mean(0)).tolist(), marker="o", label="AR (tIoU 0.5:0.05:0.95)")
    ax.plot(an_values, (100 * recall[0]).tolist(), marker="s", linestyle="--", label="recall at tIoU 0.5")
    ax.set_xscale("log")
    ax.set_xlabel("average number of proposals per video (AN)")
    ax.set_ylabel("recall (%)")
    ax.set_title("Proposal quality on the test split (ActivityNet AR@AN protocol)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig, recall


def write_report(folders: list[Path | str], out: Path | str | None = None, videos_to_show: int = 2,
                 overwrite: bool = False) -> Path:
    """Write REPORT.md and the figures into ``out`` (default: the first folder); return REPORT.md.
    A previous report there is replaced only with ``overwrite``."""
    folders = [Path(f) for f in folders]
    out = Path(out or folders[0])
    if (out / "REPORT.md").exists() and not overwrite:
        raise FileExistsError(f"{out} holds a previous report: pass --overwrite to replace it, or another --out")
    missing = [folder for folder in folders if not folder.is_dir()]
    if missing:
        raise FileNotFoundError(f"no folder {missing[0]}")
    found = discover(folders)
    located = [run.path for run in found["runs"]] + found["evaluations"] + [t.parent for t in found["grids"]]
    for folder in folders:  # a mistyped or unfinished folder would otherwise just be missing from the report
        if not any(folder in (place, place.parent) for place in located):
            raise FileNotFoundError(f"nothing to report in {folder}: " + _why_nothing(folder))
    out.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = found["runs"]
    lines = ["# gcm-tal report", "", f"Inputs: {', '.join(str(f) for f in folders)}", ""]
    if runs:
        lines += _runs_section(runs, out)
    for folder in found["evaluations"]:
        lines += ["## Evaluation summary", "", (folder / "summary.md").read_text(), ""]
    for table in found["grids"]:
        _save(plot_ablation(table), out / f"ablation_{table.stem}.png")
        lines += [table.with_suffix(".md").read_text().strip(), "",
                  f"Dataset and protocol: those of {_grid_dataset(table)}; command: "
                  f"`gcm tune {table.stem} ...` (see {table.parent / 'config.yaml'}).", "",
                  f"![ablation {table.stem}](ablation_{table.stem}.png)", ""]
    if runs:
        lines += _data_section(runs, out, videos_to_show)
    report = out / "REPORT.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def _runs_section(runs: list[Run], out: Path) -> list[str]:
    first = runs[0].metrics["fused"]
    tiou = first["tiou"]
    datasets = "; ".join(dict.fromkeys(_dataset(run.config)[0] for run in runs))
    commands = " or ".join(dict.fromkeys(f"`gcm train {_dataset(run.config)[1]} --name NAME`" for run in runs))
    streams = " + ".join(runs[0].config.get("streams", []))
    body = [[run.label, *run.metrics["fused"]["mAP"], run.metrics["fused"]["average"]] for run in runs]
    _save(plot_map_vs_tiou(runs), out / "map_vs_tiou.png")
    lines = ["## Table 1-style results: mAP (%) per tIoU", "",
             f"Dataset: {datasets}, test split; protocol: {first['protocol']}; streams: {streams} "
             f"(late fusion); command: {commands} per row (configs in each run folder).",
             "", markdown_table(["method", *(f"{t:g}" for t in tiou), "average"], body), "",
             "![mAP against tIoU](map_vs_tiou.png)", ""]
    for run in runs:
        if run.progress:
            _save(plot_training(run), out / f"training_{run.name}.png")
            lines += [f"![training of {run.name}](training_{run.name}.png)", ""]
    return lines


def _dataset(config: dict[str, Any]) -> tuple[str, str]:
    """The dataset a training config reads, in words and as ``gcm train``'s arguments."""
    if config.get("card"):
        card, root = config["card"], config.get("data_root")
        return (f"card `{card}` read from `{root}` (one-stage, not preprocessed)",
                f"--set kind=one-stage --card {card} --data-root {root}")
    data = config.get("data", "?")
    return f"preprocessed `{data}`", f"--data {data}"


def _grid_dataset(table: Path) -> str:
    """The dataset of the experiment a grid table comes from, as its config.yaml names it."""
    config = table.parent / "config.yaml"
    if not config.is_file():
        return "the experiment's dataset"
    tune = read_yaml(config)
    return _dataset({**tune.get("base", {}), "data": tune.get("data", "?")})[0]


def _data_section(runs: list[Run], out: Path, count: int) -> list[str]:
    # the units, their graph and proposals come from a two-stage run where there is one
    config = next((run.config for run in runs if run.config.get("kind", "two-stage") == "two-stage"), runs[0].config)
    detections = {run.label: read_detections(run.path / "detections.json") for run in runs
                  if (run.path / "detections.json").is_file()}
    lines = ["## What the detectors found", ""]
    if config.get("card"):  # a one-stage run that read its dataset: annotations, no units
        source = DatasetSource(load_card(config["card"]), config["data_root"], "test")
        for video in sorted(source.videos.values(), key=lambda v: -len(v.instances))[:count]:
            _save(plot_timeline(video, detections), out / f"timeline_{video.id}.png")
            lines += [f"![timeline of {video.id}](timeline_{video.id}.png)", ""]
        return lines + ["The runs read their dataset without proposals, so there is no unit graph (Fig. 3) or "
                        "proposal recall to show.", ""]
    data = Path(config["data"])
    manifest = load_manifest(data)
    videos = read_videos(data, "test", manifest)
    chosen = sorted(videos, key=lambda v: -v.gt.shape[0])[:count]
    for video in chosen:
        _save(plot_timeline(video.as_video(manifest["classes"]), detections), out / f"timeline_{video.video_id}.png")
        lines += [f"![timeline of {video.video_id}](timeline_{video.video_id}.png)", ""]
    spec = GraphSpec(**{k: tuple(v) if k == "edge_types" else v for k, v in config.get("graph", {}).items()})
    stream = manifest["streams"][-1]
    fig, info = plot_unit_graph(chosen[0], stream, spec)
    _save(fig, out / "graph_unit.png")
    lines += ["### The graph around one unit (as the paper's Fig. 3)", "",
              f"Unit {info['unit']} of {chosen[0].video_id} and its {info['neighbours']} neighbours under "
              f"theta_ctx={spec.theta_ctx}, theta_sur={spec.theta_sur}, k_sur={spec.k_sur}, l_sem={spec.l_sem}.", "",
              "![graph around one unit](graph_unit.png)", ""]
    fig, recall = plot_ar_an(videos)
    _save(fig, out / "ar_an.png")
    lines += ["### Proposal quality", "",
              f"AR@100 = {100 * float(recall.mean(0)[6]):.1f}% over tIoU 0.5:0.05:0.95 on {len(videos)} test videos "
              f"(proposals best-scored first, else in list order; `gcm report`).", "", "![AR@AN](ar_an.png)", ""]
    return lines
