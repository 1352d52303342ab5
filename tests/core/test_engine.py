"""Training and inference end to end on the small synthetic benchmark (one process, CPU)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from gcm_core.checkpoint import Checkpoint, detect_video, load_checkpoint, save_checkpoint, video_layout
from gcm_core.data.dataset import DatasetSource
from gcm_core.data.model import Detections, Proposals
from gcm_core.data.prepared import prepare_video
from gcm_core.data.sampling import RegressionStats, SamplingConfig
from gcm_core.detectors import ModelConfig
from gcm_core.engine import (
    TrainConfig, UnitDataset, build_heads, detections_of, evaluate, fit, predict, split_detections,
)
from gcm_core.graph import GraphSpec
from gcm_core.postprocess import InferenceConfig, UnitScores, VideoLabels, rescore_with_video_labels

FAST = TrainConfig(epochs=4, lr=0.05, batch_videos=8, sampling=SamplingConfig(per_video=16), seed=3)


def train(prepared, streams=("flow",), model=ModelConfig(), config=FAST, **kw):
    return fit(prepared["train"], streams, model, GraphSpec(), config, prepared["card"].num_classes, **kw)


def test_training_is_deterministic_and_lowers_the_loss(small_prepared):
    history_a, history_b = [], []
    model_a, _ = train(small_prepared, on_epoch=lambda e, m, _: history_a.append(m))
    model_b, _ = train(small_prepared, on_epoch=lambda e, m, _: history_b.append(m))
    assert history_a == history_b
    for p, q in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(p, q)
    assert history_a[-1]["loss_total"] < history_a[0]["loss_total"]


@pytest.mark.parametrize("model", [ModelConfig(), ModelConfig(act_module="mlp", comp_module="mlp"),
                                   ModelConfig(detector="single"), ModelConfig(comp_input="extended")])
def test_trained_heads_detect_far_better_than_untrained_ones(small_prepared, model):
    card = small_prepared["card"]
    comp = model.comp_input if model.detector == "ssn" else None
    test_set = UnitDataset(small_prepared["test"], "flow", GraphSpec(), comp)

    def map_after(epochs):
        config = TrainConfig(epochs=epochs, lr=0.05, batch_videos=8, sampling=SamplingConfig(per_video=16))
        heads, stats = train(small_prepared, model=model, config=config)
        scores = predict(heads["flow"], test_set, stats)
        assert scores[0].scores.shape == (small_prepared["test"][0].num_units, card.num_classes)
        dets = detections_of(small_prepared["test"], {"flow": scores}, card.classes, InferenceConfig(top_k=100))
        return evaluate(small_prepared["test"], dets, card.classes, "thumos14", [0.3]).map.item()

    untrained, trained = map_after(0), map_after(10)
    assert trained > max(3 * untrained, untrained + 0.05), (untrained, trained)


def test_a_video_is_tested_on_its_best_scored_proposals_as_many_as_its_checkpoint_says(small_prepared, small_dataset,
                                                                                      tmp_path):
    """A dataset's test units are its videos' best-scored proposals, best first (card
    units_per_video_test: the first ones of a list without scores, as SSN's); gcm detect scores a
    new video's as many, chosen so, as its checkpoint's test split was (it scored every proposal)."""
    card = small_prepared["card"]
    source = DatasetSource(card, small_dataset, "test")
    inputs = source.load(source.video_ids[0])
    scores = np.random.default_rng(0).permutation(len(inputs.proposals)).astype(float)
    scored = dataclasses.replace(inputs, proposals=Proposals(inputs.proposals.start, inputs.proposals.end, scores))
    best = np.argsort(-scores)[:7]   # the 7 highest scores, best first (no ties)
    prepared = prepare_video(scored, card.classes, train=False, max_units=7)
    np.testing.assert_array_equal(prepared.intervals.numpy(), inputs.proposals.intervals[best])
    first = prepare_video(inputs, card.classes, train=False, max_units=7)   # the SSN list: no scores
    np.testing.assert_array_equal(first.intervals.numpy(), inputs.proposals.intervals[:7])

    heads, stats = train(small_prepared, streams=("rgb", "flow"))
    path = tmp_path / "model.pt"
    save_checkpoint(path, Checkpoint(list(card.classes), ModelConfig(), GraphSpec(), InferenceConfig(top_k=50),
                                     {**card.snippets}, heads, stats, units_per_video=7))
    loaded = load_checkpoint(path)
    assert loaded.units_per_video == 7
    found = detect_video(loaded, inputs.features, inputs.proposals.intervals, inputs.video.id, fps=inputs.video.fps,
                         duration=inputs.video.duration, scores=scores)
    per_stream = {s: predict(head, UnitDataset([prepared], s, GraphSpec(), "three_part"), stats)
                  for s, head in heads.items()}
    reference = detections_of([prepared], per_stream, card.classes, InferenceConfig(top_k=50))
    assert found.label == reference.label
    np.testing.assert_allclose(found.score, reference.score, rtol=1e-5)


def test_proposal_scores_weigh_the_unit_scores_as_in_the_papers_activitynet_rows(small_prepared, small_dataset):
    """inference.proposal_score: each unit's class scores times its proposal's own score (Table 2:
    s_gcm x s_bsn); test units carry their proposals' scores, best first (1 for a list without)."""
    card = small_prepared["card"]
    source = DatasetSource(card, small_dataset, "test")
    inputs = source.load(source.video_ids[0])
    scores = np.random.default_rng(1).uniform(0.1, 1.0, len(inputs.proposals))
    scored = dataclasses.replace(inputs, proposals=Proposals(inputs.proposals.start, inputs.proposals.end, scores))
    prepared = prepare_video(scored, card.classes, train=False, max_units=20)
    np.testing.assert_array_equal(prepared.proposal_scores.numpy(), np.sort(scores)[::-1][:20])
    unscored = prepare_video(inputs, card.classes, train=False)   # the SSN list: no scores
    assert torch.equal(unscored.proposal_scores, torch.ones(len(inputs.proposals), dtype=torch.float64))

    torch.manual_seed(0)
    dims = {s: prepared.features[s]["body"].shape[1] for s in card.streams}
    heads = build_heads(ModelConfig(), card.streams, dims, card.num_classes).eval()
    stats = RegressionStats(torch.zeros(2), torch.ones(2))
    comp = ModelConfig().completeness_features
    per_stream = {s: predict(heads[s], UnitDataset([prepared], s, GraphSpec(), comp), stats) for s in card.streams}
    weighed = {s: [UnitScores(u.scores * prepared.proposal_scores[:, None], u.segments) for u in units]
               for s, units in per_stream.items()}
    config = InferenceConfig(top_k=40)
    want = detections_of([prepared], weighed, card.classes, config)
    got = detections_of([prepared], per_stream, card.classes, dataclasses.replace(config, proposal_score=True))
    plain = detections_of([prepared], per_stream, card.classes, config)
    assert got.label == want.label and got.label != plain.label
    np.testing.assert_allclose(got.score, want.score, rtol=1e-12)
    np.testing.assert_allclose(got.start, want.start, rtol=1e-12)
    # a video prepared before the scores were kept (a dataset preprocessed earlier) is named
    with pytest.raises(ValueError, match=f"video {prepared.video_id} has no proposal scores"):
        detections_of([dataclasses.replace(prepared, proposal_scores=None)], per_stream, card.classes,
                      dataclasses.replace(config, proposal_score=True))


def _zeroed_but_top(scores: torch.Tensor, video_scores: np.ndarray, top: int) -> torch.Tensor:
    """The paper's definition of decoding with video labels, by hand: every class but the video's
    ``top`` best zeroed, those scaled by their video scores."""
    factor = np.zeros_like(video_scores)
    best = np.argsort(-video_scores)[:top]
    factor[best] = video_scores[best]
    return scores * torch.as_tensor(factor)


def _positive(dets: Detections) -> Detections:
    keep = np.flatnonzero(dets.score > 0)
    return Detections([dets.video[k] for k in keep], [dets.label[k] for k in keep], dets.start[keep],
                      dets.end[keep], dets.score[keep])


def test_video_labels_decode_each_video_as_its_top_classes_before_duplicates_and_the_top_k_cut(small_prepared):
    """External video labels (the paper's Table 2 rows "with video labels"): every unit of a video
    takes the video's top 2 classes, scored times their video scores, before NMS and the top_k
    cut: the same as decoding scores whose other classes are zeroed (the zero-scored detections
    left out); video_top of every class at score 1 changes nothing; a video without scores is named."""
    card = small_prepared["card"]
    videos = small_prepared["test"][:4]
    torch.manual_seed(0)
    dims = {"flow": videos[0].features["flow"]["body"].shape[1]}
    heads = build_heads(ModelConfig(), ["flow"], dims, card.num_classes).eval()
    stats = RegressionStats(torch.zeros(2), torch.ones(2))
    units = predict(heads["flow"], UnitDataset(videos, "flow", GraphSpec(), "three_part"), stats)
    rng = np.random.default_rng(2)
    scores = {v.video_id: rng.uniform(0.05, 1.0, card.num_classes) for v in videos}
    config = InferenceConfig(top_k=15)

    got = detections_of(videos, {"flow": units}, card.classes, config, VideoLabels(scores, top=2))
    zeroed = [UnitScores(_zeroed_but_top(u.scores, scores[v.video_id], 2), u.segments) for u, v in zip(units, videos)]
    want = _positive(detections_of(videos, {"flow": zeroed}, card.classes, config))
    assert got.video == want.video and got.label == want.label
    np.testing.assert_allclose(got.score, want.score, rtol=1e-12)   # fusion's weight: x * 3 / 3
    np.testing.assert_array_equal(got.start, want.start)
    for v in videos:   # the cut is spent on the video's 2 classes: all 15 places filled
        labels = {got.label[k] for k in range(len(got)) if got.video[k] == v.video_id}
        assert labels <= {card.classes[c] for c in np.argsort(-scores[v.video_id])[:2]}
        assert got.video.count(v.video_id) == config.top_k
    # rescoring decoded detections (another method's results) keeps fewer: other classes took places
    rescored = rescore_with_video_labels(detections_of(videos, {"flow": units}, card.classes, config), scores,
                                         card.classes, top=2)
    assert len(rescored) < len(got)

    every = VideoLabels({v: np.ones(card.num_classes) for v in scores}, top=card.num_classes)
    plain = detections_of(videos, {"flow": units}, card.classes, config)
    same = detections_of(videos, {"flow": units}, card.classes, config, every)
    assert same.label == plain.label
    np.testing.assert_array_equal(same.score, plain.score)
    with pytest.raises(ValueError, match=f"video {videos[0].video_id} has no external video-level class scores"):
        detections_of(videos, {"flow": units}, card.classes, config, VideoLabels({}, top=2))


def test_checkpoint_round_trip_and_detect_one_video(small_prepared, small_dataset, tmp_path, capsys):
    card = small_prepared["card"]
    heads, stats = train(small_prepared, streams=("rgb", "flow"))
    ckpt = Checkpoint(list(card.classes), ModelConfig(), GraphSpec(), InferenceConfig(top_k=50),
                      {**card.snippets}, heads, stats, {"note": "test"})
    path = tmp_path / "model.pt"
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path)
    assert loaded.classes == list(card.classes) and loaded.extra == {"note": "test"}
    for p, q in zip(heads.state_dict().values(), loaded.heads.state_dict().values()):
        assert torch.equal(p, q)

    # gcm detect on a test video equals the batch pipeline on the same video
    video = small_prepared["test"][0]
    feats = {s: np.load(small_dataset / f"features/{s}/{video.video_id}.npy") for s in ("rgb", "flow")}
    dets = detect_video(loaded, feats, video.intervals.numpy(), video.video_id, fps=30.0, duration=video.duration)
    per_stream = {s: predict(head, UnitDataset([video], s, GraphSpec(), "three_part"), loaded.stats)
                  for s, head in loaded.heads.items()}
    reference = detections_of([video], per_stream, card.classes, InferenceConfig(top_k=50))
    assert dets.label == reference.label
    np.testing.assert_allclose(dets.score, reference.score, rtol=1e-5)

    from workflows.cli import main
    props = tmp_path / "props.txt"
    props.write_text("\n".join(f"{s} {e}" for s, e in video.intervals.tolist()))
    for s in ("rgb", "flow"):
        np.save(tmp_path / f"{s}.npy", feats[s])
    out = tmp_path / "dets.json"
    assert main(["detect", "--checkpoint", str(path), "--features", str(tmp_path / "rgb.npy"),
                 str(tmp_path / "flow.npy"), "--proposals", str(props), "--duration", str(video.duration),
                 "--video-id", video.video_id, "--out", str(out)]) == 0
    written = json.loads(out.read_text())["results"][video.video_id]
    assert [d["label"] for d in written] == reference.label
    # without --out the same JSON goes to stdout
    capsys.readouterr()
    assert main(["detect", "--checkpoint", str(path), "--features", str(tmp_path / "rgb.npy"),
                 str(tmp_path / "flow.npy"), "--proposals", str(props), "--duration", str(video.duration),
                 "--video-id", video.video_id]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    # an existing --out is refused, left as it was, unless --overwrite
    previous = out.read_text()
    out.write_text(previous.replace(video.video_id, "earlier"))
    asked = ["detect", "--checkpoint", str(path), "--features", str(tmp_path / "rgb.npy"), str(tmp_path / "flow.npy"),
             "--proposals", str(props), "--duration", str(video.duration), "--video-id", video.video_id, "--out", str(out)]
    assert main(asked) == 2
    assert "pass --overwrite" in capsys.readouterr().err and "earlier" in out.read_text()
    assert main([*asked, "--overwrite"]) == 0
    assert out.read_text() == previous

    # the same proposals picked from the dataset's SSN list (frames of every test video), or given as
    # the video's BSN/BMN CSV (positions normalized by the duration), give the same detections; a
    # normalized position comes back within 1e-14 s, which can move a boundary lying exactly on a
    # snippet edge (proposals are whole frames) into the next snippet, hence the tolerance
    bsn = tmp_path / f"{video.video_id}.csv"
    bsn.write_text("xmin,xmax,score\n" + "\n".join(f"{s / video.duration!r},{e / video.duration!r},1"
                                                     for s, e in video.intervals.tolist()))
    for source in (small_dataset / "proposals" / "test_proposal_list.txt", bsn):
        again = tmp_path / "again.json"
        assert main(["detect", "--checkpoint", str(path), "--features", str(tmp_path / "rgb.npy"),
                     str(tmp_path / "flow.npy"), "--proposals", str(source), "--duration", str(video.duration),
                     "--video-id", video.video_id, "--out", str(again), "--overwrite"]) == 0
        found = json.loads(again.read_text())["results"][video.video_id]
        assert [d["label"] for d in found] == reference.label, source
        np.testing.assert_allclose([d["segment"] for d in found], [d["segment"] for d in written], atol=1e-3,
                                   err_msg=str(source))

    # features as one file holding both streams, where the checkpoint's snippet layout says which columns
    dim = feats["rgb"].shape[1]
    joined = tmp_path / "joined.pt"
    save_checkpoint(joined, Checkpoint(list(card.classes), ModelConfig(), GraphSpec(), InferenceConfig(top_k=50),
                                       {**card.snippets, "stream_columns": {"rgb": [0, dim], "flow": [dim, 2 * dim]}},
                                       heads, stats))
    np.save(tmp_path / "both.npy", np.concatenate([feats["rgb"], feats["flow"]], axis=1))
    again = tmp_path / "joined.json"
    assert main(["detect", "--checkpoint", str(joined), "--features", str(tmp_path / "both.npy"), "--proposals",
                 str(props), "--duration", str(video.duration), "--video-id", video.video_id, "--out", str(again)]) == 0
    assert json.loads(again.read_text()) == json.loads(out.read_text())

    # a flow stream one snippet short (optical flow of n frames has n - 1 fields) reads as RGB cut to it
    np.save(tmp_path / "flow_short.npy", feats["flow"][:-1])
    np.save(tmp_path / "rgb_cut.npy", feats["rgb"][:-1])
    for rgb in ("rgb.npy", "rgb_cut.npy"):
        assert main(["detect", "--checkpoint", str(path), "--features", str(tmp_path / rgb),
                     str(tmp_path / "flow_short.npy"), "--proposals", str(props), "--duration", str(video.duration),
                     "--video-id", video.video_id, "--out", str(tmp_path / f"{rgb}.json")]) == 0
    short, cut = (json.loads((tmp_path / f"{rgb}.json").read_text()) for rgb in ("rgb.npy", "rgb_cut.npy"))
    assert short == cut
    # features of another width than the heads read (another extractor) are named, not a shape error
    np.save(tmp_path / "flow_narrow.npy", feats["flow"][:, :dim // 2])
    capsys.readouterr()
    assert main(["detect", "--checkpoint", str(path), "--features", str(tmp_path / "rgb.npy"),
                 str(tmp_path / "flow_narrow.npy"), "--proposals", str(props), "--duration", str(video.duration),
                 "--video-id", video.video_id, "--out", str(tmp_path / "narrow.json")]) == 2
    err = capsys.readouterr().err
    assert "flow_narrow.npy" in err and f"flow features are {dim // 2}-d, the model's flow stream reads {dim}-d" in err
    assert not (tmp_path / "narrow.json").exists()
    # a duration the features do not cover is not this video's; 0 is not "the default"
    asked = ["detect", "--checkpoint", str(path), "--features", str(tmp_path / "rgb.npy"), str(tmp_path / "flow.npy"),
             "--proposals", str(props), "--video-id", video.video_id, "--out", str(tmp_path / "long.json")]
    assert main([*asked, "--duration", str(10 * video.duration)]) == 2
    assert "snippets cover only" in capsys.readouterr().err and not (tmp_path / "long.json").exists()
    assert main([*asked, "--duration", str(video.duration / 2)]) == 2   # nor one they run well past
    assert "well past the end of the" in capsys.readouterr().err and not (tmp_path / "long.json").exists()
    with pytest.raises(SystemExit):
        main([*asked, "--duration", "0"])
    assert "argument --duration: must be a number > 0, got '0'" in capsys.readouterr().err

    # a folder of many videos' features (a dataset's layout): one result file, each video as alone
    folder, ssn = tmp_path / "many", small_dataset / "proposals" / "test_proposal_list.txt"
    alone = {}
    for other in small_prepared["test"][:2]:
        for s in ("rgb", "flow"):
            (folder / s).mkdir(parents=True, exist_ok=True)
            np.save(folder / s / f"{other.video_id}.npy", np.load(small_dataset / f"features/{s}/{other.video_id}.npy"))
        assert main(["detect", "--checkpoint", str(path), "--features", str(folder / "rgb" / f"{other.video_id}.npy"),
                     str(folder / "flow" / f"{other.video_id}.npy"), "--proposals", str(ssn), "--out",
                     str(tmp_path / "alone.json"), "--overwrite"]) == 0
        alone.update(json.loads((tmp_path / "alone.json").read_text())["results"])
    assert main(["detect", "--checkpoint", str(path), "--features-dir", str(folder), "--proposals", str(ssn),
                 "--out", str(tmp_path / "many.json")]) == 0
    assert json.loads((tmp_path / "many.json").read_text())["results"] == alone
    # one video's proposals cannot serve a folder of videos
    assert main(["detect", "--checkpoint", str(path), "--features-dir", str(folder), "--proposals", str(props)]) == 2
    assert "holds one video's proposals" in capsys.readouterr().err


def test_detect_takes_rescaled_videos_durations_from_a_video_info_file(tmp_path, capsys):
    """Features rescaled to a fixed number of positions (ActivityNet's) do not tell how long a video
    is: gcm detect refuses them without a duration, and a folder run takes each video's from a
    video-info file (BSN's CSV, v_ ids) as per-video runs with --duration do."""
    from workflows.cli import main

    classes = [f"class_{k}" for k in range(5)]
    torch.manual_seed(0)
    heads = build_heads(ModelConfig(), ["rgb"], 16, len(classes)).eval()
    save_checkpoint(tmp_path / "model.pt", Checkpoint(classes, ModelConfig(), GraphSpec(), InferenceConfig(top_k=20),
                                                      {"convention": "rescaled"}, heads,
                                                      RegressionStats(torch.zeros(2), torch.ones(2))))
    durations = {"v_aaaaaaaaaaa": 90.0, "v_bbbbbbbbbbb": 33.0}
    rng = np.random.default_rng(0)
    (tmp_path / "rgb").mkdir()
    for vid in durations:
        np.save(tmp_path / "rgb" / f"{vid}.npy", rng.normal(size=(100, 16)).astype(np.float32))
    props = tmp_path / "props.csv"
    props.write_text("video,xmin,xmax,score\n" + "".join(f"{vid},{s:.2f},{s + w:.2f},1\n" for vid in durations
                                                         for s in (0.0, 0.1, 0.3, 0.5) for w in (0.1, 0.2, 0.5)))
    info = tmp_path / "video_info_new.csv"
    info.write_text("video,numFrame,seconds,fps,rfps,subset,featureFrame\n" + "".join(
        f"{vid},{int(d * 25)},{d},25.0,25.0,validation,{int(d * 25)}\n" for vid, d in durations.items()))
    checkpoint = ["detect", "--checkpoint", str(tmp_path / "model.pt"), "--proposals", str(props)]
    capsys.readouterr()
    assert main([*checkpoint, "--features-dir", str(tmp_path)]) == 2
    assert "rescaled to 100 positions" in capsys.readouterr().err
    assert main([*checkpoint, "--features-dir", str(tmp_path), "--video-info", str(props)]) == 2
    assert "neither a video-info file" in capsys.readouterr().err  # a file that gives no durations is named
    assert main([*checkpoint, "--features-dir", str(tmp_path), "--video-info", str(info),
                 "--out", str(tmp_path / "all.json")]) == 0
    alone = {}
    for vid, duration in durations.items():
        assert main([*checkpoint, "--features", str(tmp_path / "rgb" / f"{vid}.npy"), "--video-id", vid,
                     "--duration", str(duration), "--fps", "25", "--out", str(tmp_path / "one.json"), "--overwrite"]) == 0
        alone.update(json.loads((tmp_path / "one.json").read_text())["results"])
    found = json.loads((tmp_path / "all.json").read_text())["results"]
    assert found == alone and set(found) == {"aaaaaaaaaaa", "bbbbbbbbbbb"}
    for vid, duration in durations.items():  # in the video's seconds, reaching beyond a placeholder second
        ends = [d["segment"][1] for d in found[vid[2:]]]
        assert max(ends) <= duration + 1e-6 and max(ends) > 0.5 * duration

    # a video the video-info file does not list stops the run, naming both (laid out by the
    # checkpoint's frame rate, it was detected in other seconds); with --skip-bad it is left out
    np.save(tmp_path / "rgb" / "v_ccccccccccc.npy", rng.normal(size=(100, 16)).astype(np.float32))
    folder = [*checkpoint, "--features-dir", str(tmp_path), "--video-info", str(info),
              "--out", str(tmp_path / "all.json"), "--overwrite"]
    capsys.readouterr()
    assert main(folder) == 2
    assert f"{info}, video v_ccccccccccc: not listed there" in capsys.readouterr().err
    assert main([*folder, "--skip-bad"]) == 0
    assert json.loads((tmp_path / "all.json").read_text())["results"] == alone
    # a broken video in the folder stops the run, naming it; with --skip-bad it is left out, named
    info.write_text(info.read_text() + "v_ccccccccccc,2500,100.0,25.0,25.0,validation,2500\n")
    np.save(tmp_path / "rgb" / "v_ccccccccccc.npy", np.full((100, 16), np.nan, dtype=np.float32))
    capsys.readouterr()
    assert main(folder) == 2
    assert "v_ccccccccccc.npy, video v_ccccccccccc: non-finite value" in capsys.readouterr().err
    assert main([*folder, "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "skipped: " in err and "detect: 3/3 videos" in err  # and the folder's progress
    assert json.loads((tmp_path / "all.json").read_text())["results"] == alone
    # every video skipped: an error, not an empty result file
    for vid in durations:
        np.save(tmp_path / "rgb" / f"{vid}.npy", np.full((100, 16), np.nan, dtype=np.float32))
    assert main([*folder, "--skip-bad", "--out", str(tmp_path / "none.json")]) == 2
    assert f"every one of the 3 videos of {tmp_path} failed its checks" in capsys.readouterr().err
    assert not (tmp_path / "none.json").exists()


def test_a_split_scored_a_chunk_at_a_time_equals_it_scored_at_once(small_prepared):
    """Evaluation reads a split a shard (or a few videos) at a time, in whatever order the shards
    come: its ground truth and each stream's and the fused detections are those of the whole split
    scored at once, in video-id order."""
    card, videos = small_prepared["card"], small_prepared["test"]
    torch.manual_seed(0)
    heads = build_heads(ModelConfig(), card.streams, {s: videos[0].features[s]["body"].shape[1] for s in card.streams},
                        card.num_classes).eval()
    stats = RegressionStats(torch.tensor([0.1, -0.2]), torch.tensor([0.5, 0.4]))
    config = InferenceConfig(top_k=30)
    shuffled = [videos[k] for k in np.random.default_rng(0).permutation(len(videos))]
    truth, found = split_detections((shuffled[k:k + 5] for k in range(0, len(shuffled), 5)), heads, GraphSpec(),
                                    ModelConfig().completeness_features, stats, card.classes, config,
                                    each_stream=True)

    in_order = sorted(videos, key=lambda v: v.video_id)
    per_stream = {s: predict(heads[s], UnitDataset(in_order, s, GraphSpec(), ModelConfig().completeness_features), stats, batch_videos=5)
                  for s in card.streams}
    assert list(truth) == [v.video_id for v in in_order]
    assert truth == {v.video_id: v.as_video(card.classes) for v in in_order}
    assert set(found) == {*card.streams, "fused"}
    for name, streams in [(s, {s: per_stream[s]}) for s in card.streams] + [("fused", per_stream)]:
        want = detections_of(in_order, streams, card.classes, config)
        assert found[name].video == want.video and found[name].label == want.label
        for column in ("start", "end", "score"):
            np.testing.assert_allclose(getattr(found[name], column), getattr(want, column), rtol=1e-6, atol=1e-9)
    assert len(found["fused"]) == 30 * len(videos)


def test_an_empty_share_of_the_videos_is_an_error_not_an_endless_loop():
    """A data-parallel worker draws a fixed number of steps; with no video it would loop forever."""
    from gcm_core.engine import epoch_batches

    assert epoch_batches(0, 4, torch.Generator(), None) == []
    assert epoch_batches(3, 2, torch.Generator().manual_seed(0), 3) != []
    with pytest.raises(ValueError, match="a worker's share of the training set is empty"):
        epoch_batches(0, 4, torch.Generator(), 2)


def test_a_new_video_on_native_frame_rate_snippets_needs_its_rate():
    """A checkpoint trained on THUMOS'14's I3D features (snippets on each video's own frame rate)
    laid a new video out at 30 fps when no --fps was given: a 25 fps video's detections came out
    in the seconds of 30 fps. Its rate is asked for now; rescaled positions need none."""
    native = {"convention": "i3d", "fps": "native", "stride_frames": 8, "clip_frames": 64}
    with pytest.raises(ValueError, match=r"^video v: the checkpoint's snippets lie on each video's own frame rate .*"
                                         r"\(gcm detect: --fps, or --video-info"):
        video_layout(native, 100, "v")
    video, grid = video_layout(native, 100, "v", fps=25.0)
    assert (grid.fps, video.duration) == (25.0, pytest.approx((99 * 8 + 64) / 25))
    fixed = {**native, "fps": 30}
    assert video_layout(fixed, 100, "v")[1].fps == 30.0
    rescaled = {"convention": "rescaled"}
    assert video_layout(rescaled, 100, "v", duration=124.23)[1].seconds_per_snippet == pytest.approx(1.2423)
