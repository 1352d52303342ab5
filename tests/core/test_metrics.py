"""Metrics against plain-loop implementations of the official algorithms, and on real results."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from gcm_core.data.model import Detections, Instance, Video
from gcm_core.evaluation import AGNOSTIC, class_agnostic, evaluate_detections, unmatched_detections
from gcm_core.metrics import Segments, activitynet_ap, average_recall, thumos14_ap
from reference_metrics import loop_activitynet_ap, loop_thumos_ap, loop_tiou


def to_segments(rows, scored):
    cols = list(zip(*rows)) if rows else [[]] * (5 if scored else 4)
    return Segments(cols[0], cols[1], cols[2], cols[3], cols[4] if scored else None)


@st.composite
def detection_problems(draw):
    n_videos = draw(st.integers(1, 4))
    n_classes = draw(st.integers(1, 3))
    grid = st.integers(0, 20).map(float)  # coarse grid: equal tIoUs and touching segments happen
    gt = []
    for _ in range(draw(st.integers(0, 10))):
        s = draw(grid)
        gt.append((draw(st.integers(0, n_videos - 1)), draw(st.integers(0, n_classes - 1)), s,
                   s + draw(st.integers(1, 6))))
    det = []
    for k in range(draw(st.integers(0, 25))):
        s = draw(grid)
        e = s + draw(st.integers(-2, 6).filter(lambda x: x != 0))  # some reversed
        det.append((draw(st.integers(0, n_videos - 1)), draw(st.integers(0, n_classes - 1)), s, e,
                    draw(st.sampled_from([0.1, 0.5, 0.5, 0.9])), k))  # tied scores on purpose
    amb = [(draw(st.integers(0, n_videos - 1)), s, s + 2.0) for s in draw(st.lists(grid, max_size=2))]
    return gt, det, amb, n_classes


@given(problem=detection_problems(), thr=st.sampled_from([0.1, 0.3, 0.5, 0.7]))
def test_activitynet_ap_equals_the_official_loop(problem, thr):
    gt, det, _, n_classes = problem
    got = activitynet_ap(to_segments(gt, False), to_segments([d[:5] for d in det], True), [thr], n_classes)
    expected = loop_activitynet_ap(gt, [(v, l, min(s, e), max(s, e), sc) for v, l, s, e, sc, _ in det], thr,
                                   n_classes)
    np.testing.assert_allclose(got.ap[0].numpy(), expected, atol=1e-12)


@given(problem=detection_problems(), thr=st.sampled_from([0.1, 0.3, 0.5, 0.7]))
def test_thumos14_ap_equals_the_official_loop(problem, thr):
    gt, det, amb, n_classes = problem
    got = thumos14_ap(to_segments(gt, False), to_segments([d[:5] for d in det], True), [thr], n_classes,
                      to_segments([(v, -1, s, e) for v, s, e in amb], False))
    np.testing.assert_allclose(got.ap[0].numpy(), loop_thumos_ap(gt, det, thr, n_classes, amb), atol=1e-12)


def test_thresholds_at_once_equal_one_at_a_time():
    rng = np.random.default_rng(0)
    gt = Segments(rng.integers(0, 5, 60), rng.integers(0, 4, 60), s := rng.uniform(0, 100, 60), s + rng.uniform(1, 9, 60))
    det = Segments(rng.integers(0, 5, 400), rng.integers(0, 4, 400), d := rng.uniform(0, 100, 400),
                   d + rng.uniform(1, 9, 400), rng.uniform(size=400))
    thresholds = [0.1, 0.3, 0.5, 0.7]
    for fn in (activitynet_ap, thumos14_ap):
        together = fn(gt, det, thresholds, 4).ap
        for k, t in enumerate(thresholds):
            torch.testing.assert_close(together[k], fn(gt, det, [t], 4).ap[0])


def test_perfect_detections_score_100_and_duplicates_are_false_positives():
    gt = Segments([0, 0], [0, 0], [0.0, 10.0], [5.0, 15.0])
    det = Segments([0, 0, 0], [0, 0, 0], [0.0, 10.0, 0.0], [5.0, 15.0, 5.0], [0.9, 0.8, 0.1])
    assert activitynet_ap(gt, det, [0.5], 1).map.item() == pytest.approx(1.0)
    # THUMOS: non-interpolated; the duplicate comes last, so precision at both TPs is 1
    assert thumos14_ap(gt, det, [0.5], 1).map.item() == pytest.approx(1.0)
    # a higher-scored duplicate costs precision: TPs at ranks 2 and 3 -> (1/2 + 2/3) / 2
    det = Segments([0, 0, 0], [0, 0, 0], [0.0, 0.0, 10.0], [5.0, 5.0, 15.0], [0.9, 0.95, 0.8])
    assert thumos14_ap(gt, det, [0.5], 1).map.item() == pytest.approx((1 + 2 / 3) / 2)


def test_cbr_published_map_with_the_thumos14_protocol(shared_data):
    """Real detections of CBR (BMVC 2017) give its published 60.1/56.7/50.1/41.3/31.0 (+-0.1)."""
    from gcm_core.data.cards import load_card
    from gcm_core.data.formats import read_annotations, read_detections
    from gcm_core.evaluation import evaluate_detections

    card = load_card("thumos14")
    gt = read_annotations(shared_data / "thumos14/annotations/temporal_annotations_test", card)
    published = {0.1: 60.1, 0.2: 56.7, 0.3: 50.1, 0.4: 41.3, 0.5: 31.0}
    for t, expected in published.items():
        det = read_detections(shared_data / f"thumos14/results/CBR/CBR_THUMOS-14_IoU{t}.txt", card)
        result = evaluate_detections(gt, det, card.classes, "thumos14", [t])
        assert 100 * result.map.item() == pytest.approx(expected, abs=0.1), t


def test_cbr_with_the_activitynet_protocol_differs_as_documented(shared_data):
    """The same detections under the ActivityNet evaluator: about 31.35 at 0.5 (data README)."""
    from gcm_core.data.cards import load_card
    from gcm_core.data.formats import read_annotations, read_detections
    from gcm_core.evaluation import evaluate_detections

    card = load_card("thumos14")
    gt = {k: v for k, v in read_annotations(shared_data / "thumos14/annotations/thumos14.json", card).items()
          if v.subset == "test"}
    det = read_detections(shared_data / "thumos14/results/CBR/CBR_THUMOS-14_IoU0.5.txt", card)
    result = evaluate_detections(gt, det, card.classes, "activitynet", [0.5])
    assert 100 * result.map.item() == pytest.approx(31.35, abs=0.05)


def loop_average_recall(gt, props, an, thr):
    videos = sorted({g[0] for g in gt})
    total = sum(1 for p in props if p[0] in videos)
    hits = 0
    for v in videos:
        mine = sorted([p for p in props if p[0] == v], key=lambda p: -p[3])
        keep = min(int(len(mine) * an * len(videos) / total), len(mine))
        for g in (g for g in gt if g[0] == v):
            hits += any(loop_tiou((g[1], g[2]), (p[1], p[2])) >= thr for p in mine[:keep])
    return hits / len(gt)


@given(seed=st.integers(0, 1000), an=st.sampled_from([1, 2, 5, 10]), thr=st.sampled_from([0.5, 0.7]))
def test_average_recall_equals_loop(seed, an, thr):
    rng = np.random.default_rng(seed)
    gt = [(int(rng.integers(0, 3)), float(s), float(s + rng.integers(1, 8))) for s in rng.integers(0, 30, 8)]
    props = [(int(rng.integers(0, 4)), float(s), float(s + rng.integers(1, 8)), float(rng.choice([0.2, 0.5])))
             for s in rng.integers(0, 30, 30)]
    g = Segments(*zip(*[(v, 0, s, e) for v, s, e in gt]))
    p = Segments(*zip(*[(v, 0, s, e) for v, s, e, _ in props]), [sc for *_, sc in props])
    got = average_recall(g, p, [an], [thr])
    assert got.item() == pytest.approx(loop_average_recall(gt, props, an, thr))


def test_threshold_boundary_differs_between_protocols():
    """tIoU exactly at the threshold: a hit for ActivityNet (>=), a miss for THUMOS'14 (>)."""
    gt = Segments([0], [0], [0.0], [4.0])
    det = Segments([0], [0], [0.0], [2.0], [1.0])  # tIoU = 2 / 4 = 0.5
    assert activitynet_ap(gt, det, [0.5], 1).map.item() == 1.0
    assert thumos14_ap(gt, det, [0.5], 1).map.item() == 0.0


def test_activitynet_ids_match_with_and_without_the_v_prefix(shared_data):
    """The official example submission names videos by bare YouTube id, BSN's annotations with
    'v_': scored as the official loop scores them once the ids are made to agree by hand."""
    from gcm_core.data.cards import load_card
    from gcm_core.data.formats import read_annotations, read_detections
    from gcm_core.evaluation import evaluate_detections, select_subset

    card = load_card("activitynet13")
    root = shared_data / "activitynet"
    gt = select_subset(read_annotations(root / "anet_anno_action.json", card), "validation")
    det = read_detections(root / "sample_detection_prediction.json")
    assert all(v.startswith("v_") for v in gt) and not any(v.startswith("v_") for v in det.video)
    result = evaluate_detections(gt, det, card.classes, "activitynet", [0.5, 0.95])

    videos = {v.removeprefix("v_"): k for k, v in enumerate(gt)}
    videos.update({v: len(videos) + k for k, v in enumerate(sorted(set(det.video) - videos.keys()))})
    cls = {c: k for k, c in enumerate(card.classes)}
    gt_rows = [(videos[v.removeprefix("v_")], cls[i.label], i.start, i.end) for v, g in gt.items() for i in g.instances]
    det_rows = [(videos[v], cls[lab], min(s, e), max(s, e), sc)
                for v, lab, s, e, sc in zip(det.video, det.label, det.start, det.end, det.score)]
    expected = np.nanmean(loop_activitynet_ap(gt_rows, det_rows, [0.5, 0.95], len(card.classes)), axis=1)
    np.testing.assert_allclose(result.map.numpy(), expected, atol=1e-9)
    assert result.map.min() > 0.9  # the example is the ground truth itself, plus videos BSN's list lacks

    thumos = read_detections(shared_data / "thumos14/results/CBR/CBR_THUMOS-14_IoU0.5.txt", load_card("thumos14"))
    with pytest.raises(ValueError, match="none of the 213 videos of the detections is a ground-truth video"):
        evaluate_detections(gt, thumos, card.classes, "activitynet", [0.5])
    with pytest.raises(ValueError, match=f"none of the {len(det)} detections has a label among the 20 classes"):
        evaluate_detections(gt, det, load_card("thumos14").classes, "activitynet", [0.5])


def test_class_agnostic_ap_merges_classes_and_keeps_a_segment_once():
    """Two actions found where they are but one with the other's label: the class-aware mAP pays
    for the label (A: 1.0, B: 0.0), the class-agnostic AP does not (1.0); the action reported as A
    and, slightly shifted, as B counts once, with its best score (else a false positive ranked
    second: AP 0.83)."""
    truth = {"v": Video("v", duration=40.0, instances=[Instance("A", 0.0, 10.0), Instance("B", 20.0, 30.0)])}
    dets = Detections(["v"] * 3, ["A", "B", "A"], np.array([0.0, 0.0, 20.0]), np.array([10.0, 9.5, 30.0]),
                      np.array([0.95, 0.9, 0.8]))
    aware = evaluate_detections(truth, dets, ["A", "B"], "thumos14", [0.5])
    assert aware.map[0].item() == pytest.approx(0.5)
    merged_truth, merged = class_agnostic(truth, dets)
    assert sorted(zip(merged.start.tolist(), merged.score.tolist())) == [(0.0, 0.95), (20.0, 0.8)]
    assert [i.label for i in merged_truth["v"].instances] == [AGNOSTIC, AGNOSTIC]
    assert evaluate_detections(merged_truth, merged, [AGNOSTIC], "thumos14", [0.5]).map[0].item() == pytest.approx(1.0)


def test_unmatched_detections_are_counted_with_ids_matched_as_evaluation_matches_them():
    """'v_abcdefghijk' is the ground truth's 'abcdefghijk' (not unmatched); 'other' is outside
    the evaluated videos, 'C' outside the classes, and 'w' is left without a detection."""
    truth = {"abcdefghijk": Video("abcdefghijk", 9.0, instances=[Instance("A", 0.0, 4.0)]),
             "w": Video("w", 9.0, instances=[Instance("B", 1.0, 2.0)])}
    dets = Detections(["v_abcdefghijk", "v_abcdefghijk", "other", "other"], ["A", "C", "A", "C"],
                      np.zeros(4), np.ones(4), np.ones(4))
    unmatched = unmatched_detections(truth, dets, ["A", "B"])
    assert unmatched.counts() == {"detections_on_other_videos": 2, "detections_of_other_labels": 2,
                                  "videos_without_detections": 1}
    assert unmatched.notes(2) == [
        "2 detections on 1 video outside the evaluated ones (other): scored as false positives",
        "2 detections with labels outside the 2 classes (C): ignored",
        "1 evaluated video without a detection (w)"]
    assert unmatched_detections(truth, Detections(["w", "abcdefghijk"], ["B", "A"], *np.ones((3, 2))),
                                ["A", "B"]).notes(2) == []
