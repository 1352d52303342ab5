"""Ablation grids with Ray Tune: train + evaluate trials over ONE dataset, preprocessed (or, for
one-stage grids, read directly: a card and a data root, no proposals needed).

A grid file (``workflows/grids/*.yaml``) holds ``name`` (the experiment's folder under ``--out``),
``title``, ``base`` (training settings shared by every trial, as in a stage config file), ``grid``
(dotted key -> list of distinct values; the trials are every combination), ``labels`` (dotted
key -> a name for each of its values, for the table and the trials' folders), ``metrics`` (the
table's columns: a test metric ``<stream or fused>/mAP@<tIoU>`` or ``.../mAP_avg``, or an epoch
metric of a run's progress.jsonl such as ``seconds_per_step``) and ``note``. Each trial is a Tune function trainable that runs a
TorchTrainer (the training stage, evaluated on the test split) and reports its metrics through
Ray Train's ``TuneReportCallback``. Thresholds are applied to the stored candidate edges, so no
trial preprocesses anything. An interrupted experiment resumes with ``resume`` without re-running
finished trials, and only with the trials it started with (``trials.json``: a changed grid file,
base or dataset is refused rather than mixed into one table). The result is the grid's table
shaped like the paper's (``<grid>.md`` and ``<grid>.csv`` in the experiment folder). With
``seeds`` N > 1 every setting is trained N times, at the recipe's seed and the N - 1 after it
(trials ``<name>_seed=S``), and the table gives each metric's mean and standard deviation over
the seeds that finished (the CSV: ``std <metric>`` columns and ``seeds``).
"""
from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from gcm_core.data.atomic import atomic_write_text
from gcm_core.data.cards import DatasetCard, shipped_yaml
from gcm_core.data.yamlio import read_yaml
from workflows import GRID_DIR
from workflows.config import (
    TrainStageConfig, TuneStageConfig, check_folder_name, check_output_folder, sets_lr_alone, stage_settings,
    with_card_fusion,
)
from workflows.settings import ConfigError, changed_settings, deep_merge, describe_changes, dump, from_dict, to_dict
from workflows.shards import load_manifest
from workflows.tables import markdown_table
from workflows.train import (
    absolute_inputs, absolute_paths, check_inputs, check_snippet_layout, dataset_of, run_train, training_resources,
)


@dataclass
class Grid:
    name: str
    title: str
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    labels: dict[str, list[str]]
    metrics: list[str]
    note: str = ""

    def trials(self) -> list[dict[str, Any]]:
        """Every combination of the axes: {dotted key: value}."""
        keys = list(self.axes)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.axes[k] for k in keys))]

    def label(self, key: str, value: Any) -> str:
        names = self.labels.get(key)
        return names[self.axes[key].index(value)] if names else _short(value)


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value)) if value else "none"
    return str(value)


def load_grid(name_or_path: str | Path) -> Grid:
    """A grid by shipped name (``table9_edges``) or path."""
    try:
        path = shipped_yaml(name_or_path, GRID_DIR, "grid")
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    try:
        raw = read_yaml(path)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a grid is a mapping with a name and a grid")
    missing = {"name", "grid"} - set(raw)
    if missing:
        raise ConfigError(f"{path}: missing {sorted(missing)}")
    name, metrics = raw["name"], raw.get("metrics") or ["rgb/mAP@0.5", "flow/mAP@0.5", "fused/mAP@0.5"]
    try:
        check_folder_name("name", name)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise ConfigError(f"{path}: metrics must be a list of the names of metrics the trials report")
    axes, labels = raw["grid"], raw.get("labels") or {}
    _check_axes(path, axes, labels)
    grid = Grid(name, raw.get("title", name), raw.get("base") or {}, axes, labels, metrics, raw.get("note", ""))
    _check_trials(path, grid)
    return grid


def _check_axes(path: Path, axes: Any, labels: dict[str, Any]) -> None:
    """Each varied setting gives distinct values, each labelled setting is a varied one, with a
    label for each of its values."""
    if not isinstance(axes, dict) or not axes or not all(isinstance(v, list) and v for v in axes.values()):
        raise ConfigError(f"{path}: grid must give each setting it varies (a dotted key) a non-empty list of values")
    for key, values in axes.items():
        repeated = next((v for k, v in enumerate(values) if v in values[:k]), None)
        if repeated is not None:
            raise ConfigError(f"{path}: {key} gives {repeated!r} twice: two trials would train the same thing")
    for key, names in labels.items():
        if key not in axes:
            raise ConfigError(f"{path}: labels name {key}, which the grid does not vary (it varies {', '.join(axes)})")
        if not isinstance(names, list) or len(names) != len(axes[key]):
            raise ConfigError(f"{path}: labels of {key} must name each of the grid's values of {key}, in order")


def _check_trials(path: Path, grid: Grid) -> None:
    """Before any trial starts: every trial's settings are valid, and no two trials share a folder."""
    folders: dict[str, dict[str, Any]] = {}
    for trial in grid.trials():
        trial_config(TrainStageConfig(), grid, trial)
        folder = trial_name(grid, trial)
        if folder in folders:
            raise ConfigError(f"{path}: the trials {folders[folder]} and {trial} would share the folder trials/{folder}"
                              " (their names are cut at 120 characters, made of the labels or values): give the "
                              "grid's values labels that tell them apart")
        folders[folder] = trial


def trial_config(base: TrainStageConfig, grid: Grid, trial: dict[str, Any]) -> TrainStageConfig:
    """The training stage of one trial: base config, grid base, then the trial's values (a
    ``train.lr`` the grid gives alone trains every stream at that rate: :func:`sets_lr_alone`)."""
    own = copy.deepcopy(grid.base)
    for key, value in trial.items():
        node = own
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    data = deep_merge(to_dict(base), own)
    if sets_lr_alone(own):
        data["stream_lr"] = {}
    return from_dict(TrainStageConfig, data)


def trial_name(grid: Grid, trial: dict[str, Any]) -> str:
    text = "_".join(f"{k.split('.')[-1]}={grid.label(k, v)}" for k, v in trial.items())
    return "".join(c if c.isalnum() or c in "=_-.+@" else "-" for c in text)[:120]


def trial_trainable(resources: dict[str, float], skipped: list[dict[str, str]] | None = None
                    ) -> Callable[[dict[str, Any]], None]:
    """The Tune function trainable of a trial (one training stage, its metrics reported to Tune),
    asking for ``resources``; a one-stage trial leaves out the ``skipped`` videos the grid's own
    check of its dataset found (:func:`workflows.train.run_train`).

    Tune reads a function's resources from an attribute of the function object. A module-level
    function travels to another process by reference, without it: under Ray Client, where Tune
    runs on the cluster, every trial asked for Tune's default of one CPU instead, and on a small
    cluster trials held every CPU while their workers waited for theirs. A function made here
    travels by value, attribute included.
    """
    from ray import tune

    def run_trial(params: dict[str, Any]) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        stage = from_dict(TrainStageConfig, stage_settings(params["stage"]))   # as an experiment resumed holds it
        run_train(stage, quiet=True, callbacks=[TuneReportCallback()], skipped=skipped)

    return tune.with_resources(run_trial, resources)


class TrialProgress:
    """A Tune callback printing finished trials with rate and ETA (created lazily: Tune is imported late)."""

    def __new__(cls, total: int, quiet: bool):
        from ray.tune import Callback

        from workflows.progress import Progress

        class _Printer(Callback):
            def __init__(self) -> None:
                self.progress = Progress(total, "trials", "tune: ", quiet)

            def on_trial_complete(self, iteration, trials, trial, **info) -> None:
                self.progress.update()

            def on_trial_error(self, iteration, trials, trial, **info) -> None:
                self.progress.update()

        return _Printer()


def run_tune(config: TuneStageConfig, quiet: bool = False) -> list[dict[str, Any]]:
    """Run (or resume) the grid on the connected Ray; writes and returns the table rows."""
    import os

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # keep finished trials across a hard kill
    from ray import tune

    from workflows.ray_env import require_resources, use_gpus

    grid = load_grid(config.grid)
    base = absolute_paths(replace(config.base, data=config.data))   # (the grid may make its trials one-stage)
    config = replace(config, data=base.data, base=base)   # recorded so: --resume may run from elsewhere
    folder = experiment_dir(config)
    trials = grid.trials()
    _check_seed_axes(grid, config.seeds)
    repeats = [(t, k if config.seeds > 1 else None) for t in trials for k in range(config.seeds)]
    trial_stages = [absolute_inputs(_trial_stage(base, grid, t, folder, k)) for t, k in repeats]
    card, skipped = _check_dataset(trial_stages, grid.metrics)
    stages = [to_dict(with_card_fusion(s, card)) for s in trial_stages]   # each trial as its run resolves it
    resources = {"cpu": max(config.cpus_per_trial, 0.1), "gpu": config.gpus_per_trial}
    use_gpu = use_gpus(base.use_gpu)
    trial = training_resources(base, use_gpu)
    require_resources(f"one trial of {grid.name} ({base.num_workers} workers)",
                      {**trial, "CPU": trial["CPU"] + resources["cpu"]}, "use fewer workers (--set base.num_workers=N)")
    check_output_folder(folder, TuneStageConfig)
    trainable = trial_trainable(resources, skipped)
    if config.resume and tune.Tuner.can_restore(str(folder)):
        _check_same_trials(folder, stages)
        tuner = tune.Tuner.restore(str(folder), trainable, resume_unfinished=True, resume_errored=True)
    else:
        if (folder / "tuner.pkl").exists():
            raise FileExistsError(f"{folder} holds a previous experiment: pass --resume to finish it")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / TRIALS, json.dumps(stages, indent=1))
        atomic_write_text(folder / "config.yaml", dump(config))   # what --resume continues with
        tuner = tune.Tuner(
            trainable, param_space={"stage": tune.grid_search(stages)},
            tune_config=tune.TuneConfig(max_concurrent_trials=config.max_concurrent),
            run_config=tune.RunConfig(name=grid.name, storage_path=str(folder.parent), verbose=0,
                                      callbacks=[TrialProgress(len(stages), quiet)]))
    results = tuner.fit()
    runs = []   # (the index of its stage, its metrics, its error) of every trial run
    for result in results:
        stage = result.config["stage"] if result.config else None
        runs.append((stages.index(stage) if stage in stages else None, dict(result.metrics or {}),
                     str(result.error or "")))
    rows = setting_rows(grid, trials, config.seeds, runs)
    atomic_write_text(folder / f"{grid.name}.md", grid_markdown(grid, rows))
    atomic_write_text(folder / f"{grid.name}.csv", grid_csv(grid, rows))
    atomic_write_text(folder / "config.yaml", dump(config))
    return rows


# the resolved training stage of every trial, written when an experiment starts
TRIALS = "trials.json"


def experiment_dir(config: TuneStageConfig) -> Path:
    """The folder of the experiment: its grid's name under ``out``."""
    return Path(config.out).resolve() / load_grid(config.grid).name


def _check_same_trials(folder: Path, stages: list[dict[str, Any]]) -> None:
    """A resumed experiment finishes the trials it started with: Tune restores those, and a grid
    file, base or dataset changed since would put trials of two settings into one table."""
    path = folder / TRIALS
    if not path.is_file():   # an experiment started before gcm-tal wrote the file
        return
    earlier = json.loads(path.read_text())
    if len(earlier) != len(stages):
        raise ConfigError(f"{folder} was started with {len(earlier)} trials, and the grid and settings given now make "
                          f"{len(stages)}: --resume finishes an experiment as it was started; give another --out "
                          "for a new one")
    changes: dict[str, tuple[Any, Any]] = {}
    for old, new in zip(earlier, stages):
        changes.update(changed_settings(old, new))
    if changes:
        raise ConfigError(f"{folder} was started with other trial settings ({describe_changes(changes)}): --resume "
                          "finishes an experiment as it was started; give another --out for a new one")


def _check_dataset(stages: list[TrainStageConfig], metrics: list[str]
                   ) -> tuple[DatasetCard, list[dict[str, str]] | None]:
    """The card of the trials' dataset and, for one-stage trials, the videos they leave out
    (``skip_bad``; None: no one-stage trial). Fail here, once, not in every trial, where the dataset
    cannot be read (the preprocessed ``data``, or the dataset that ``base.card`` and
    ``base.data_root`` name: one-stage grids) or lacks a stream or unit features a trial reads, or
    where a test metric of the table is one no trial reports (a stream no trial trains, a tIoU the
    dataset's protocol does not use)."""
    manifest = None if stages[0].card else load_manifest(stages[0].data)
    card, data_root = dataset_of(stages[0], manifest)
    skipped = None
    if any(stage.kind == "one-stage" for stage in stages):
        skipped = check_snippet_layout(card, data_root, manifest, evaluate=True, skip_bad=stages[0].skip_bad)
    for stage in stages:
        check_inputs(stage, card, manifest)
    sources = {"fused", *(s for stage in stages for s in stage.streams)}
    measures = {"mAP_avg", *(f"mAP@{t:g}" for t in card.tiou)}
    for metric in metrics:
        source, _, measure = metric.partition("/")
        if measure and (source not in sources or measure not in measures):
            raise ConfigError(f"the grid's metric {metric!r} is not one its trials report: a test metric is "
                              f"<streams>/<measure>, streams one of {sorted(sources)}, measure one of "
                              f"{sorted(measures)} (the tIoU of {card.name}'s protocol)")
    return card, skipped


def _trial_stage(base: TrainStageConfig, grid: Grid, trial: dict[str, Any], folder: Path,
                 repeat: int | None = None) -> TrainStageConfig:
    """A trial's training stage; its ``repeat``-th seed after the recipe's, where settings are
    trained with several (named so)."""
    stage = trial_config(base, grid, trial)
    settings = {**to_dict(stage), "out": str(folder / "trials"), "name": trial_name(grid, trial), "evaluate": True,
                "resume": True}
    if repeat is not None:
        key, recipe = stage.recipe
        node = settings
        for part in key.split("."):
            node = node[part]
        node["seed"] = recipe.seed + repeat
        settings["name"] += f"_seed={node['seed']}"
    return from_dict(TrainStageConfig, settings)


def _check_seed_axes(grid: Grid, seeds: int) -> None:
    """Several seeds per setting, and a grid that varies the seed itself, would train some runs twice."""
    varied = [key for key in grid.axes if key.endswith("train.seed")]
    if seeds > 1 and varied:
        raise ConfigError(f"the grid {grid.name} varies {varied[0]} and seeds={seeds} gives each setting its own "
                          "seeds: use one or the other")


def setting_rows(grid: Grid, trials: list[dict[str, Any]], seeds: int,
                 runs: list[tuple[int | None, dict[str, Any], str]]) -> list[dict[str, Any]]:
    """One row per setting of the grid, in the grid's order, from its trials' runs (stage index
    ``setting * seeds + repeat``, metrics, error): the run's metrics and error where each setting
    has one seed; with several, each numeric metric's mean (``metrics``) and sample standard
    deviation (``std``) over the seeds that finished and reported it, their number (``seeds``)
    and the errors."""
    by_setting: dict[int, list[tuple[dict[str, Any], str]]] = {k: [] for k in range(len(trials))}
    strays = []   # a result Tune gives for no stage of the experiment
    for index, metrics, error in runs:
        if index is None:
            strays.append({"trial": {}, "metrics": metrics, "error": error})
        else:
            by_setting[index // seeds].append((metrics, error))
    rows = []
    for k, trial in enumerate(trials):
        if seeds == 1:
            metrics, error = by_setting[k][0] if by_setting[k] else ({}, "")
            rows.append({"trial": trial, "metrics": metrics, "error": error})
            continue
        done = [metrics for metrics, error in by_setting[k] if not error]
        errors = "; ".join(error for _, error in by_setting[k] if error)
        numeric = sorted({m for run in done for m, v in run.items() if isinstance(v, (int, float))
                          and not isinstance(v, bool)})
        values = {m: [run[m] for run in done if m in run] for m in numeric}
        rows.append({"trial": trial, "metrics": {m: statistics.mean(v) for m, v in values.items() if v},
                     "std": {m: statistics.stdev(v) if len(v) > 1 else float("nan") for m, v in values.items() if v},
                     "seeds": len(done), "error": errors})
    return rows + strays


def unreported_metrics(grid: Grid, rows: list[dict[str, Any]]) -> list[str]:
    """The grid's metrics that no trial reported although some trial reported metrics: a name
    mistyped in the grid file, whose column is empty (test metrics are checked before the trials)."""
    reported = {name for r in rows for name in r["metrics"]}
    return [m for m in grid.metrics if m not in reported] if reported else []


def _with_std(row: dict[str, Any], metric: str) -> Any:
    """A table cell: the metric, as mean +- std where the row has several seeds."""
    mean = row["metrics"].get(metric, float("nan"))
    std = row.get("std", {}).get(metric)
    if std is None:
        return mean
    return f"{mean:.2f} ± " + ("-" if std != std else f"{std:.2f}")   # NaN: one seed finished


def grid_markdown(grid: Grid, rows: list[dict[str, Any]]) -> str:
    seeded = any("seeds" in r for r in rows)
    headers = [*(k.split(".")[-1] for k in grid.axes), *grid.metrics, *(["seeds"] if seeded else [])]
    body = [[*(grid.label(k, r["trial"].get(k)) for k in grid.axes if k in r["trial"]),
             *(_with_std(r, m) for m in grid.metrics), *([r.get("seeds", 0)] if seeded else [])] for r in rows]
    note = f"\n{grid.note}\n" if grid.note else ""
    if seeded:
        note += "\nEach cell: mean ± standard deviation over the seeds that finished (column seeds).\n"
    return f"## {grid.title}\n{note}\n{markdown_table(headers, body)}\n"


def grid_csv(grid: Grid, rows: list[dict[str, Any]]) -> str:
    seeded = any("seeds" in r for r in rows)
    spread = [f"std {m}" for m in grid.metrics] + ["seeds"] if seeded else []
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*grid.axes, *grid.metrics, *spread, "error"])
    for r in rows:
        std = [r.get("std", {}).get(m, "") for m in grid.metrics] + [r.get("seeds", 0)] if seeded else []
        writer.writerow([*(grid.label(k, r["trial"].get(k)) for k in grid.axes),
                         *(r["metrics"].get(m, "") for m in grid.metrics), *std, r["error"]])
    return buffer.getvalue()
