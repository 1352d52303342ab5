"""One-stage D-SSAD + GCM: sliding windows, anchors, inserted GCMs, training and merged inference."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import run_two_workers
from gcm_core import one_stage
from gcm_core.data.cards import load_card
from gcm_core.data.dataset import DatasetSource
from gcm_core.data.pooling import SnippetGrid
from gcm_core.detectors.dssad import DSSAD, DSSADConfig
from gcm_core.engine import TrainConfig
from gcm_core.evaluation import evaluate_detections
from gcm_core.graph import GraphSpec
from gcm_core.losses import match_anchors
from gcm_core.postprocess import InferenceConfig, VideoLabels
from gcm_core.units import tiou

SNIPPET_SECONDS = 0.5


def test_windows_cover_the_video_and_keep_instances_mostly_inside():
    snippets = np.arange(1300, dtype=np.float32)[:, None]   # 650 s; feature = snippet index
    gt = torch.tensor([[10.0, 20.0], [250.0, 262.0]], dtype=torch.float64)
    labels = torch.tensor([4, 7])
    every = one_stage.clips_of("v", snippets, SNIPPET_SECONDS, gt, labels, 512, 256, train=False)
    # windows of 256 s every 128 s, and one more ending at the video's end
    assert [c.start for c in every] == [0.0, 128.0, 256.0, 384.0, 394.0]
    np.testing.assert_array_equal(every[-1].features[:, 0].numpy(), np.arange(788, 1300))
    assert {int(x) for c in every for x in c.features[:, 0]} == set(range(1300))

    trained = one_stage.clips_of("v", snippets, SNIPPET_SECONDS, gt, labels, 512, 256, train=True)
    assert [c.start for c in trained] == [0.0, 128.0, 256.0]   # the last two windows hold no instance
    # the second instance has exactly half of its 12 s in the first and third windows: kept, cut
    torch.testing.assert_close(trained[0].gt, torch.tensor([[10.0, 20.0], [250.0, 256.0]], dtype=torch.float64))
    assert trained[0].gt_labels.tolist() == [4, 7]
    torch.testing.assert_close(trained[1].gt, torch.tensor([[122.0, 134.0]], dtype=torch.float64))
    torch.testing.assert_close(trained[2].gt, torch.tensor([[0.0, 6.0]], dtype=torch.float64))


def test_a_short_video_is_one_zero_padded_window():
    snippets = np.ones((100, 3), dtype=np.float32)
    (clip,) = one_stage.clips_of("v", snippets, SNIPPET_SECONDS, torch.zeros(0, 2, dtype=torch.float64),
                                 torch.zeros(0, dtype=torch.long), 512, 256, train=False)
    assert clip.features.shape == (512, 3) and clip.snippets == 100
    assert bool((clip.features[:100] == 1).all()) and bool((clip.features[100:] == 0).all())
    every = one_stage.clips_of("v", np.ones((1300, 3), dtype=np.float32), SNIPPET_SECONDS,
                               torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, dtype=torch.long), 512, 256,
                               train=False)
    assert {c.snippets for c in every} == {512}


def test_the_cells_of_a_clips_padding_are_no_units_of_its_graph():
    model = DSSAD(DSSADConfig(hidden=8, clip_snippets=64, gcm_scales=(0,)), dim=4, num_classes=2)
    cells = torch.ones(16, 8)               # padding cells look alike: each the most similar to all
    cells[:6] = torch.rand(6, 8, generator=torch.Generator().manual_seed(0))
    graph = model.cell_graph(0, cells, snippets=21)   # cells of 4 snippets: 6 hold video
    assert graph.num_nodes == 16
    pairs = set(map(tuple, graph.edge_index.t().tolist()))
    # edges join real cells only, each of which has its neighbours (2 nearest, 2 most similar)
    assert {i for pair in pairs for i in pair} == set(range(6))
    assert all(sum(1 for i, _ in pairs if i == cell) >= 2 for cell in range(6))
    full = model.cell_graph(0, cells, snippets=64)
    assert {i for pair in map(tuple, full.edge_index.t().tolist()) for i in pair} == set(range(16))


@pytest.mark.parametrize("scale", [0, 1, 2])
def test_a_cells_receptive_field_is_the_snippets_its_features_depend_on(scale):
    model = DSSAD(DSSADConfig(hidden=4, clip_snippets=256, dropout=0.0), dim=2, num_classes=1)
    with torch.no_grad():  # positive weights and inputs: every ReLU passes, no dependence hides
        for p in model.parameters():
            p.copy_(p.abs() + 0.01)
    clip = torch.rand(1, 256, 2, requires_grad=True, generator=torch.Generator().manual_seed(0))
    x = model.base(clip.transpose(1, 2))
    for down in model.down[:scale + 1]:
        x = down(x)
    x[0, :, x.shape[2] // 2].sum().backward()
    assert int((clip.grad[0].abs().sum(1) > 0).sum()) == model.receptive_field(scale)


@pytest.mark.parametrize("scale", [0, 1])
def test_a_cells_semantic_neighbours_lie_beyond_its_receptive_field(scale):
    """Surrounding edges: the 2 nearest cells by extent; semantic: the l_sem most similar cells
    whose receptive fields do not overlap the cell's (brute force), or by default any other cell."""
    model = DSSAD(DSSADConfig(hidden=8, clip_snippets=128, gcm_scales=(scale,), semantic_disjoint="receptive-field"),
                  dim=4, num_classes=2)
    n = model.cells(scale)
    cells = torch.randn(n, 8, generator=torch.Generator().manual_seed(scale))
    graph = model.cell_graph(scale, cells, snippets=128)
    reach = (model.receptive_field(scale) - 1) // (4 << scale)   # overlapping fields: |i - j| <= reach
    cos = torch.nn.functional.normalize(cells, dim=1) @ torch.nn.functional.normalize(cells, dim=1).T
    for i in range(n):
        out = graph.edge_index[0] == i
        semantic = graph.edge_index[1, out & graph.has_type("semantic")].tolist()
        far = [j for j in range(n) if abs(i - j) > reach]
        assert sorted(semantic) == sorted(sorted(far, key=lambda j: -cos[i, j])[:2])
        nearest = sorted(sorted(set(range(n)) - {i}, key=lambda j: (abs(i - j), j))[:2])
        assert sorted(graph.edge_index[1, out & graph.has_type("surrounding")].tolist()) == nearest
    literal = DSSAD(DSSADConfig(hidden=8, clip_snippets=128, gcm_scales=(scale,)), dim=4,
                    num_classes=2).cell_graph(scale, cells, snippets=128)
    most_similar = {i: sorted(sorted(set(range(n)) - {i}, key=lambda j: -cos[i, j])[:2]) for i in range(n)}
    semantic = literal.edge_index[:, literal.has_type("semantic")]
    assert {i: sorted(semantic[1, semantic[0] == i].tolist()) for i in range(n)} == most_similar


def test_anchors_and_outputs_follow_the_multiscale_maps():
    config = DSSADConfig(hidden=16, clip_snippets=64, anchor_ratios=(1.0, 2.0))
    model = DSSAD(config, dim=8, num_classes=3).eval()
    expected = [((c + 0.5) * 4 * 2 ** s * SNIPPET_SECONDS - r * 2 * 2 ** s * SNIPPET_SECONDS,
                 (c + 0.5) * 4 * 2 ** s * SNIPPET_SECONDS + r * 2 * 2 ** s * SNIPPET_SECONDS)
                for s, cells in enumerate((16, 8, 4)) for c in range(cells) for r in (1.0, 2.0)]
    torch.testing.assert_close(model.anchors(SNIPPET_SECONDS), torch.tensor(expected, dtype=torch.float64))
    logits, offsets = model(torch.randn(2, 64, 8))
    assert logits.shape == (2, len(expected), 4) and offsets.shape == (2, len(expected), 2)


@pytest.mark.parametrize("weighting", ["cos", "embed-cos"])
def test_inserted_gcms_start_as_the_identity_and_learn(weighting):
    config = DSSADConfig(hidden=16, clip_snippets=64)
    torch.manual_seed(0)
    plain = DSSAD(config, dim=8, num_classes=3).eval()
    torch.manual_seed(0)
    related = DSSAD(DSSADConfig(hidden=16, clip_snippets=64, gcm_scales=(0, 1, 2), weighting=weighting), dim=8,
                    num_classes=3).eval()
    assert sorted(related.gcms) == ["0", "1", "2"] and len(plain.gcms) == 0
    assert all((g.embed is not None) == (weighting == "embed-cos") for g in related.gcms.values())
    clips = torch.randn(2, 64, 8)
    for a, b in zip(plain(clips), related(clips)):
        torch.testing.assert_close(a, b)
    logits, _ = related.train()(clips)
    logits.logsumexp(-1).sum().backward()
    assert all(float(g.layers[-1].weight.grad.abs().sum()) > 0 for g in related.gcms.values())


def test_feature_map_cells_take_no_contextual_edges_and_scales_must_exist():
    with pytest.raises(ValueError, match="never overlap"):
        DSSADConfig(graph=GraphSpec())
    with pytest.raises(ValueError, match="gcm_scales"):
        DSSADConfig(gcm_scales=(3,))


def test_windows_overlap_by_half_a_clip_unless_told_and_never_leave_gaps():
    """A shorter clip (--set one_stage.model.clip_snippets=128) brings its own stride; a stride
    longer than a clip would leave snippets of a long video in no window."""
    assert DSSADConfig().stride == 256 and DSSADConfig(clip_snippets=128).stride == 64
    assert DSSADConfig(clip_snippets=128, window_stride=96).stride == 96
    with pytest.raises(ValueError, match="window_stride must be <= clip_snippets"):
        DSSADConfig(clip_snippets=128, window_stride=200)


def test_one_stage_clips_need_no_proposal_files(small_dataset, tmp_path):
    """A one-stage user has features and annotations only: the same clips come from a data root
    without the card's proposal lists."""
    card = load_card(small_dataset / "card.yaml")
    for name in ("annotations.json", "features"):
        (tmp_path / name).symlink_to(small_dataset / name)
    with_lists, durations = one_stage.dataset_clips(DatasetSource(card, small_dataset, "test"), ["rgb"], 128, 64)
    without, durations_again = one_stage.dataset_clips(DatasetSource(card, tmp_path, "test"), ["rgb"], 128, 64)
    assert durations_again == durations and len(without["rgb"]) == len(with_lists["rgb"]) > len(durations)
    for a, b in zip(with_lists["rgb"], without["rgb"]):
        assert (a.video_id, a.start, a.snippets) == (b.video_id, b.start, b.snippets)
        assert torch.equal(a.features, b.features) and torch.equal(a.gt, b.gt)


def test_training_fits_its_videos_and_overlapping_windows_merge_without_duplicates(small_dataset):
    """A sanity check of the whole loop (anchor matching, losses, decoding, window merging): the
    detector learns to find the instances of its own training videos, which its untrained self
    cannot; half-overlapping windows see the same instances twice and NMS leaves one of each."""
    card = load_card(small_dataset / "card.yaml")
    source = DatasetSource(card, small_dataset, "train")
    clips, durations = one_stage.dataset_clips(source, ["flow"], 128, 64)
    clips = clips["flow"]
    truth = {v: source.videos[v] for v in durations}
    inference = InferenceConfig(nms_threshold=0.4, top_k=50)

    def map_at_05(model: DSSAD):
        dets = one_stage.predict_fused({"flow": model}, {"flow": clips}, durations, card.classes, config=inference)
        return float(evaluate_detections(truth, dets, card.classes, "thumos14", [0.5]).map[0]), dets

    torch.manual_seed(0)
    model = DSSAD(DSSADConfig(hidden=32, clip_snippets=128, window_stride=64, gcm_scales=(1,)),
                  clips[0].features.shape[1], card.num_classes)
    untrained, _ = map_at_05(model)
    history = one_stage.fit(model, clips, TrainConfig(epochs=15, optimizer="adam", lr=3e-3, batch_videos=8,
                                                      lr_step_epochs=100, seed=0))
    assert history[-1]["loss_total"] < 0.5 * history[0]["loss_total"]
    trained, dets = map_at_05(model)
    assert trained > untrained + 0.05
    for vid, duration in durations.items():
        mine = [i for i, v in enumerate(dets.video) if v == vid]
        assert 0 < len(mine) <= inference.top_k
        segments = torch.tensor(np.stack([dets.start[mine], dets.end[mine]], 1))
        assert bool((segments[:, 0] >= 0).all()) and bool((segments[:, 1] <= duration + 1e-9).all())
        labels = [dets.label[i] for i in mine]
        overlap = tiou(segments[:, None], segments[None]).fill_diagonal_(0)
        same_class = torch.tensor([[a == b for b in labels] for a in labels])
        assert float(overlap[same_class].max()) <= inference.nms_threshold + 1e-9


def test_each_video_is_detected_at_its_own_frame_rate(small_dataset, tmp_path):
    """THUMOS'14's videos run at 24-30 fps, and its card lays snippets on each video's own rate.
    D-SSAD laid every clip's anchors on one rate, the last video's: here a video at 25 fps, read
    with one at 30, came out in the seconds of 30 fps. The same snippets at 25 fps are the same
    video 1.2 times as long, so its detections are the 30 fps ones times 1.2, whatever it is read
    with; and a video's training targets do not depend on the other videos either."""
    card_text = (small_dataset / "card.yaml").read_text()
    assert "\n  fps: 30\n" in card_text
    (tmp_path / "card.yaml").write_text(card_text.replace("\n  fps: 30\n", "\n  fps: native\n"))
    (tmp_path / "features").symlink_to(small_dataset / "features")
    annotations = json.loads((small_dataset / "annotations.json").read_text())
    test = sorted(v for v, entry in annotations["database"].items() if entry["subset"] == "test")
    slow, fast = test[:2]   # the first at 25 fps, read before one at 30 fps
    entry = annotations["database"][slow]
    entry.update(fps=25.0, duration=entry["duration"] * 1.2, duration_frame=round(entry["duration"] * 1.2 * 25))
    for ann in entry["annotations"]:
        ann["segment"] = [t * 1.2 for t in ann["segment"]]
    annotations["database"] = {v: annotations["database"][v] for v in (slow, fast)}
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))

    card, mixed_card = load_card(small_dataset / "card.yaml"), load_card(tmp_path / "card.yaml")
    alone, _ = one_stage.dataset_clips(DatasetSource(card, small_dataset, "test"), ["flow"], 128, 64)
    mixed, durations = one_stage.dataset_clips(DatasetSource(mixed_card, tmp_path, "test"), ["flow"], 128, 64)
    torch.manual_seed(0)
    model = DSSAD(DSSADConfig(hidden=16, clip_snippets=128, window_stride=64), alone["flow"][0].features.shape[1],
                  card.num_classes).eval()
    config = InferenceConfig(top_k=20)
    at_30 = one_stage.predict_fused({"flow": model}, {"flow": [c for c in alone["flow"] if c.video_id == slow]},
                                    {slow: durations[slow] / 1.2}, card.classes, config=config)
    found = one_stage.predict_fused({"flow": model}, mixed, durations, card.classes, config=config)
    mine = [k for k, v in enumerate(found.video) if v == slow]
    assert len(mine) == len(at_30.score) > 0
    np.testing.assert_allclose(found.start[mine], 1.2 * at_30.start, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(found.end[mine], 1.2 * at_30.end, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(found.score[mine], at_30.score, rtol=1e-12)

    train_alone = [c for c in alone["flow"] if c.video_id == slow]
    train_mixed = [c for c in mixed["flow"] if c.video_id == slow]
    for a, b in zip(train_alone, train_mixed):   # the same windows, in the video's own seconds
        assert (b.seconds, b.start) == pytest.approx((1.2 * a.seconds, 1.2 * a.start))
        labels_a, _ = match_anchors(model.anchors(a.seconds), a.gt, a.gt_labels)
        labels_b, _ = match_anchors(model.anchors(b.seconds), b.gt, b.gt_labels)
        assert torch.equal(labels_a, labels_b)


def test_rescaled_features_lay_a_videos_windows_over_its_duration():
    """ActivityNet's features are rescaled to 100 positions whatever a video's length (the real
    example's video: 124.23 s): a position is 1.2423 s of it, not a 30 fps I3D stride (0.267 s,
    which put every detection in the video's first 27 s)."""
    grid = SnippetGrid("rescaled", num_snippets=100, duration=124.23)
    seconds, offset = one_stage.snippet_timing(grid)
    assert (seconds, offset) == pytest.approx((1.2423, 0.0))
    no_gt = torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    clips = one_stage.clips_of("v", np.zeros((100, 4), np.float32), seconds, *no_gt, 96, 48, train=False,
                               time_offset=offset)
    spans = [t for c in clips for t in (c.start, c.start + c.snippets * c.seconds)]
    assert spans == pytest.approx([0.0, 119.2608, 4.9692, 124.23])


def _train_replica(rank: int, clips: list, folder: str) -> None:
    """One worker of a two-worker data-parallel epoch (the one-stage training stage's way)."""
    torch.manual_seed(rank)   # the ranks draw different initial weights; DDP starts them from rank 0's
    model = DSSAD(DSSADConfig(hidden=16, clip_snippets=128, window_stride=64, gcm_scales=(0,)), 8, 3)
    replica = torch.nn.parallel.DistributedDataParallel(model)
    recipe = TrainConfig(optimizer="adam", lr=1e-2, batch_videos=2, clip_grad_norm=None)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    mine = clips[rank::2]     # 3 clips on rank 0, 2 on rank 1: both must take the same number of steps
    one_stage.train_one_epoch(replica, mine, optimizer, recipe, torch.Generator().manual_seed(rank),
                              steps=3, batch_videos=1)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{folder}/rank{rank}.pt")


def test_data_parallel_workers_keep_equal_weights(tmp_path):
    """Workers of a data-parallel run must apply the same averaged gradient at every step: the
    one-stage loop called each worker's inner D-SSAD, past DistributedDataParallel, and its
    workers trained apart (rank 0's weights, trained on half the clips, were the run's)."""
    gen = torch.Generator().manual_seed(0)
    clips = [one_stage.Clip(f"v{k}", torch.randn(128, 8, generator=gen), 128, 0.0, SNIPPET_SECONDS,
                            torch.tensor([[4.0 + k, 20.0 + 3 * k]], dtype=torch.float64), torch.tensor([k % 3]))
             for k in range(5)]
    run_two_workers(_train_replica, clips, str(tmp_path))
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.manual_seed(0)
    initial = DSSAD(DSSADConfig(hidden=16, clip_snippets=128, window_stride=64, gcm_scales=(0,)), 8, 3).state_dict()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=1e-6, msg=key)
    assert any(not torch.allclose(first[k], initial[k]) for k in initial)   # and they trained


def test_video_labels_give_each_anchor_the_best_of_its_videos_top_classes(small_dataset):
    """D-SSAD with external video labels: an anchor is its best class among the video's top 2,
    scored times the video score, before windows merge: the same as decoding anchor scores whose
    other classes are zeroed (the zero-scored detections left out)."""
    card = load_card(small_dataset / "card.yaml")
    source = DatasetSource(card, small_dataset, "test")
    clips, durations = one_stage.dataset_clips(source, ["flow"], 128, 64)
    torch.manual_seed(0)
    model = DSSAD(DSSADConfig(hidden=32, clip_snippets=128, window_stride=64), clips["flow"][0].features.shape[1],
                  card.num_classes)
    scores = one_stage.anchor_scores(model, clips["flow"])
    rng = np.random.default_rng(4)
    video_scores = {v: rng.uniform(0.05, 1.0, card.num_classes) for v in durations}
    config = InferenceConfig(top_k=20)

    got = one_stage.fuse_detections({"flow": scores}, clips["flow"], model.anchors, durations, card.classes,
                                    config=config, video_labels=VideoLabels(video_scores, top=2))
    zeroed = []
    for clip, (probs, offsets) in zip(clips["flow"], scores):
        factor = np.zeros(card.num_classes)
        best = np.argsort(-video_scores[clip.video_id])[:2]
        factor[best] = video_scores[clip.video_id][best]
        zeroed.append((probs * torch.as_tensor(factor), offsets))
    want = one_stage.fuse_detections({"flow": zeroed}, clips["flow"], model.anchors, durations, card.classes,
                                     config=config)
    keep = np.flatnonzero(want.score > 0)
    assert got.video == [want.video[k] for k in keep] and got.label == [want.label[k] for k in keep]
    np.testing.assert_array_equal(got.score, want.score[keep])
    np.testing.assert_array_equal(got.start, want.start[keep])
    for video in durations:   # every place of the top_k cut goes to the video's 2 classes
        assert got.video.count(video) == config.top_k
