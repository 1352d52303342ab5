"""Parallel evaluation: many checkpoints x many preprocessed datasets at once, as Ray tasks.

Each (checkpoint, dataset) pair is one task: inference on every test video without sampling,
detections written as ActivityNet result JSON, mAP under the dataset's protocol (or the one asked
for); the driver gathers one summary table (``summary.md`` and ``summary.csv``).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from gcm_core.checkpoint import load_checkpoint
from gcm_core.data.atomic import atomic_write_text
from gcm_core.data.formats import write_result_json
from gcm_core.engine import UnitDataset, detections_of, evaluate, predict
from workflows.config import EvaluateConfig, dump
from workflows.progress import Progress
from workflows.shards import load_manifest, read_videos
from workflows.tables import markdown_table


def pair_name(checkpoint: str, data: str) -> str:
    """A folder name for one (checkpoint, dataset) pair: run folder and dataset folder names."""
    ckpt = Path(checkpoint)
    label = ckpt.parent.name if ckpt.name == "model.pt" else ckpt.stem
    return f"{label}__{Path(data).name}"


def evaluate_pair(checkpoint: str, data: str, out: str, protocol: str | None,
                  tiou: list[float] | None) -> dict[str, Any]:
    """Evaluate one checkpoint on one preprocessed dataset's test split (runs as a Ray task)."""
    import torch

    torch.set_num_threads(1)
    ckpt = load_checkpoint(checkpoint)
    manifest = load_manifest(data)
    if list(manifest["classes"]) != list(ckpt.classes):
        raise ValueError(f"{checkpoint} was trained on other classes than dataset {data} "
                         f"({len(ckpt.classes)} vs {len(manifest['classes'])})")
    videos = read_videos(data, "test", manifest)
    comp = ckpt.model_config.comp_input if ckpt.model_config.detector == "ssn" else None
    per_stream = {s: predict(head, UnitDataset(videos, s, ckpt.graph, comp), ckpt.stats)
                  for s, head in ckpt.heads.items()}
    detections = detections_of(videos, per_stream, ckpt.classes, ckpt.inference)
    protocol = protocol or manifest["protocol"]
    thresholds = tiou or manifest["tiou"]
    result = evaluate(videos, detections, ckpt.classes, protocol, thresholds)
    folder = Path(out) / pair_name(checkpoint, data)
    write_result_json(folder / "detections.json", detections)
    summary = result.as_dict(ckpt.classes)
    atomic_write_text(folder / "metrics.json", json.dumps(summary, indent=1))
    return {"checkpoint": checkpoint, "data": data, "videos": len(videos), "protocol": protocol,
            "tiou": list(thresholds), "mAP": summary["mAP"], "average": summary["average"],
            "detections": str(folder / "detections.json")}


def run_evaluate(config: EvaluateConfig, quiet: bool = False) -> list[dict[str, Any]]:
    """Every checkpoint on every dataset, in parallel on the connected Ray; writes the summary."""
    import ray

    if not config.checkpoints or not config.data:
        raise ValueError("give at least one --checkpoint and one --data (a preprocessed dataset)")
    task = ray.remote(num_cpus=1)(evaluate_pair)
    pending = {task.remote(c, d, config.out, config.protocol, list(config.tiou) if config.tiou else None): (c, d)
               for c in config.checkpoints for d in config.data}
    progress = Progress(len(pending), "evaluations", "evaluate: ", quiet)
    rows = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        pending.pop(done[0])
        rows.append(ray.get(done[0]))
        progress.update()
    progress.close()
    rows.sort(key=lambda r: (r["data"], r["checkpoint"]))
    out = Path(config.out)
    atomic_write_text(out / "summary.md", summary_markdown(rows))
    atomic_write_text(out / "summary.csv", summary_csv(rows))
    atomic_write_text(out / "config.yaml", dump(config))
    return rows


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    blocks = []
    for key in sorted({(r["data"], r["protocol"], tuple(r["tiou"])) for r in rows}):
        data, protocol, tiou = key
        mine = [r for r in rows if (r["data"], r["protocol"], tuple(r["tiou"])) == key]
        headers = ["checkpoint", *(f"mAP@{t:g}" for t in tiou), "average"]
        table = markdown_table(headers, [[r["checkpoint"], *r["mAP"], r["average"]] for r in mine])
        blocks.append(f"### {data} (protocol {protocol}, {mine[0]['videos']} test videos, mAP %)\n\n{table}\n")
    return "\n".join(blocks)


def summary_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["checkpoint", "data", "protocol", "tiou", "mAP", "average"])
    for r in rows:
        writer.writerow([r["checkpoint"], r["data"], r["protocol"], " ".join(f"{t:g}" for t in r["tiou"]),
                         " ".join(f"{m:.2f}" for m in r["mAP"]), f"{r['average']:.2f}"])
    return buffer.getvalue()
