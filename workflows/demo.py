"""`gcm demo`: the main job end to end on the small synthetic benchmark, on the connected Ray.

synthetic data -> preprocess (Ray Data) -> train SSN+GCM and SSN+MLP (Ray Train, 2 workers) ->
evaluate both in parallel -> a results table (printed and written to ``<out>/results.md``) ->
the report (``<out>/REPORT.md``). Each stage's time is printed. The folder is the demo's own and
is recreated on every run; a folder that a demo did not make is refused, never emptied.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

from gcm_core.data.atomic import atomic_write_text
from gcm_core.data.cards import load_card
from gcm_core.data.synthetic import generate_dataset
from workflows.config import EvaluateConfig, PreprocessConfig, TrainStageConfig
from workflows.evaluate import run_evaluate
from workflows.preprocess import run_preprocess
from workflows.ray_env import refuse_ray_client
from workflows.settings import from_dict
from workflows.tables import markdown_table
from workflows.train import run_train

# The paper's optimiser settings need ~45 epochs of 200 videos; the demo's 48 videos get a higher
# rate and smaller batches so that a couple of minutes of CPU training shows the effect of GCM.
DEMO_TRAINING = {"epochs": 20, "lr": 0.05, "batch_videos": 8, "lr_step_epochs": 15, "sampling": {"per_video": 16}}
MODELS = {"ssn-gcm": {"act_module": "gcm", "comp_module": "gcm"},
          "ssn-mlp": {"act_module": "mlp", "comp_module": "mlp"}}


# written first into the demo's folder: what a later demo may delete
MARK = ".gcm-demo"


def claim_folder(out: Path) -> None:
    """An empty ``out`` for a new demo: a missing or empty folder, or one an earlier demo made
    (``MARK``), emptied; any other folder is refused (``gcm demo --out runs`` must not delete runs)."""
    if out.exists():
        if not (out.is_dir() and ((out / MARK).is_file() or not any(out.iterdir()))):
            raise FileExistsError(f"{out} exists and is not a folder an earlier gcm demo made (no {MARK} in it): "
                                  "the demo recreates its folder, so give it a new --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARK).write_text("made by gcm demo, which recreates this folder on every run\n")


def run_demo(out: str | Path = "runs/demo", seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    refuse_ray_client("demo")   # before its folder is emptied: its preprocessing could not run
    out = Path(out)
    claim_folder(out)
    timings: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        if not quiet:
            print(f"== {name}", flush=True)
        value = fn()
        timings[name] = time.perf_counter() - began
        if not quiet:
            print(f"   {name} took {timings[name]:.1f} s", flush=True)
        return value

    stage("synthetic data (small)", lambda: generate_dataset(out / "data", load_card("synthetic"), "small", seed))
    prep = PreprocessConfig(card=str(out / "data" / "card.yaml"), data_root=str(out / "data"), out=str(out / "prep"))
    stage("preprocess (Ray Data)", lambda: run_preprocess(prep, quiet))
    runs = {}
    for name, model in MODELS.items():
        config = from_dict(TrainStageConfig, {"data": prep.out, "out": str(out), "name": name, "num_workers": 2,
                                              "stream_lr": {}, "model": model, "evaluate_every": 5,
                                              "train": {**DEMO_TRAINING, "seed": seed}})
        runs[name] = stage(f"train {name} (Ray Train, 2 workers)", lambda c=config: run_train(c, quiet))
    evaluation = EvaluateConfig(checkpoints=tuple(r["checkpoint"] for r in runs.values()), data=(prep.out,),
                                out=str(out / "eval"))
    rows = stage("evaluate (parallel Ray tasks)", lambda: run_evaluate(evaluation, quiet))
    table = results_table(rows)
    atomic_write_text(out / "results.md", table)
    report = stage("report", lambda: _report(out))
    if not quiet:
        print("\n" + table)
        print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
              + f"; total {sum(timings.values()):.0f} s")
        print(f"report: {report}")
    return {"rows": rows, "timings": timings, "report": str(report)}


def results_table(rows: list[dict[str, Any]]) -> str:
    """The demo's table: mAP per tIoU for each model on the synthetic test split."""
    tiou = rows[0]["tiou"]
    body = [[Path(r["checkpoint"]).parent.name, *r["mAP"], r["average"]] for r in rows]
    return (f"Small synthetic benchmark, test split ({rows[0]['videos']} videos), protocol {rows[0]['protocol']}, "
            "RGB + Flow fused 2:3, mAP (%), produced by `gcm demo`:\n\n"
            + markdown_table(["model", *(f"mAP@{t:g}" for t in tiou), "average"], body) + "\n")


def _report(out: Path) -> Path:
    from workflows.report import write_report

    return write_report([out / name for name in MODELS] + [out / "eval"], out)
