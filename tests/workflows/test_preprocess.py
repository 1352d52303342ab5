"""Preprocessing on Ray Data: correct shards, the GPU path, restarts, broken videos (and the GPU path
of evaluation, which needs the same Ray declaring a GPU)."""
from __future__ import annotations

import dataclasses
import json
import shutil
import time

import numpy as np
import pytest
import torch

from gcm_core.candidates import CandidateCaps
from gcm_core.data.cards import load_card
from gcm_core.data.dataset import DatasetSource
from gcm_core.data.model import FormatError
from gcm_core.data.prepared import prepare_video
from workflows.config import PreprocessConfig, RayConfig
from workflows.preprocess import FAILURES, PreprocessError, balanced_order, run_preprocess, shard_count
from workflows.ray_env import ray_session
from workflows.shards import load_manifest, read_shard_rows, read_videos, row_to_video, video_to_row, write_shard


@pytest.fixture(scope="module", autouse=True)
def ray_with_a_logical_gpu():
    """A local Ray declaring one GPU: the GPU path of Ray Data runs, on the CPU (CUDA is absent)."""
    with ray_session(RayConfig(num_cpus=2, num_gpus=1)):
        yield


def config(small_dataset, out, **kw):
    return PreprocessConfig(card=str(small_dataset / "card.yaml"), data_root=str(small_dataset), out=str(out),
                            videos_per_shard=8, num_workers=1, **kw)


def test_shards_hold_every_video_once_as_prepared_in_process(small_dataset, tmp_path):
    began = time.time()
    manifest = run_preprocess(config(small_dataset, tmp_path), quiet=True)
    ended = time.time()
    card = load_card(small_dataset / "card.yaml")
    for role, n in (("train", 48), ("test", 24)):
        ids = [v for s in manifest["shards"] if s["role"] == role for v in s["videos"]]
        assert sorted(ids) == DatasetSource(card, small_dataset, role).video_ids and len(ids) == n
    assert manifest["counts"]["train"]["videos"] == 48 and manifest["skipped"] == []
    assert all(s["worker"]["gpus"] for s in manifest["shards"]), "the GPU path was not taken"
    # one worker writes the shards one after another, each within the run
    spans = sorted((s["worker"]["started"], s["worker"]["finished"]) for s in manifest["shards"])
    assert began <= spans[0][0] and spans[-1][1] <= ended
    assert all(start <= end <= next_start for (start, end), (next_start, _) in zip(spans, spans[1:] + [(ended, 0)]))
    # one video, read back from its shard, equals the in-process preparation
    source = DatasetSource(card, small_dataset, "train")
    stored = read_videos(tmp_path, "train", manifest)[3]
    direct = prepare_video(source.load(stored.video_id), card.classes, True)
    assert torch.equal(stored.intervals, direct.intervals)
    assert torch.equal(stored.features["flow"]["three_part"], direct.features["flow"]["three_part"])
    assert torch.equal(stored.candidates["rgb"].edge_index, direct.candidates["rgb"].edge_index)
    assert torch.equal(stored.labels.role, direct.labels.role)
    tested = read_videos(tmp_path, "test", manifest)[0]   # and a test video's proposal scores
    source = DatasetSource(card, small_dataset, "test")
    direct = prepare_video(source.load(tested.video_id), card.classes, False, max_units=card.units_per_video_test)
    assert torch.equal(tested.proposal_scores, direct.proposal_scores) and stored.proposal_scores is None
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "card.yaml").is_file()
    assert not list(tmp_path.glob("shards/.*.tmp")), "a temporary file was left behind"


def test_a_shard_row_keeps_a_test_videos_proposal_scores_and_a_training_video_has_none(small_prepared, tmp_path):
    """inference.proposal_score reads the test units' proposal scores back from the shards (a
    scored list's, not the 1s of the small benchmark's SSN lists)."""
    tested, trained = small_prepared["test"][0], small_prepared["train"][0]
    scores = torch.rand(tested.num_units, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    write_shard(tmp_path / "test.parquet", [video_to_row(dataclasses.replace(tested, proposal_scores=scores), "test")])
    write_shard(tmp_path / "train.parquet", [video_to_row(trained, "train")])
    dims = {f"{s}:{part}": f.shape[1] for s, parts in tested.features.items() for part, f in parts.items()}
    caps = tested.candidates["rgb"].caps
    back = row_to_video(read_shard_rows(tmp_path / "test.parquet")[0], dims, caps)
    assert torch.equal(back.proposal_scores, scores) and torch.equal(back.intervals, tested.intervals)
    assert trained.proposal_scores is None
    assert row_to_video(read_shard_rows(tmp_path / "train.parquet")[0], dims, caps).proposal_scores is None


def test_a_rerun_skips_finished_shards_and_overwrite_redoes_them(small_dataset, tmp_path):
    run_preprocess(config(small_dataset, tmp_path), quiet=True)
    shards = sorted(tmp_path.glob("shards/*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    shards[0].unlink()  # a shard lost (e.g. an interrupted run): only it is redone
    run_preprocess(config(small_dataset, tmp_path), quiet=True)
    again = sorted(tmp_path.glob("shards/*.parquet"))
    assert [p.name for p in again] == [p.name for p in shards]
    assert [p.stat().st_mtime_ns for p in again[1:]] == stamps[1:]
    # a rerun preparing otherwise (other settings, another card) would mix two preparations: refused
    for other, named in ((config(small_dataset, tmp_path, caps=CandidateCaps(sur_k=12)), "caps.sur_k 8 -> 12"),
                         (dataclasses.replace(config(small_dataset, tmp_path), card="synthetic"), "the card")):
        again[0].unlink()
        with pytest.raises(FileExistsError, match=f"holds shards prepared otherwise: {named}.*--overwrite"):
            run_preprocess(other, quiet=True)
        assert sorted(tmp_path.glob("shards/*.parquet")) == again[1:]  # nothing written
        run_preprocess(config(small_dataset, tmp_path), quiet=True)     # the first settings go on
    run_preprocess(config(small_dataset, tmp_path, overwrite=True), quiet=True)
    assert all(p.stat().st_mtime_ns > s for p, s in zip(sorted(tmp_path.glob("shards/*.parquet"))[1:], stamps[1:]))


def test_a_wrong_data_root_stops_before_anything_is_written(small_dataset, tmp_path):
    with pytest.raises(FormatError, match=f"no such file under the data root {tmp_path}"):
        run_preprocess(dataclasses.replace(config(small_dataset, tmp_path / "out"), data_root=str(tmp_path)),
                       quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing, problem", [
    ("features/flow", "no flow features folder under the data root"),
    ("proposals/test_proposal_list.txt", "no test proposals under the data root"),
])
def test_a_data_root_without_what_every_video_reads_is_one_error(small_dataset, tmp_path, missing, problem):
    """Not one error per video (each with the same message) after every worker ran."""
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data, symlinks=True)
    assert (data / missing).exists()
    shutil.rmtree(data / missing) if (data / missing).is_dir() else (data / missing).unlink()
    with pytest.raises(FormatError, match=f"^{data / missing}: {problem} {data}"):
        run_preprocess(config(data, tmp_path / "out"), quiet=True)
    assert not (tmp_path / "out").exists()


def test_failures_past_twenty_are_listed_in_a_file(small_dataset, tmp_path):
    """Feature files named otherwise than the card says fail every video: the error shows the
    first 20 and the file lists all of them (with --skip-bad too: a dataset of no video is no
    result); a later successful run removes the file."""
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data, symlinks=True)
    renamed = sorted((data / "features" / "rgb").glob("*.npy"))
    for path in renamed:
        path.rename(path.with_name("x" + path.name))
    with pytest.raises(PreprocessError) as err:
        run_preprocess(config(data, tmp_path / "out"), quiet=True)
    listed = (tmp_path / "out" / FAILURES).read_text().splitlines()
    assert len(listed) == len(renamed) == 72
    assert sorted(line.split(":")[0] for line in listed) == sorted(p.stem for p in renamed)
    assert all(line.endswith("feature file missing") for line in listed)
    with pytest.raises(PreprocessError, match=r"^every video \(72\) could not be prepared"):
        run_preprocess(config(data, tmp_path / "out", skip_bad=True), quiet=True)   # no dataset of no video
    assert not (tmp_path / "out" / "manifest.json").exists()
    lines = str(err.value).splitlines()
    assert lines[0] == "every video (72) could not be prepared: fix the input and rerun:" and len(lines) == 1 + 20 + 1
    assert lines[-1] == f"  ... and 52 more, all listed in {tmp_path / 'out' / FAILURES}"
    for path in renamed:
        path.with_name("x" + path.name).rename(path)
    run_preprocess(config(data, tmp_path / "out"), quiet=True)
    assert not (tmp_path / "out" / FAILURES).exists()


def test_a_broken_video_is_named_and_other_shards_stay(small_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    source = DatasetSource(load_card(data / "card.yaml"), data, "test")
    broken = source.video_ids[5]
    feats = np.load(source.feature_path(broken, "rgb"))
    feats[2, 2] = np.nan
    np.save(source.feature_path(broken, "rgb"), feats)
    with pytest.raises(PreprocessError, match=broken) as err:
        run_preprocess(config(data, tmp_path / "out"), quiet=True)
    assert "non-finite" in str(err.value)
    written = list((tmp_path / "out" / "shards").glob("*.parquet"))
    assert len(written) >= 8  # every shard but the broken video's
    assert not (tmp_path / "out" / "manifest.json").exists()
    manifest = run_preprocess(config(data, tmp_path / "out", skip_bad=True), quiet=True)
    assert [s["video"] for s in manifest["skipped"]] == [broken]
    assert "non-finite" in manifest["skipped"][0]["error"]
    ids = [v for s in manifest["shards"] for v in s["videos"]]
    assert broken not in ids and len(ids) == len(set(ids)) == 71
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["test"]["videos"] == 23
    assert load_manifest(tmp_path / "out")["regression_stats"]["std"][0] > 0



def test_skipped_videos_are_listed_where_no_video_of_their_shard_is_left(small_dataset, tmp_path):
    """--skip-bad lists every video left out in the manifest, also those of shards in which no
    video could be prepared (such a shard is not written, and its videos were not listed: a data
    root laid out for 8 of THUMOS'14's 412 videos listed 112 of the 404 it left out). A rerun tries
    those shards again and lists them again."""
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    source = DatasetSource(load_card(data / "card.yaml"), data, "test")
    for video in source.video_ids:
        source.feature_path(video, "flow").unlink()
    manifest = run_preprocess(config(data, tmp_path / "out", skip_bad=True), quiet=True)
    assert sorted(s["video"] for s in manifest["skipped"]) == source.video_ids
    assert all("feature file missing" in s["error"] for s in manifest["skipped"])
    assert set(manifest["counts"]) == {"train"} and {s["role"] for s in manifest["shards"]} == {"train"}
    assert run_preprocess(config(data, tmp_path / "out", skip_bad=True), quiet=True) == manifest


def test_shards_are_balanced_over_the_workers(small_dataset, tmp_path):
    # by hand: ceil(72 / 5) = 15 -> 16 for 2 workers; 413 / 32 -> 13 -> 14; never more shards than videos
    assert [shard_count(72, 5, 2), shard_count(413, 32, 2), shard_count(413, 32, 1), shard_count(3, 16, 4)] \
        == [16, 14, 13, 3]
    run_preprocess(PreprocessConfig(card=str(small_dataset / "card.yaml"), data_root=str(small_dataset),
                                    out=str(tmp_path), videos_per_shard=5, num_workers=2, use_gpu=False), quiet=True)
    sizes = [len(json.loads(p.read_text())["summary"]["video_id"]) for p in (tmp_path / "shards").glob("*.json")]
    assert sorted(sizes) == [4] * 8 + [5] * 8   # the 72 videos of the small benchmark in 16 shards


def test_long_videos_spread_over_the_shards_costliest_first():
    durations = {"v0": 10, "v1": 100, "v2": 20, "v3": 30, "v4": 5, "v5": 6, "v6": 7, "v7": 8}
    rows = [{"video_id": v, "role": "train", "duration": d} for v, d in durations.items()]
    # by hand, 2 shards of 4, longest first to the lighter shard with room (duration^2 summed):
    # v1 -> A (10000); v3, v2, v0, v7 -> B (900, 1300, 1400, 1464: full); v6, v5, v4 -> A
    assert [r["video_id"] for r in balanced_order(rows, 2)] == ["v1", "v4", "v5", "v6", "v0", "v2", "v3", "v7"]
    tests = [{"video_id": f"t{k}", "role": "test", "duration": d} for k, d in enumerate([3, 50, 4, 2, 9])]
    ordered = balanced_order(rows + tests, 3)  # blocks of 5, 4, 4 rows: the second holds both roles
    assert [r["role"] for r in ordered] == ["train"] * 8 + ["test"] * 5
    assert sorted(r["video_id"] for r in ordered) == sorted([*durations, *(f"t{k}" for k in range(5))])
    assert ordered[0]["video_id"] == "v1" and ordered[8]["video_id"] == "t1"  # each role's longest first


def test_evaluation_and_detection_take_a_share_of_a_gpu_where_the_cluster_has_one(small_dataset, tmp_path, capsys):
    """The same logical-GPU Ray: each evaluation asks for gpus_per_pair of a GPU and runs on the
    one it is given (the CPU here, CUDA being absent), with the CPU evaluation's results; so do
    gcm detect's tasks, with a quarter of one each."""
    from gcm_core.checkpoint import Checkpoint, save_checkpoint
    from gcm_core.data.sampling import RegressionStats
    from gcm_core.detectors import ModelConfig
    from gcm_core.engine import build_heads
    from gcm_core.graph import GraphSpec
    from gcm_core.postprocess import InferenceConfig
    from workflows.config import EvaluateConfig
    from workflows.evaluate import run_evaluate

    prepared = tmp_path / "prep"
    run_preprocess(config(small_dataset, prepared), quiet=True)
    card = load_card(small_dataset / "card.yaml")
    torch.manual_seed(0)
    widths = load_manifest(prepared)["dims"]   # an untrained head: the same weights on either path
    heads = build_heads(ModelConfig(), ["rgb", "flow"], {s: widths[f"{s}:body"] for s in ("rgb", "flow")},
                        card.num_classes)
    save_checkpoint(tmp_path / "model.pt", Checkpoint(list(card.classes), ModelConfig(), GraphSpec(), InferenceConfig(),
                                                      dict(card.snippets), heads,
                                                      RegressionStats(torch.zeros(2), torch.ones(2))))
    runs = {use_gpu: run_evaluate(EvaluateConfig(checkpoints=(str(tmp_path / "model.pt"),), data=(str(prepared),),
                                                 out=str(tmp_path / f"eval-{use_gpu}"), use_gpu=use_gpu), quiet=True)[0]
            for use_gpu in (None, False)}
    assert runs[None]["gpus"] and runs[None]["device"] == "cpu", "the GPU path was not taken"
    assert runs[False]["gpus"] == []
    assert runs[None]["mAP"] == runs[False]["mAP"]

    # gcm detect's Ray tasks each ask for a quarter of the GPU and give what one process gives
    from workflows.cli import main

    folder = tmp_path / "features"
    for s in ("rgb", "flow"):
        (folder / s).mkdir(parents=True)
        for f in sorted((small_dataset / "features" / s).glob("*.npy"))[:4]:
            (folder / s / f.name).symlink_to(f)
    detect = ["detect", "--checkpoint", str(tmp_path / "model.pt"), "--features-dir", str(folder), "--proposals",
              str(small_dataset / "proposals/test_proposal_list.txt")]
    capsys.readouterr()
    assert main([*detect, "--workers", "2", "--out", str(tmp_path / "tasks.json")]) == 0
    assert "detect: 4 videos as Ray tasks on GPUs (0.25 of one each)" in capsys.readouterr().err
    assert main([*detect, "--device", "cpu", "--out", str(tmp_path / "here.json")]) == 0
    assert "detect: 4 videos in this process on cpu" in capsys.readouterr().err
    assert (tmp_path / "tasks.json").read_text() == (tmp_path / "here.json").read_text()
    # Ray, not the command, picks a task's GPU
    assert main([*detect, "--workers", "2", "--device", "cuda:1", "--out", str(tmp_path / "one.json")]) == 2
    assert "--device 'cuda:1' with Ray tasks: Ray gives each task its GPU" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"gpus_per_pair must be in \(0, 1\], got 2"):
        EvaluateConfig(gpus_per_pair=2)
