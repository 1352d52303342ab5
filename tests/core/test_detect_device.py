"""gcm detect's --device and --set inference.*: a GPU torch does not see is refused by name,
post-processing follows what is asked, and on a GPU both kinds of checkpoint give the CPU's
detections (that test runs where CUDA is present)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gcm_core.checkpoint import Checkpoint, save_checkpoint
from gcm_core.data.cards import load_card
from gcm_core.data.sampling import SamplingConfig
from gcm_core.detectors import ModelConfig
from gcm_core.detectors.dssad import DSSAD
from gcm_core.engine import TrainConfig, fit
from gcm_core.graph import GraphSpec
from gcm_core.postprocess import InferenceConfig
from workflows.cli import main
from workflows.config import TrainStageConfig, with_card_fusion
from workflows.settings import from_dict, to_dict
from workflows.train_one_stage import OneStageModels, save_one_stage

STREAMS = ("rgb", "flow")


@pytest.fixture(scope="module")
def checkpoints(small_prepared, small_dataset, tmp_path_factory):
    """A briefly trained two-stage SSN+GCM and an untrained D-SSAD+GCM, and a folder of three
    test videos' features."""
    folder = tmp_path_factory.mktemp("detect_device")
    card = small_prepared["card"]
    heads, stats = fit(small_prepared["train"], STREAMS, ModelConfig(), GraphSpec(),
                       TrainConfig(epochs=3, lr=0.05, batch_videos=8, sampling=SamplingConfig(per_video=16), seed=0),
                       card.num_classes)
    save_checkpoint(folder / "model.pt", Checkpoint(list(card.classes), ModelConfig(), GraphSpec(),
                                                    InferenceConfig(top_k=50), dict(card.snippets), heads, stats))
    stage = with_card_fusion(from_dict(TrainStageConfig, {"kind": "one-stage", "one_stage": {"model": {
        "hidden": 32, "clip_snippets": 128, "window_stride": 64, "gcm_scales": [0, 2]}}}), card)
    dim = small_prepared["test"][0].features["rgb"]["body"].shape[1]
    torch.manual_seed(0)
    models = OneStageModels({s: DSSAD(stage.one_stage.model, dim, card.num_classes) for s in STREAMS})
    save_one_stage(folder / "dssad.pt", models, to_dict(stage), load_card(small_dataset / "card.yaml"), dim)
    for stream in STREAMS:
        (folder / "features" / stream).mkdir(parents=True)
        for video in small_prepared["test"][:3]:
            name = f"{video.video_id}.npy"
            np.save(folder / "features" / stream / name, np.load(small_dataset / "features" / stream / name))
    return folder


def detect(checkpoints, small_dataset, weights: str, device: str, out: str, more: tuple[str, ...] = ()) -> int:
    """gcm detect over the folder of three videos (a two-stage head reads the SSN test list)."""
    two_stage = weights == "model.pt"
    proposals = ["--proposals", str(small_dataset / "proposals/test_proposal_list.txt")] if two_stage else []
    return main(["detect", "--checkpoint", str(checkpoints / weights), "--features-dir", str(checkpoints / "features"),
                 *proposals, "--device", device, "--out", str(checkpoints / out), "--overwrite", *more])


def test_a_gpu_torch_does_not_see_is_refused_by_name(checkpoints, small_dataset, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        assert detect(checkpoints, small_dataset, "model.pt", device, "refused.json") == 2
        assert (f"gcm detect: error: --device {device}: torch sees 0 CUDA device(s) on this machine"
                in capsys.readouterr().err)
    assert detect(checkpoints, small_dataset, "model.pt", "gpu", "refused.json") == 2
    assert "--device 'gpu': expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert not (checkpoints / "refused.json").exists()
    # auto falls back to the CPU where there is no GPU
    for device in ("auto", "cpu"):
        assert detect(checkpoints, small_dataset, "model.pt", device, f"{device}.json") == 0
    assert (checkpoints / "auto.json").read_text() == (checkpoints / "cpu.json").read_text()


@pytest.mark.parametrize("weights", ["model.pt", "dssad.pt"])
def test_detect_post_processes_as_asked(checkpoints, small_dataset, weights, capsys):
    """--set inference.top_k=3 in place of the checkpoint's 50 / 200: each video keeps its first
    three detections (NMS is greedy, best first); other keys than inference's, fusion weights of
    0 in all, and of a stream the checkpoint does not have, are refused."""
    assert detect(checkpoints, small_dataset, weights, "cpu", "all.json") == 0
    with_top_3 = ["--set", "inference.top_k=3"]
    assert detect(checkpoints, small_dataset, weights, "cpu", "three.json", with_top_3) == 0
    every, three = (json.loads((checkpoints / name).read_text())["results"] for name in ("all.json", "three.json"))
    assert three == {video: found[:3] for video, found in every.items()}
    assert all(len(found) > 3 for found in every.values())
    capsys.readouterr()
    assert detect(checkpoints, small_dataset, weights, "cpu", "refused.json", ["--set", "graph.k_sur=3"]) == 2
    assert "gcm detect --set takes inference.KEY=VALUE (its post-processing), got graph" in capsys.readouterr().err
    # streams weighed 0 in all would fuse into NaN scores
    assert detect(checkpoints, small_dataset, weights, "cpu", "refused.json",
                  ["--set", "inference.fusion={rgb: 0, flow: 0}"]) == 2
    assert "inference.fusion weighs the streams ['rgb', 'flow'] 0 in all" in capsys.readouterr().err
    # a misspelt stream would be left out, the one named weighing 1
    assert detect(checkpoints, small_dataset, weights, "cpu", "refused.json",
                  ["--set", "inference.fusion={rgb: 2, Flow: 3}"]) == 2
    assert "inference.fusion weighs ['Flow'], which are not streams of" in capsys.readouterr().err
    assert not (checkpoints / "refused.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="detecting on a GPU needs a CUDA device")
@pytest.mark.parametrize("weights", ["model.pt", "dssad.pt"])
def test_detect_on_the_gpu_gives_the_cpus_detections(checkpoints, small_dataset, weights, monkeypatch):
    """Each video's ranked scores agree; the detections at those ranks are the same but where two
    near-equal scores (within float32 rounding, as overlapping proposals of a briefly trained
    head have) trade places, which moves a refined boundary or a label at that rank."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # D-SSAD's convolutions
    found = {}
    for device in ("cpu", "cuda"):
        assert detect(checkpoints, small_dataset, weights, device, f"{device}-{weights}.json") == 0
        found[device] = json.loads((checkpoints / f"{device}-{weights}.json").read_text())["results"]
    assert list(found["cuda"]) == list(found["cpu"]) and len(found["cpu"]) == 3
    same = total = 0
    for video, expected in found["cpu"].items():
        got = found["cuda"][video]
        assert len(got) == len(expected) > 0, video
        np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in expected], rtol=1e-5,
                                   err_msg=video)
        same += sum(g["label"] == e["label"] and np.allclose(g["segment"], e["segment"], atol=1e-3)
                    for g, e in zip(got, expected))
        total += len(expected)
    assert same >= 0.9 * total, (same, total)
