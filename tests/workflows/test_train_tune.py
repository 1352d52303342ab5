"""Ray Train and Ray Tune stages on the small benchmark, including their recovery from faults."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import ROOT, SHARED_DATA, run_two_workers
from gcm_core.checkpoint import load_checkpoint, save_checkpoint
from gcm_core.detectors.dssad import DSSAD
from gcm_core.engine import build_heads
from gcm_core.data.cards import load_card
from gcm_core.data.dataset import DatasetSource
from gcm_core.data.model import FormatError
from gcm_core.postprocess import VideoLabels
from workflows.config import EvaluateConfig, PreprocessConfig, RayConfig, TrainStageConfig, TuneStageConfig
from workflows.evaluate import EvalDataset, EvaluationError, datasets_of, pair_folders, run_evaluate
from workflows.preprocess import run_preprocess
from workflows.cli import main as cli_main
from workflows.ray_env import ray_session
from workflows.settings import ConfigError, from_dict, to_dict
from workflows.shards import read_videos
from workflows.train import dataset_of, run_train
from workflows.train_one_stage import OneStageModels, load_one_stage, save_one_stage
from workflows.tune import run_tune

FAST = {"epochs": 3, "lr": 0.05, "batch_videos": 8, "sampling": {"per_video": 16}}


@pytest.fixture(scope="module")
def prepared(small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    with ray_session(RayConfig(num_cpus=2)):
        run_preprocess(PreprocessConfig(card=str(small_dataset / "card.yaml"), data_root=str(small_dataset),
                                        out=str(out), videos_per_shard=12), quiet=True)
        yield out


def stage(prepared, out, name, model=None, **train):
    return from_dict(TrainStageConfig, {"data": str(prepared), "out": str(out), "name": name, "stream_lr": {},
                                        "model": model or {}, "train": {**FAST, **train}})


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory):
    """SSN+GCM (also evaluated after epoch 2) and SSN+MLP trained on 2 workers for 3 epochs:
    {name: run_train's result}."""
    out = tmp_path_factory.mktemp("runs")
    return {name: run_train(dataclasses.replace(stage(prepared, out, name, {"act_module": kind, "comp_module": kind}),
                                                evaluate_every=2 if kind == "gcm" else 0), quiet=True)
            for name, kind in (("gcm", "gcm"), ("mlp", "mlp"))}


def test_distributed_training_writes_a_checkpoint_loadable_without_ray(prepared, runs, tmp_path):
    result = runs["gcm"]
    run = Path(result["run_dir"])
    ckpt = load_checkpoint(run / "model.pt")
    assert ckpt.streams == ["rgb", "flow"] and ckpt.extra["epoch"] == 3
    assert ckpt.inference.weights() == load_card(prepared / "card.yaml").stream_fusion   # the run chose none
    assert ckpt.units_per_video == load_card(prepared / "card.yaml").units_per_video_test   # gcm detect scores as many
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fused"]["protocol"] == "thumos14" and len(metrics["fused"]["mAP"]) == 5
    assert result["metrics"]["fused/mAP@0.5"] == pytest.approx(metrics["fused"]["mAP"][4], abs=1e-3)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    logged = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in logged] == [1, 2, 3]
    # evaluate_every=2: the test mAP after epoch 2 (as its checkpoint scores alone) and after the last
    assert ["fused/mAP@0.5" in m for m in logged] == [False, True, True]
    assert logged[2]["fused/mAP@0.5"] == pytest.approx(result["metrics"]["fused/mAP@0.5"], abs=1e-9)
    run_evaluate(EvaluateConfig(checkpoints=(str(run / "epoch-0002" / "model.pt"),), data=(str(prepared),),
                                out=str(tmp_path / "epoch-2")), quiet=True)
    evaluated = next((tmp_path / "epoch-2").glob("*/metrics.json"))
    assert json.loads(evaluated.read_text())["mAP"][4] == pytest.approx(logged[1]["fused/mAP@0.5"], abs=1e-4)
    with pytest.raises(FileExistsError, match="--resume"):
        run_train(stage(prepared, run.parent, "gcm"), quiet=True)



def test_what_the_dataset_lacks_is_refused_up_front(prepared, runs, small_dataset, tmp_path, capsys):
    """A stream, split, unit features or candidate edges the dataset lacks, or a grid's test metric
    at a tIoU its protocol does not use: named up front, not a KeyError or ValueError in every
    training worker (nor in every trial of a grid), nor an empty column after the whole grid."""
    config = dataclasses.replace(stage(prepared, tmp_path, "depth"), streams=("rgb", "depth"))
    with pytest.raises(ConfigError, match=r"the dataset's streams are \['rgb', 'flow'\], not \['depth'\]"):
        run_train(config, quiet=True)
    assert not (tmp_path / "depth").exists()
    extended = dataclasses.replace(config, streams=("rgb", "flow"),
                                   model=dataclasses.replace(config.model, comp_input="extended"))
    with pytest.raises(ValueError, match=f"{prepared} holds no extended unit features, which the model reads"):
        run_train(extended, quiet=True)   # the dataset was prepared with body and three_part features
    caps = json.loads((prepared / "manifest.json").read_text())["caps"]
    wider = dataclasses.replace(config, streams=("rgb", "flow"), name="wider",
                                graph=dataclasses.replace(config.graph, l_sem=caps["sem_k"] + 1))
    with pytest.raises(ValueError, match=rf"{prepared} kept candidate edges under caps the model's graph exceeds "
                                          rf"\(l_sem={caps['sem_k'] + 1} exceeds sem_k={caps['sem_k']}\).*caps\.sem_k$"):
        run_train(wider, quiet=True)
    assert not (tmp_path / "wider").exists()
    bare = tmp_path / "bare"   # a data root with annotations and proposals but no features: one-stage reads them
    shutil.copytree(small_dataset, bare, symlinks=True, ignore=shutil.ignore_patterns("features"))
    one_stage = from_dict(TrainStageConfig, {"kind": "one-stage", "card": str(bare / "card.yaml"),
                                             "data_root": str(bare), "out": str(tmp_path), "name": "bare-run"})
    with pytest.raises(FormatError, match=f"^{bare / 'features' / 'rgb'}: no rgb features folder under the data root"):
        run_train(one_stage, quiet=True)
    assert not (tmp_path / "bare-run").exists()
    gappy = tmp_path / "gappy"   # one test video's flow file missing: named here, not in a worker's traceback
    shutil.copytree(small_dataset, gappy)
    tests = DatasetSource(load_card(gappy / "card.yaml"), gappy, "test")
    lost = tests.feature_path(tests.video_ids[3], "flow")
    lost.unlink()
    gappy_run = dataclasses.replace(one_stage, card=str(gappy / "card.yaml"), data_root=str(gappy), name="gappy-run")
    with pytest.raises(FormatError, match=f"^{lost}, video {tests.video_ids[3]}: feature file missing$"):
        run_train(gappy_run, quiet=True)
    assert not (tmp_path / "gappy-run").exists()
    spoilt = tmp_path / "spoilt"   # a NaN in one training video's features, met where the workers read them
    shutil.copytree(small_dataset, spoilt)
    trains = DatasetSource(load_card(spoilt / "card.yaml"), spoilt, "train")
    bad = trains.feature_path(trains.video_ids[0], "rgb")
    features = np.load(bad)
    features[2, 0] = np.nan
    np.save(bad, features)
    assert cli_main(["train", "--card", str(spoilt / "card.yaml"), "--data-root", str(spoilt), "--out", str(tmp_path),
                     "--name", "spoilt-run", "--set", "kind=one-stage", "--set", "max_failures=0", "--quiet"]) == 2
    assert (f"gcm train: error: {bad}, video {trains.video_ids[0]}: non-finite value (NaN or inf) at snippet 2\n"
            in capsys.readouterr().err)   # the worker's error, not Ray's wrapper with its traceback
    def without(role: str) -> Path:   # a dataset preprocessed with the other split alone (roles=[...])
        partial = tmp_path / f"no-{role}"
        partial.mkdir()
        shutil.copyfile(prepared / "card.yaml", partial / "card.yaml")
        manifest = json.loads((prepared / "manifest.json").read_text())
        manifest["counts"].pop(role)
        manifest["shards"] = [shard for shard in manifest["shards"] if shard["role"] != role]
        (partial / "manifest.json").write_text(json.dumps(manifest))
        return partial

    no_train, no_test = without("train"), without("test")
    with pytest.raises(ValueError, match=rf"{no_train} holds no train videos \(its splits: \['test'\]\)"):
        run_train(dataclasses.replace(config, streams=("rgb", "flow"), data=str(no_train)), quiet=True)
    with pytest.raises(ValueError, match=rf"{no_test} holds no test videos \(its splits: \['train'\]\)"):
        run_evaluate(EvaluateConfig(checkpoints=(runs["gcm"]["checkpoint"],), data=(str(no_test),),
                                    out=str(tmp_path / "eval")), quiet=True)
    one_video = no_test   # now with one training video for two workers: one worker could take no step
    manifest = json.loads((one_video / "manifest.json").read_text())
    manifest["counts"]["train"]["videos"] = 1
    manifest["shards"] = manifest["shards"][:1]
    manifest["shards"][0]["videos"] = manifest["shards"][0]["videos"][:1]
    (one_video / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=rf"{one_video} holds 1 training videos, fewer than the 2 workers"):
        run_train(dataclasses.replace(config, streams=("rgb", "flow"), data=str(one_video), num_workers=2), quiet=True)
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: streams\ngrid:\n  streams: [[rgb], [depth]]\n")
    with pytest.raises(ConfigError, match=r"not \['depth'\]"):
        run_tune(TuneStageConfig(grid=str(grid), data=str(prepared), out=str(tmp_path)), quiet=True)
    assert not (tmp_path / "streams").exists()
    grid.write_text("name: strict\ngrid:\n  model.num_samples: [1, 2]\nmetrics: [fused/mAP@0.5, flow/mAP@0.7]\n")
    tiou = [f"mAP@{t:g}" for t in json.loads((prepared / "manifest.json").read_text())["tiou"]]
    assert "mAP@0.5" in tiou and "mAP@0.7" not in tiou
    with pytest.raises(ConfigError, match=r"the grid's metric 'flow/mAP@0\.7' is not one its trials report"):
        run_tune(TuneStageConfig(grid=str(grid), data=str(prepared), out=str(tmp_path)), quiet=True)
    assert not (tmp_path / "strict").exists()


def test_more_workers_than_the_embedded_ray_holds_is_an_error_not_a_hang(prepared, tmp_path):
    too_many = from_dict(TrainStageConfig, {**to_dict(stage(prepared, tmp_path, "crowd")), "num_workers": 4})
    with pytest.raises(RuntimeError, match=r"needs 2.25 CPU \(the cluster has 2\).*fewer --workers"):
        run_train(too_many, quiet=True)  # 4 x 0.5 CPU + a read task: Ray would wait forever
    assert not (tmp_path / "crowd").exists()


def test_evaluation_on_gpus_the_embedded_ray_lacks_is_an_error_not_a_hang(prepared, runs, tmp_path):
    config = EvaluateConfig(checkpoints=(str(Path(runs["gcm"]["run_dir"]) / "model.pt"),), data=(str(prepared),),
                            out=str(tmp_path / "eval"), use_gpu=True)
    with pytest.raises(RuntimeError, match=r"evaluation on GPUs needs 0.25 GPU \(the cluster has 0\).*use_gpu"):
        run_evaluate(config, quiet=True)   # its tasks would wait for a GPU forever
    assert not (tmp_path / "eval").exists()


def test_parallel_evaluation_scores_every_checkpoint_as_its_training_run_did(prepared, runs, tmp_path):
    gcm, mlp = (Path(runs[k]["run_dir"]) / "model.pt" for k in ("gcm", "mlp"))
    namesake = tmp_path / "elsewhere" / "gcm" / "model.pt"  # same run folder name as gcm's
    broken = tmp_path / "broken" / "model.pt"
    narrow = tmp_path / "narrow" / "model.pt"   # heads that read features of another width
    extended = tmp_path / "extended" / "model.pt"   # ... or unit features the dataset was not prepared with
    wide = tmp_path / "wide" / "model.pt"           # ... or a graph beyond the dataset's candidate caps
    namesake.parent.mkdir(parents=True)
    for path in (broken, narrow, extended, wide):
        path.parent.mkdir()
    shutil.copyfile(gcm, namesake)
    broken.write_bytes(b"not a checkpoint")
    trained = load_checkpoint(gcm)
    save_checkpoint(narrow, dataclasses.replace(trained, heads=build_heads(
        trained.model_config, trained.streams, {s: 16 for s in trained.streams}, len(trained.classes))))
    reads_extended = dataclasses.replace(trained.model_config, comp_input="extended")
    save_checkpoint(extended, dataclasses.replace(trained, model_config=reads_extended, heads=build_heads(
        reads_extended, trained.streams, trained.dims, len(trained.classes))))
    sem_k = json.loads((prepared / "manifest.json").read_text())["caps"]["sem_k"]
    save_checkpoint(wide, dataclasses.replace(trained, graph=dataclasses.replace(trained.graph, l_sem=sem_k + 1)))
    out = tmp_path / "eval"
    config = EvaluateConfig(checkpoints=tuple(map(str, (gcm, mlp, namesake, broken, narrow, extended, wide))),
                            data=(str(prepared),), out=str(out))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_evaluate(EvaluateConfig(checkpoints=(str(tmp_path / "none.pt"),), data=(str(prepared),), out=str(out)))
    run_config = (gcm.parent / "config.yaml").read_text()
    with pytest.raises(FileExistsError, match=f"^{gcm.parent} holds a training run; writing an evaluation there"):
        run_evaluate(dataclasses.replace(config, out=str(gcm.parent)), quiet=True)   # beside the run: not into it
    assert (gcm.parent / "config.yaml").read_text() == run_config
    with pytest.raises(EvaluationError, match="4 of 7 evaluations failed") as failed:
        run_evaluate(config, quiet=True)
    assert f"{broken} on {prepared}: {broken}: unreadable checkpoint" in str(failed.value)
    width = json.loads((prepared / "manifest.json").read_text())["dims"]["rgb:body"]
    assert (f"{narrow} on {prepared}: {prepared / 'manifest.json'}: rgb features are {width}-d, the model's rgb "
            f"stream reads 16-d; flow features are {width}-d") in str(failed.value)
    assert f"{extended} on {prepared}: {prepared} holds no extended unit features" in str(failed.value)
    assert (f"{wide} on {prepared}: {prepared} kept candidate edges under caps the model's graph exceeds "
            f"(l_sem={sem_k + 1} exceeds sem_k={sem_k})") in str(failed.value)

    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert sorted(r["checkpoint"] for r in rows) == sorted(map(str, (gcm, mlp, namesake)))
    for run, folders in (("gcm", [f"gcm__{prepared.name}-1", f"gcm__{prepared.name}-2"]),
                         ("mlp", [f"mlp__{prepared.name}"])):
        trained = json.loads((Path(runs[run]["run_dir"]) / "metrics.json").read_text())["fused"]
        for folder in folders:
            evaluated = json.loads((out / folder / "metrics.json").read_text())
            assert evaluated["mAP"] == pytest.approx(trained["mAP"], abs=1e-6), folder
            assert json.loads((out / folder / "detections.json").read_text())["results"]


def test_evaluation_post_processes_as_asked_instead_of_as_the_checkpoint_says(prepared, runs, tmp_path):
    """--set inference.KEY=VALUE replaces the checkpoint's own post-processing (here Soft-NMS and
    20 detections a video, where it holds NMS and 200): the trained heads' unit scores on the test
    videos, post-processed so here, give the detections written."""
    from gcm_core.data.detections import result_json
    from gcm_core.engine import UnitDataset, detections_of, predict

    gcm = Path(runs["gcm"]["run_dir"]) / "model.pt"
    asked = {"nms": "soft-nms", "top_k": 20}
    rows = run_evaluate(EvaluateConfig(checkpoints=(str(gcm),), data=(str(prepared),), out=str(tmp_path / "eval"),
                                       inference=asked), quiet=True)
    checkpoint = load_checkpoint(gcm)
    assert checkpoint.inference.nms == "nms" and checkpoint.inference.top_k == 200
    videos = read_videos(prepared, "test")
    comp = checkpoint.model_config.completeness_features
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the evaluation task ran: the same sums, the same scores
    try:
        per_stream = {s: predict(head, UnitDataset(videos, s, checkpoint.graph, comp), checkpoint.stats)
                      for s, head in checkpoint.heads.items()}
    finally:
        torch.set_num_threads(threads)
    expected = detections_of(videos, per_stream, checkpoint.classes, dataclasses.replace(checkpoint.inference, **asked))
    written = json.loads(Path(rows[0]["detections"]).read_text())["results"]
    assert written == json.loads(json.dumps(result_json(expected)))["results"]
    assert max(len(found) for found in written.values()) == 20
    with pytest.raises(ConfigError, match=r"unknown key \['topk'\] in inference"):
        EvaluateConfig(inference={"topk": 20})

    # --video-scores: a file in BSN's layout (its classes in another order), matched by name
    rng = np.random.default_rng(5)
    scores = {v.video_id: rng.uniform(0.05, 1.0, len(checkpoint.classes)) for v in videos}
    path = tmp_path / "video_scores.json"
    path.write_text(json.dumps({"class": checkpoint.classes[::-1],
                                "results": {v: row[::-1].tolist() for v, row in scores.items()}}))
    labelled = run_evaluate(EvaluateConfig(checkpoints=(str(gcm),), data=(str(prepared),), out=str(tmp_path / "labels"),
                                           inference=asked, video_scores=str(path), video_top=1), quiet=True)
    expected = detections_of(videos, per_stream, checkpoint.classes, dataclasses.replace(checkpoint.inference, **asked),
                             VideoLabels(scores, top=1))
    written = json.loads(Path(labelled[0]["detections"]).read_text())["results"]
    assert written == json.loads(json.dumps(result_json(expected)))["results"]
    assert all(len({d["label"] for d in found}) == 1 for found in written.values())
    assert "With external video labels" in (tmp_path / "labels" / "summary.md").read_text()
    path.write_text(json.dumps({"class": checkpoint.classes, "results": {v: row.tolist() for v, row in
                                                                          list(scores.items())[1:]}}))
    with pytest.raises(ValueError, match=f"no class scores of 1 of the {len(videos)} test videos of .*{videos[0].video_id}"):
        run_evaluate(EvaluateConfig(checkpoints=(str(gcm),), data=(str(prepared),), out=str(tmp_path / "lacking"),
                                    video_scores=str(path)), quiet=True)
    assert not (tmp_path / "lacking").exists()   # refused before any task ran


def test_detect_shares_a_folder_of_videos_out_to_ray_tasks(runs, small_dataset, tmp_path, monkeypatch, capsys):
    """gcm detect --features-dir --workers 2 (Ray tasks over chunks of the folder) writes what the
    same command writes in one process: every video, in the folder's order, the same detections."""
    monkeypatch.chdir(tmp_path)  # a folder named relative to where the user stands
    folder = Path("features")
    for s in ("rgb", "flow"):
        (folder / s).mkdir(parents=True)
        for f in sorted((small_dataset / "features" / s).glob("synth_test_*.npy"))[:6]:
            (folder / s / f.name).symlink_to(f)
    listed = sorted(f.stem for f in (folder / "rgb").iterdir())
    for s in ("rgb", "flow"):  # and a video the proposal list does not hold, left out with --skip-bad
        (folder / s / "unlisted.npy").symlink_to((folder / s / f"{listed[0]}.npy").resolve())
    checkpoint = Path(runs["gcm"]["run_dir"]) / "model.pt"
    written = {}
    for workers in ("1", "2"):
        assert cli_main(["detect", "--checkpoint", str(checkpoint), "--features-dir", str(folder), "--proposals",
                         str(small_dataset / "proposals/test_proposal_list.txt"), "--workers", workers,
                         "--skip-bad", "--out", f"{workers}.json"]) == 0
        written[workers] = json.loads(Path(f"{workers}.json").read_text())
    assert list(written["2"]["results"]) == listed
    assert written["2"] == written["1"]
    # the tasks post-process as asked too
    assert cli_main(["detect", "--checkpoint", str(checkpoint), "--features-dir", str(folder), "--proposals",
                     str(small_dataset / "proposals/test_proposal_list.txt"), "--workers", "2", "--skip-bad",
                     "--set", "inference.top_k=2", "--out", "top2.json"]) == 0
    assert json.loads(Path("top2.json").read_text())["results"] == {
        video: found[:2] for video, found in written["1"]["results"].items()}
    # --video-scores: each video's detections are all of the one class its file scores above 0,
    # in the tasks as in one process; a file lacking a video is refused before any is detected
    classes = load_checkpoint(checkpoint).classes
    given = {video: k % len(classes) for k, video in enumerate([*listed, "unlisted"])}
    Path("labels.json").write_text(json.dumps({"class": classes, "results": {
        video: [0.5 if c == k else 0.0 for c in range(len(classes))] for video, k in given.items()}}))
    for workers in ("1", "2"):
        assert cli_main(["detect", "--checkpoint", str(checkpoint), "--features-dir", str(folder), "--proposals",
                         str(small_dataset / "proposals/test_proposal_list.txt"), "--workers", workers, "--skip-bad",
                         "--video-scores", "labels.json", "--video-top", "1", "--out", f"labels{workers}.json"]) == 0
        labelled = json.loads(Path(f"labels{workers}.json").read_text())["results"]
        assert list(labelled) == listed
        assert all({d["label"] for d in found} == {classes[given[video]]} for video, found in labelled.items())
    assert labelled == json.loads(Path("labels1.json").read_text())["results"]
    Path("labels.json").write_text(json.dumps({"class": classes, "results": {"unlisted": [1.0] * len(classes)}}))
    capsys.readouterr()
    assert cli_main(["detect", "--checkpoint", str(checkpoint), "--features-dir", str(folder), "--proposals",
                     str(small_dataset / "proposals/test_proposal_list.txt"), "--video-scores", "labels.json",
                     "--out", "lacking.json"]) == 2
    assert f"has no class scores of {len(listed)} of the {len(listed) + 1} videos to detect, e.g. {listed[0]}" in \
        capsys.readouterr().err
    assert not Path("lacking.json").exists()
    # UntrimmedNet's .npy is read by a card's class indices: another dataset's card is refused
    assert cli_main(["detect", "--checkpoint", str(checkpoint), "--features-dir", str(folder), "--proposals",
                     str(small_dataset / "proposals/test_proposal_list.txt"), "--video-scores",
                     str(SHARED_DATA / "thumos14/untrimmednet_test_scores.npy"), "--card", "thumos14"]) == 2
    assert "card thumos14's classes are not the checkpoint's" in capsys.readouterr().err
    # without --skip-bad the video stops the run, named in one paragraph as in one process
    capsys.readouterr()
    assert cli_main(["detect", "--checkpoint", str(checkpoint), "--features-dir", str(folder), "--proposals",
                     str(small_dataset / "proposals/test_proposal_list.txt"), "--workers", "2"]) == 2
    err = capsys.readouterr().err   # progress lines, then the error
    assert err.strip().splitlines()[-1] == ("gcm detect: error: " f"{(small_dataset / 'proposals/test_proposal_list.txt').resolve()}, "
                                            "video unlisted: no proposals for this video")
    # tasks on GPUs this Ray does not have would wait forever: refused, nothing written
    assert cli_main(["detect", "--checkpoint", str(checkpoint), "--features-dir", str(folder), "--proposals",
                     str(small_dataset / "proposals/test_proposal_list.txt"), "--workers", "2", "--device", "cuda",
                     "--out", "gpu.json"]) == 2
    assert ("gcm detect: error: detection on GPUs needs 0.25 GPU (the cluster has 0): Ray would wait for them "
            "forever; give --device cpu") in capsys.readouterr().err
    assert not Path("gpu.json").exists()


def test_one_stage_training_runs_on_two_workers_and_evaluates(prepared, small_dataset, tmp_path, monkeypatch):
    # paths relative to where the user stands, as typed on the command line: Ray's workers run elsewhere
    monkeypatch.chdir(tmp_path)
    run_preprocess(PreprocessConfig(card=str(small_dataset / "card.yaml"), data_root=os.path.relpath(small_dataset),
                                    out="prep", videos_per_shard=12), quiet=True)
    prepared = Path("prep")
    config = from_dict(TrainStageConfig, {
        "data": "prep", "out": "runs", "name": "dssad-gcm", "kind": "one-stage", "evaluate_every": 1,
        "one_stage": {"model": {"hidden": 32, "clip_snippets": 128, "window_stride": 64, "gcm_scales": [0, 2]},
                      "train": {"optimizer": "adam", "lr": 0.003, "epochs": 2, "batch_videos": 8}}})
    result = run_train(config, quiet=True)
    run = Path(result["run_dir"])
    saved = torch.load(run / "dssad.pt", weights_only=True)
    assert saved["classes"] == list(load_card(prepared / "card.yaml").classes)
    for stream in ("rgb", "flow"):   # one detector per stream, GCMs at the two asked scales only
        gcm_scales = {key.split(".")[2] for key in saved["models"] if key.startswith(f"{stream}.gcms.")}
        assert gcm_scales == {"0", "2"}
    logged = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in logged] == [1, 2] and all("fused/mAP@0.5" in m for m in logged)  # evaluate_every
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fused"]["protocol"] == "thumos14" and len(metrics["fused"]["mAP"]) == 5
    assert logged[1]["fused/mAP@0.5"] == pytest.approx(metrics["fused"]["mAP"][4], abs=1e-3)
    detections = json.loads((run / "detections.json").read_text())["results"]
    assert set(detections) <= {v.video_id for v in read_videos(prepared, "test")}
    # gcm evaluate scores the D-SSAD weights as the run scored itself
    rows = run_evaluate(EvaluateConfig(checkpoints=(str(run / "dssad.pt"),), data=("prep",), out="eval"), quiet=True)
    assert rows[0]["mAP"] == pytest.approx(metrics["fused"]["mAP"], abs=1e-6)
    assert json.loads(Path("eval/dssad-gcm__prep/detections.json").read_text())["results"] == detections
    # with top_k 3 in place of its 200, each video keeps its first three (NMS is greedy, best first)
    run_evaluate(EvaluateConfig(checkpoints=(str(run / "dssad.pt"),), data=("prep",), out="eval3",
                                inference={"top_k": 3}), quiet=True)
    three = json.loads(Path("eval3/dssad-gcm__prep/detections.json").read_text())["results"]
    assert three == {video: found[:3] for video, found in detections.items()}
    # with a video label (the one class a file scores above 0), every detection is of it and
    # scored by it, through the CLI
    classes = saved["classes"]
    tests = [v.video_id for v in read_videos(prepared, "test")]
    given = {video: k % len(classes) for k, video in enumerate(tests)}
    Path("labels.json").write_text(json.dumps({"class": classes, "results": {
        video: [0.5 if c == given[video] else 0.0 for c in range(len(classes))] for video in tests}}))
    assert cli_main(["evaluate", "--checkpoint", str(run / "dssad.pt"), "--data", "prep", "--out", "eval-labels",
                     "--video-scores", "labels.json", "--video-top", "1", "--quiet"]) == 0
    labelled = json.loads(Path("eval-labels/dssad-gcm__prep/detections.json").read_text())["results"]
    assert set(labelled) == set(tests)
    assert all({d["label"] for d in found} == {classes[given[video]]} and max(d["score"] for d in found) <= 0.5
               for video, found in labelled.items())
    # gcm detect finds the same actions in one test video from its features alone
    video = next(v for v in read_videos(prepared, "test") if v.video_id in detections)
    features = [str(small_dataset / f"features/{s}/{video.video_id}.npy") for s in ("rgb", "flow")]
    assert cli_main(["detect", "--checkpoint", str(run / "dssad.pt"), "--features", *features,
                     "--duration", str(video.duration), "--out", "one.json"]) == 0
    found, expected = json.loads(Path("one.json").read_text())["results"][video.video_id], detections[video.video_id]
    assert [d["label"] for d in found] == [d["label"] for d in expected]
    assert [d["score"] for d in found] == pytest.approx([d["score"] for d in expected], abs=1e-6)
    assert [t for d in found for t in d["segment"]] == pytest.approx([t for d in expected for t in d["segment"]],
                                                                     abs=1e-5)
    # the same run reading the dataset directly: its card and a data root without proposal lists, which
    # D-SSAD does not read, and no preprocessing (data names nothing)
    Path("bare").mkdir()
    for name in ("annotations.json", "features"):
        (Path("bare") / name).symlink_to(small_dataset / name)
    direct = run_train(dataclasses.replace(config, name="dssad-direct", data="nowhere",
                                           card=str(small_dataset / "card.yaml"), data_root="bare"), quiet=True)
    again = json.loads((Path(direct["run_dir"]) / "metrics.json").read_text())["fused"]
    assert again["mAP"] == pytest.approx(metrics["fused"]["mAP"], abs=1e-6)
    with pytest.raises(ValueError, match="one-stage runs only"):
        run_train(dataclasses.replace(config, kind="two-stage", card=str(small_dataset / "card.yaml")), quiet=True)
    # a test video whose flow file is missing, left out by gcm preprocess --skip-bad: D-SSAD is scored on
    # the videos the two-stage heads are (it read every video of the card, and stopped at that one)
    shutil.copytree(small_dataset, "gappy")
    tests = DatasetSource(load_card(Path("gappy/card.yaml")), "gappy", "test")
    lost = tests.video_ids[2]
    tests.feature_path(lost, "flow").unlink()
    run_preprocess(PreprocessConfig(card="gappy/card.yaml", data_root="gappy", out="gappy-prep", videos_per_shard=12,
                                    skip_bad=True), quiet=True)
    kept = {v.video_id for v in read_videos(Path("gappy-prep"), "test")}
    assert kept == set(tests.video_ids) - {lost}
    rows = run_evaluate(EvaluateConfig(checkpoints=(str(run / "dssad.pt"),), data=("gappy-prep",), out="eval-gappy"),
                        quiet=True)
    assert rows[0]["videos"] == len(kept)
    found = json.loads(Path("eval-gappy/dssad-gcm__gappy-prep/detections.json").read_text())["results"]
    assert set(found) == set(detections) & kept   # each video's windows are scored alone: the same detections
    for video in found:
        assert [d["label"] for d in found[video]] == [d["label"] for d in detections[video]]
        assert [d["score"] for d in found[video]] == pytest.approx([d["score"] for d in detections[video]], abs=1e-6)
    gone = tests.feature_path(tests.video_ids[0], "rgb")   # a kept video's file lost since: named before any task
    gone.unlink()
    with pytest.raises(FormatError, match=f"^{gone.resolve()}, video {tests.video_ids[0]}: feature file missing$"):
        run_evaluate(EvaluateConfig(checkpoints=(str(run / "dssad.pt"),), data=("gappy-prep",), out="eval-gone"),
                     quiet=True)


def test_a_one_stage_run_reading_a_card_leaves_out_its_bad_videos_with_skip_bad(prepared, small_dataset, tmp_path,
                                                                                 monkeypatch):
    """gcm train --card ... --skip-bad: a one-stage run that reads a dataset directly leaves out the
    videos whose features fail their checks (a training video's NaN, a test video's missing file),
    lists them with their errors, and trains and scores as on the dataset without them; gcm
    evaluate --skip-bad scores its weights on that card as the run did."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(small_dataset, "gappy", ignore=shutil.ignore_patterns("proposals"))
    card = load_card(Path("gappy/card.yaml"))
    trains, tests = (DatasetSource(card, "gappy", role) for role in ("train", "test"))
    broken, lost = trains.video_ids[1], tests.video_ids[2]
    rgb = np.load(trains.feature_path(broken, "rgb"))
    rgb[5, 3] = np.nan
    np.save(trains.feature_path(broken, "rgb"), rgb)
    tests.feature_path(lost, "flow").unlink()
    shutil.copytree("gappy", "trimmed")   # the same dataset with neither video annotated: what the run must equal
    annotations = json.loads(Path("trimmed/annotations.json").read_text())
    del annotations["database"][broken], annotations["database"][lost]
    Path("trimmed/annotations.json").write_text(json.dumps(annotations))
    config = from_dict(TrainStageConfig, {
        "card": "gappy/card.yaml", "data_root": "gappy", "out": "runs", "name": "skip", "kind": "one-stage",
        "num_workers": 1, "skip_bad": True,
        "one_stage": {"model": {"hidden": 16, "clip_snippets": 128, "window_stride": 64, "gcm_scales": [0]},
                      "train": {"optimizer": "adam", "lr": 0.003, "epochs": 1, "batch_videos": 8}}})
    missing = Path("gappy", tests.feature_path(lost, "flow").relative_to("gappy")).resolve()
    with pytest.raises(FormatError, match=f"^{missing}, video {lost}: feature file missing$"):
        run_train(dataclasses.replace(config, skip_bad=False, name="stops"), quiet=True)

    result = run_train(config, quiet=True)
    skipped = json.loads((Path(result["run_dir"]) / "skipped_videos.json").read_text())
    assert [(entry["video"], entry["role"]) for entry in skipped] == [(broken, "train"), (lost, "test")]
    assert "non-finite value (NaN or inf) at snippet 5" in skipped[0]["error"]
    assert skipped[1]["error"] == f"{missing}, video {lost}: feature file missing"
    reference = run_train(dataclasses.replace(config, card="trimmed/card.yaml", data_root="trimmed", skip_bad=False,
                                              name="trimmed"), quiet=True)
    timed = {"seconds_per_epoch"}
    assert {k: v for k, v in result["metrics"].items() if k not in timed} == \
        pytest.approx({k: v for k, v in reference["metrics"].items() if k not in timed}, abs=1e-9)
    scored = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())
    assert scored["videos"] == len(tests.video_ids) - 1
    # gcm evaluate --skip-bad scores the weights on the card as the run scored itself, the same video left out
    weights = str(Path(result["run_dir"]) / "dssad.pt")
    rows = run_evaluate(EvaluateConfig(checkpoints=(weights,), cards=("gappy/card.yaml",), data_roots=("gappy",),
                                       out="eval", skip_bad=True), quiet=True)
    assert rows[0]["videos"] == scored["videos"] and rows[0]["mAP"] == pytest.approx(scored["fused"]["mAP"], abs=1e-6)
    assert json.loads(Path("eval/skipped_videos.json").read_text()) == {
        "gappy/card.yaml in gappy": [{"video": lost, "error": skipped[1]["error"]}]}
    # a preprocessed dataset left out its own bad videos: skip_bad there is refused
    with pytest.raises(ConfigError, match="skip_bad leaves out the bad videos of a one-stage run that reads a card"):
        run_train(dataclasses.replace(config, card=None, data_root=None, data=str(prepared), name="data"), quiet=True)
    with pytest.raises(ConfigError, match="skip_bad leaves out the bad test videos of datasets read directly"):
        run_evaluate(EvaluateConfig(checkpoints=(weights,), data=(str(prepared),), out="eval-data", skip_bad=True),
                     quiet=True)


def test_one_stage_grids_and_evaluations_read_a_dataset_without_proposals(prepared, runs, small_dataset, tmp_path,
                                                                            monkeypatch):
    """gcm tune and gcm evaluate take a card and a data root (no proposal lists, no preprocessing)
    for D-SSAD, and give what gcm train gives on that dataset with the same settings."""
    monkeypatch.chdir(tmp_path)
    Path("bare").mkdir()
    for name in ("annotations.json", "features"):
        (Path("bare") / name).symlink_to(small_dataset / name)
    card = str(small_dataset / "card.yaml")
    one_stage = {"model": {"hidden": 32, "clip_snippets": 128, "window_stride": 64, "gcm_scales": [0]},
                 "train": {"optimizer": "adam", "lr": 0.003, "epochs": 2, "batch_videos": 8}}
    trained = run_train(from_dict(TrainStageConfig, {"card": card, "data_root": "bare", "out": "runs", "name": "d",
                                                     "kind": "one-stage", "one_stage": one_stage}), quiet=True)
    fused = trained["metrics"]["fused/mAP@0.5"]
    # the grid of Table 12's kind, one trial: the same run
    Path("grid.yaml").write_text("name: edges\nbase: {kind: one-stage}\ngrid:\n  one_stage.model.graph.edge_types: "
                                 "[[surrounding, semantic]]\nmetrics: [fused/mAP@0.5]\n")
    Path("tune.yaml").write_text(json.dumps({"base": {"one_stage": one_stage}}))
    assert cli_main(["tune", "grid.yaml", "--card", card, "--data-root", "bare", "--out", "tune", "--config",
                     "tune.yaml", "--quiet"]) == 0
    row = next(csv.DictReader(Path("tune/edges/edges.csv").open()))
    assert float(row["fused/mAP@0.5"]) == pytest.approx(fused, abs=1e-6)
    # evaluated on the dataset read directly, as on its preprocessed copy, as the run scored itself
    weights = trained["checkpoint"]
    assert cli_main(["evaluate", "--checkpoint", weights, "--data", str(prepared), "--card", card, "--data-root",
                     "bare", "--out", "eval", "--quiet"]) == 0
    rows = {r["data"]: r for r in csv.DictReader(Path("eval/summary.csv").open())}
    assert set(rows) == {str(prepared), f"{card} in bare"}
    for r in rows.values():
        assert float(r["mAP"].split()[-1]) == pytest.approx(fused, abs=5e-3)   # the CSV's two decimals
    assert json.loads(Path("eval/d__bare/detections.json").read_text()) == \
        json.loads(Path(f"eval/d__{prepared.name}/detections.json").read_text())
    again = EvaluateConfig(checkpoints=(weights,), cards=(card,), data_roots=("bare",), out="eval")
    with pytest.raises(FileExistsError, match="eval holds a previous evaluation: pass --overwrite"):
        run_evaluate(again)  # a finished output is not replaced unasked
    assert run_evaluate(dataclasses.replace(again, overwrite=True), quiet=True)[0]["data"] == f"{card} in bare"
    assert len(list(csv.DictReader(Path("eval/summary.csv").open()))) == 1
    ssn = str(Path(runs["gcm"]["run_dir"]) / "model.pt")
    with pytest.raises(ValueError, match="not a D-SSAD checkpoint.*read directly"):
        run_evaluate(EvaluateConfig(checkpoints=(weights, ssn), cards=(card,), data_roots=("bare",), out="refused"))
    with pytest.raises(ValueError, match="2 cards but 1 data roots"):
        run_evaluate(EvaluateConfig(checkpoints=(weights,), cards=(card, card), data_roots=("bare",), out="refused"))
    assert not Path("refused").exists()
    run = load_one_stage(weights)
    # the two-stage settings a D-SSAD run does not read, stored with other defaults (an older version's)
    older = {**to_dict(run.stage), "train": {**to_dict(run.stage.train), "epochs": 7}, "stream_lr": {"rgb": 0.5}}
    save_one_stage(Path("older.pt"), run.models, older, load_card(card), run.dims["rgb"])
    assert load_one_stage("older.pt").stage == run.stage
    # a D-SSAD for features of another width, evaluated on this dataset
    save_one_stage(Path("narrow.pt"), OneStageModels({s: DSSAD(run.stage.one_stage.model, 16, len(run.classes))
                                                      for s in run.stage.streams}),
                   to_dict(run.stage), load_card(card), 16)
    with pytest.raises(EvaluationError, match="1 of 1 evaluations failed") as failed:
        run_evaluate(EvaluateConfig(checkpoints=("narrow.pt",), cards=(card,), data_roots=("bare",), out="narrow"),
                     quiet=True)
    first = min(DatasetSource(load_card(card), "bare", "test").video_ids)
    features = Path("bare").resolve() / "features"
    assert (f"{features}/rgb/{first}.npy, {features}/flow/{first}.npy, video {first}: rgb features are "
            f"{run.dims['rgb']}-d, the model's rgb stream reads 16-d") in str(failed.value)
    # gcm report on the three: the dataset named as it was read, the test videos' timelines from the annotations
    assert cli_main(["report", "runs/d", "tune/edges", "eval", "--out", "report"]) == 0
    text = Path("report/REPORT.md").read_text()
    assert f"card `{card}` read from `{Path('bare').resolve()}`" in text   # run and grid record absolute paths
    assert "read from `bare`" not in text
    assert f"`gcm train --set kind=one-stage --card {card} --data-root {Path('bare').resolve()} --name NAME`" in text
    timelines = sorted(Path("report").glob("timeline_*.png"))
    assert len(timelines) == 2 and all(f"]({t.name})" in text for t in timelines)
    assert cli_main(["report", "runs/d", "--out", "report"]) == 2   # not replaced unasked
    assert Path("report/REPORT.md").read_text() == text
    assert cli_main(["report", "runs/d", "--out", "report", "--overwrite"]) == 0
    assert "## Evaluation summary" not in Path("report/REPORT.md").read_text()
    # beside a two-stage run, listed second, the units' graph and proposal recall come from that run's dataset
    assert cli_main(["report", "runs/d", runs["gcm"]["run_dir"], "--out", "mixed"]) == 0
    text = Path("mixed/REPORT.md").read_text()
    assert "](graph_unit.png)" in text and "](ar_an.png)" in text and "without proposals" not in text


def test_evaluation_folders_name_a_dataset_read_directly_by_its_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("GCM_DATA_ROOT", str(tmp_path / "th14"))
    datasets = datasets_of(EvaluateConfig(checkpoints=("runs/d/dssad.pt",), data=("prep/a",), cards=("thumos14",) * 2,
                                          data_roots=()))
    assert [d.name for d in datasets] == ["prep/a", "thumos14 in $GCM_DATA_ROOT", "thumos14 in $GCM_DATA_ROOT"]
    assert pair_folders([("runs/d/dssad.pt", d) for d in datasets]) == ["d__a", "d__th14-1", "d__th14-2"]


def test_evaluation_folders_name_an_epochs_checkpoint_by_its_run_and_epoch():
    """Two runs' checkpoints of one epoch were both 'epoch-0019', told apart by a number only."""
    data = EvalDataset(folder="prep/a")
    checkpoints = ["runs/gcm/epoch-0019/model.pt", "runs/mlp/epoch-0019/model.pt", "runs/gcm/model.pt",
                   "old/epoch-0003/dssad.pt"]
    assert pair_folders([(c, data) for c in checkpoints]) == ["gcm_epoch-0019__a", "mlp_epoch-0019__a", "gcm__a",
                                                              "old_epoch-0003__a"]


def test_a_dataset_named_without_a_data_root_is_read_from_gcm_data_root(small_dataset, monkeypatch, tmp_path):
    """A card given without --data-root reads $GCM_DATA_ROOT, in gcm evaluate's checks and in a
    one-stage run alike (both read 'None' as a folder name before)."""
    monkeypatch.setenv("GCM_DATA_ROOT", str(small_dataset))
    monkeypatch.chdir(tmp_path)   # nothing of the dataset here
    card = str(small_dataset / "card.yaml")
    evaluated = EvalDataset(card=card).open()[:2]
    trained = dataset_of(TrainStageConfig(kind="one-stage", card=card), None)
    for card_read, data_root in (evaluated, trained):
        assert DatasetSource(card_read, data_root, "test").root == small_dataset


def test_a_killed_worker_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(prepared, tmp_path, capsys):
    reference = run_train(stage(prepared, tmp_path, "reference", epochs=4), quiet=True)["metrics"]
    config = stage(prepared, tmp_path, "faulty", epochs=4)
    run = tmp_path / "faulty"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run_train(config, quiet=True)))
    thread.start()
    deadline = time.time() + 120
    while not (run / "epoch-0001").exists() and time.time() < deadline:  # the first checkpoint is persisted
        time.sleep(0.2)
    assert (run / "epoch-0001").exists()
    victim = int((run / "workers" / "rank-1.pid").read_text())
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    resumed = outcome["result"]["metrics"]
    assert int((run / "workers" / "rank-1.pid").read_text()) != victim, "the worker was not restarted"
    assert resumed["epoch"] == 4
    for key in ("fused/mAP@0.5", "loss_total", "flow/mAP@0.3"):
        assert resumed[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-4), key

    # --resume continues a run for more epochs, and refuses a run whose settings changed half-way
    written = (run / "config.yaml").read_text()
    changed = dataclasses.replace(config, resume=True, graph=dataclasses.replace(config.graph, l_sem=5),
                                  train=dataclasses.replace(config.train, epochs=5))
    with pytest.raises(ConfigError, match=r"trained with other settings than these \(graph\.l_sem 2 -> 5\)"):
        run_train(changed, quiet=True)
    assert (run / "config.yaml").read_text() == written
    longer = run_train(dataclasses.replace(config, resume=True, train=dataclasses.replace(config.train, epochs=5)),
                       quiet=True)
    assert longer["metrics"]["epoch"] == 5 and load_checkpoint(run / "model.pt").extra["epoch"] == 5
    # the D-SSAD settings a two-stage run does not read, written with other defaults (an older
    # version's), neither stop it from resuming nor count as a change
    stored = yaml.safe_load((run / "config.yaml").read_text())
    stored["one_stage"]["train"]["epochs"], stored["one_stage"]["model"]["hidden"] = 10, 64
    (run / "config.yaml").write_text(yaml.safe_dump(stored))
    # the command line resumes a run with its own settings, changed only where it says so: a bare
    # --resume neither trains to the default 45 epochs nor is refused for the settings it omits
    command = ["train", "--out", str(tmp_path), "--name", "faulty", "--resume", "--quiet"]
    assert cli_main(command) == 0
    assert load_checkpoint(run / "model.pt").extra["epoch"] == 5
    assert cli_main([*command, "--set", "train.epochs=6"]) == 0
    settings = yaml.safe_load((run / "config.yaml").read_text())
    assert (settings["train"]["epochs"], settings["train"]["lr"]) == (6, FAST["lr"])
    assert load_checkpoint(run / "model.pt").extra["epoch"] == 6
    # fewer epochs than it has trained would leave a record that its weights contradict
    written = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert cli_main([*command, "--set", "train.epochs=4"]) == 2
    assert "has trained 6 epochs already: --resume continues it to train.epochs >= 6" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == written


def test_an_interrupted_grid_resumes_and_runs_only_the_missing_trials(prepared, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: tiny\ngrid:\n  model.num_samples: [1, 2, 4]\nmetrics: [fused/mAP@0.5, loss_totl]\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # paths relative to where the user stands (trials run in folders of their own)
    command = [sys.executable, "-m", "workflows.cli", "tune", "grid.yaml", "--data", os.path.relpath(prepared, tmp_path),
               "--out", ".", "--set", "max_concurrent=1", "--set", "base.num_workers=1",
               "--set", "base.stream_lr={}", "--set", f"base.train={json.dumps({**FAST, 'epochs': 1})}"]
    proc = subprocess.Popen(command, cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    trials = tmp_path / "tiny" / "trials"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(trials.glob("*/metrics.json"))) < 1:
        time.sleep(0.5)
    assert len(list(trials.glob("*/metrics.json"))) >= 1
    proc.send_signal(signal.SIGINT)  # like Ctrl-C: Tune saves its state and the CLI shuts Ray down
    output, _ = proc.communicate(timeout=120)
    assert "Configuration for experiment" not in output  # Tune's own header: the CLI prints its own progress
    finished_before = {p.parent.name: p.stat().st_mtime_ns for p in trials.glob("*/metrics.json")}
    assert 1 <= len(finished_before) < 3
    started = json.loads((tmp_path / "tiny" / "trials.json").read_text())   # each trial as its run resolves it
    assert all(dict(s["inference"]["fusion"]) == load_card(prepared / "card.yaml").stream_fusion for s in started)
    with ray_session(RayConfig(num_cpus=2)):
        config = from_dict(TuneStageConfig, {"grid": str(grid), "data": str(prepared), "out": str(tmp_path),
                                             "max_concurrent": 1, "resume": True,
                                             "base": {"num_workers": 1, "stream_lr": {}, "train": {**FAST, "epochs": 1}}})
        # resumed with other settings, it would put trials of two settings into one table
        longer = dataclasses.replace(config.base, train=dataclasses.replace(config.base.train, epochs=2))
        with pytest.raises(ConfigError, match=r"was started with other trial settings \(train\.epochs 1 -> 2\)"):
            run_tune(dataclasses.replace(config, base=longer), quiet=True)
        # the command line resumes it with the settings it started with, none repeated, from elsewhere
        capsys.readouterr()
        assert cli_main(["tune", str(grid), "--out", str(tmp_path), "--resume", "--quiet"]) == 0
    with open(tmp_path / "tiny" / "tiny.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["fused/mAP@0.5"] for r in rows)
    assert "no trial reported ['loss_totl']" in capsys.readouterr().err   # a typo: its column is empty
    after = {p.parent.name: p.stat().st_mtime_ns for p in trials.glob("*/metrics.json")}
    assert len(after) == 3
    for name, stamp in finished_before.items():
        assert after[name] == stamp, f"finished trial {name} was run again"
    table = (tmp_path / "tiny" / "tiny.md").read_text()
    assert "num_samples" in table and table.count("\n|") >= 4


def test_a_grid_with_several_seeds_gives_each_setting_its_mean_and_spread(prepared, tmp_path):
    """seeds=2: each setting trains at the recipe's seed and the next, in trials of their own, and
    its table cell is the mean and sample standard deviation of its two runs' own test mAP; a grid
    that varies the seed itself is refused."""
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: seeded\ngrid:\n  model.num_samples: [1, 4]\nmetrics: [fused/mAP@0.5]\n")
    assert cli_main(["tune", str(grid), "--data", str(prepared), "--out", str(tmp_path), "--seeds", "2", "--quiet",
                     "--set", "base.num_workers=1", "--set", "base.streams=[flow]", "--set", "base.stream_lr={}",
                     "--set", f"base.train={json.dumps({**FAST, 'epochs': 1})}"]) == 0
    folder = tmp_path / "seeded"
    with open(folder / "seeded.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model.num_samples"] for r in rows] == ["1", "4"] and [r["seeds"] for r in rows] == ["2", "2"]
    first = TrainStageConfig().train.seed
    for row in rows:
        runs = [folder / "trials" / f"num_samples={row['model.num_samples']}_seed={seed}" for seed in (first, first + 1)]
        assert [yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] for run in runs] == [first, first + 1]
        found = [json.loads((run / "metrics.json").read_text())["metrics"]["fused/mAP@0.5"] for run in runs]
        assert found[0] != found[1]   # the seed reached the run
        assert float(row["fused/mAP@0.5"]) == pytest.approx((found[0] + found[1]) / 2, abs=1e-9)
        assert float(row["std fused/mAP@0.5"]) == pytest.approx(abs(found[0] - found[1]) / 2 ** 0.5, abs=1e-9)
    assert "± " in (folder / "seeded.md").read_text()
    grid.write_text("name: reseeded\ngrid:\n  train.seed: [0, 1]\n")
    with pytest.raises(ConfigError, match=r"varies train\.seed and seeds=2"):
        run_tune(TuneStageConfig(grid=str(grid), data=str(prepared), out=str(tmp_path), seeds=2), quiet=True)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def bars_of(fig):
    from matplotlib.container import BarContainer

    return next(c for c in fig.axes[0].containers if isinstance(c, BarContainer))


def test_report_renders_every_figure_and_links_it(prepared, runs, tmp_path):
    import matplotlib.pyplot as plt

    from gcm_core.data.formats import Detections, read_detections
    from workflows import report
    from workflows.tune import Grid, grid_csv, grid_markdown

    grid = Grid("edges", "Edges", {}, {"graph.edge_types": [["contextual"], []]}, {}, ["fused/mAP@0.5"])
    rows = [{"trial": {"graph.edge_types": ["contextual"]}, "metrics": {"fused/mAP@0.5": 12.5}, "error": ""},
            {"trial": {"graph.edge_types": []}, "metrics": {"fused/mAP@0.5": 10.0}, "error": ""}]
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "edges.md").write_text(grid_markdown(grid, rows))
    (tmp_path / "tune" / "edges.csv").write_text(grid_csv(grid, rows))
    folders = [Path(r["run_dir"]) for r in runs.values()] + [tmp_path / "tune"]
    path = report.write_report(folders, tmp_path / "out")
    text = path.read_text()
    figures = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert {"map_vs_tiou.png", "graph_unit.png", "ar_an.png", "ablation_edges.png"} <= set(figures)
    assert sum(f.startswith("timeline_") for f in figures) == 2
    for name in figures:
        assert f"]({name})" in text, f"{name} is not linked from REPORT.md"
        width, height = png_size(tmp_path / "out" / name)
        assert 400 <= width <= 3000 and 200 <= height <= 3000, (name, width, height)
    for section in text.split("\n## ")[1:]:
        if "| " in section and "summary" not in section.lower():
            assert "protocol" in section.lower() or "mAP@0.5" in section, section[:80]

    # the figures plot what they should: one line per method, one bar per trial, one row per method
    found = report.discover(folders)
    fig = report.plot_map_vs_tiou(found["runs"])
    assert len(fig.axes[0].lines) == 2
    plt.close(fig)
    fig = report.plot_ablation(tmp_path / "tune" / "edges.csv")
    assert len(fig.axes[0].patches) == 2 and bars_of(fig).errorbar is None
    plt.close(fig)
    seeded = [{**r, "std": {"fused/mAP@0.5": 0.5}, "seeds": 3} for r in rows]   # a grid run with seeds=3
    (tmp_path / "seeded.csv").write_text(grid_csv(grid, seeded))
    fig = report.plot_ablation(tmp_path / "seeded.csv")
    assert [p.get_height() for p in fig.axes[0].patches] == [12.5, 10.0]   # the means, not the spread
    (_, low), (_, high) = bars_of(fig).errorbar.lines[2][0].get_segments()[0]
    assert (low, high) == pytest.approx((12.0, 13.0))   # the first bar's error bar: mean +- std
    plt.close(fig)
    videos = read_videos(prepared, "test")
    truth = videos[0].as_video(load_card(prepared / "card.yaml").classes)
    detections = {r.label: read_detections(r.path / "detections.json") for r in found["runs"]}
    fig = report.plot_timeline(truth, detections)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][0] == "ground truth"
    assert len(fig.axes[0].get_yticklabels()) == 3
    assert len(fig.axes[0].patches) == videos[0].gt.shape[0] + 2 * 8  # each method's top 8
    plt.close(fig)
    # an ActivityNet video spelled v_<id> in the dataset, bare in the result JSON (the official form)
    bsn_spelled = dataclasses.replace(truth, id="v_abcdefghijk")
    bare = {name: Detections(["abcdefghijk" if v == truth.id else v for v in d.video], d.label, d.start,
                             d.end, d.score) for name, d in detections.items()}
    fig = report.plot_timeline(bsn_spelled, bare)
    assert len(fig.axes[0].patches) == videos[0].gt.shape[0] + 2 * 8
    plt.close(fig)


def _mean_of_two(rank: int, folder: str) -> None:
    from workflows.train_worker import mean_over_workers

    losses = {"loss_cls": 1.0 + rank, "loss_total": 10.0 * (rank + 1)}   # rank 0: 1, 10; rank 1: 2, 20
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(mean_over_workers(losses, 2, torch.device("cpu"))))


def test_a_run_logs_its_losses_averaged_over_the_workers(tmp_path):
    """Each worker computes its epoch's losses on its share of the videos; the run logs their mean
    (it logged rank 0's)."""
    run_two_workers(_mean_of_two, str(tmp_path))
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"loss_cls": 1.5, "loss_total": 15.0}
