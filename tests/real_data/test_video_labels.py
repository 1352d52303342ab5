"""External video-level labels (UntrimmedNet top-2, score product) with the real THUMOS'14 scores."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gcm_core.data.cards import load_card
from gcm_core.data.detections import read_untrimmednet_scores
from gcm_core.data.formats import read_annotations, read_detections, write_result_json
from gcm_core.data.model import Detections
from gcm_core.evaluation import evaluate_detections, select_subset
from gcm_core.postprocess import rescore_with_video_labels
from reference_metrics import loop_thumos_ap
from workflows.cli import main


def independently_rescored(det, raw: np.ndarray, card, top: int = 2) -> list[tuple]:
    """(video, label, start, end, score) of each detection whose official class index is among its
    video's ``top`` best columns of the raw [1574, 101] file, its score times that column's."""
    official = np.array(card.official_index)
    kept = []
    for v, lab, s, e, sc in zip(det.video, det.label, det.start, det.end, det.score):
        if lab not in card.classes:
            continue
        row = raw[int(v.split("_")[-1]) - 1]
        best = set(official[np.argsort(-row[official - 1], kind="stable")[:top]])
        idx = card.official_index[card.classes.index(lab)]
        if idx in best:
            kept.append((v, lab, s, e, sc * row[idx - 1]))
    return kept


def test_untrimmednet_scores_rescore_real_detections(shared_data):
    card = load_card("thumos14")
    th = shared_data / "thumos14"
    gt = read_annotations(th / "annotations/temporal_annotations_test", card)
    scores = read_untrimmednet_scores(th / "untrimmednet_test_scores.npy", card)
    raw = np.load(th / "untrimmednet_test_scores.npy", allow_pickle=False)
    # the column mapping is right: the best-scored class is one of the video's classes for most videos
    annotated = [v for v in gt if gt[v].instances]
    hits = [card.classes[int(np.argmax(scores[v]))] in {i.label for i in gt[v].instances} for v in annotated]
    assert np.mean(hits) > 0.85
    det = read_detections(th / "results/CBR/CBR_THUMOS-14_IoU0.5.txt", card)
    out = rescore_with_video_labels(det, scores, card.classes, top=2)
    expected = independently_rescored(det, raw, card)
    got = sorted(zip(out.video, out.label, out.start, out.end, out.score))
    assert len(got) == len(expected) and 0 < len(got) < len(det)
    for a, b in zip(got, sorted(expected)):
        assert a[:4] == b[:4] and np.isclose(a[4], b[4], rtol=1e-6)


def test_eval_detections_with_video_labels(shared_data, capsys, tmp_path):
    """gcm eval-detections --video-scores: CBR's real detections rescored by UntrimmedNet's top 2
    classes per video score, as the THUMOS'14 evaluator's loop scores them, beside the plain mAP."""
    card = load_card("thumos14")
    th = shared_data / "thumos14"
    folder, results = th / "annotations/temporal_annotations_test", th / "results/CBR/CBR_THUMOS-14_IoU0.5.txt"
    assert main(["eval-detections", "--protocol", "thumos14", "--ground-truth", str(folder), "--detections",
                 str(results), "--tiou", "0.5", "--video-scores", str(th / "untrimmednet_test_scores.npy"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    gt = read_annotations(folder, card)
    raw = np.load(th / "untrimmednet_test_scores.npy", allow_pickle=False)
    index, label = {vid: k for k, vid in enumerate(gt)}, {name: c for c, name in enumerate(card.classes)}
    det_rows = [(index[v], label[lab], s, e, sc, k)
                for k, (v, lab, s, e, sc) in enumerate(independently_rescored(read_detections(results, card), raw, card))]
    gt_rows = [(index[v.id], label[i.label], i.start, i.end) for v in gt.values() for i in v.instances]
    ambiguous = [(index[v.id], s, e) for v in gt.values() for s, e in v.ambiguous]
    reference = 100 * loop_thumos_ap(gt_rows, det_rows, 0.5, len(card.classes), ambiguous).mean()
    assert out["video_labels"]["mAP"] == [pytest.approx(reference, abs=1e-3)]
    assert out["mAP"] == [pytest.approx(31.0, abs=0.01)]   # the detections as given, beside it
    # scores in THUMOS'14's layout need a card with its official class indices: without one, named
    anet = shared_data / "activitynet"
    assert main(["eval-detections", "--protocol", "activitynet", "--ground-truth", str(anet / "anet_anno_action.json"),
                 "--subset", "validation", "--detections", str(anet / "sample_detection_prediction.json"),
                 "--video-scores", str(th / "untrimmednet_test_scores.npy")]) == 2
    assert "in UntrimmedNet's THUMOS'14 layout are read by a card's official class indices" in capsys.readouterr().err
    # scores of none of the detections' videos (the first three rows: videos CBR has no detection on)
    np.save(tmp_path / "three.npy", raw[:3])
    assert main(["eval-detections", "--protocol", "thumos14", "--ground-truth", str(folder), "--detections",
                 str(results), "--video-scores", str(tmp_path / "three.npy")]) == 2
    assert f"{tmp_path / 'three.npy'} scores none of the detections' videos" in capsys.readouterr().err
    # a row that is not finite, named by its video; a pickled array is refused, not loaded
    spoilt = raw.copy()
    spoilt[6, 0] = np.nan   # column 0 is UCF101 class 1, which is no THUMOS'14 class: not read
    spoilt[4, card.official_index[0] - 1] = np.nan
    np.save(tmp_path / "nan.npy", spoilt)
    np.save(tmp_path / "pickled.npy", np.array([{"video": 1}], dtype=object), allow_pickle=True)
    for name, message in (("nan.npy", "video video_test_0000005: a score that is not finite"),
                          ("pickled.npy", "not a numeric .npy array")):
        assert main(["eval-detections", "--protocol", "thumos14", "--ground-truth", str(folder), "--detections",
                     str(results), "--video-scores", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err


def test_eval_detections_with_activitynet_class_scores(shared_data, capsys, tmp_path):
    """--video-scores FILE.json: ActivityNet class scores in the layout BSN and BMN read (class
    names, a row per video, YouTube ids with or without the annotations' v_), matched to the card's
    classes by name, rescore detections on the real validation videos as a per-detection loop does."""
    card = load_card("activitynet13")
    anno = shared_data / "activitynet/anet_anno_action.json"
    truth = select_subset(read_annotations(anno, card), "validation")
    rng = np.random.default_rng(0)
    videos = sorted(truth)[:80]
    rows = []
    for vid in videos:
        for inst in truth[vid].instances:
            other = card.classes[int(rng.integers(card.num_classes))]
            for label in (inst.label, other):
                shift = rng.uniform(-0.1, 0.1) * (inst.end - inst.start)
                rows.append((vid.removeprefix("v_"), label, inst.start + shift, inst.end + shift, rng.uniform(0.1, 1)))
    detections = tmp_path / "detections.json"
    write_result_json(detections, Detections([r[0] for r in rows], [r[1] for r in rows],
                                             *(np.array([r[k] for r in rows]) for k in (2, 3, 4))))
    names = [*rng.permutation(card.classes), "Not a class of the card"]   # the file's own order
    table = {vid.removeprefix("v_"): rng.uniform(0, 1, len(names)) for vid in videos[:70]}  # 10 videos unscored
    for vid in videos[:35]:   # a video's own class on top for half of them
        table[vid.removeprefix("v_")][names.index(truth[vid].instances[0].label)] = 2.0
    scores = tmp_path / "cuhk_val_simp_share.json"
    spelt = {v: f"v_{v}" if k % 3 == 0 else v for k, v in enumerate(table)}   # some files keep the v_
    scores.write_text(json.dumps({"class": names, "results": {spelt[v]: row.tolist() for v, row in table.items()}}))

    args = ["eval-detections", "--protocol", "activitynet", "--ground-truth", str(anno), "--card", "activitynet13",
            "--detections", str(detections), "--json"]
    assert main([*args, "--video-scores", str(scores)]) == 0
    out = json.loads(capsys.readouterr().out)
    kept = []
    for vid, label, start, end, score in rows:
        if vid in table:
            best = [names[k] for k in np.argsort(-table[vid], kind="stable") if names[k] in card.classes][:2]
            if label in best:
                kept.append((vid, label, start, end, score * table[vid][names.index(label)]))
    assert 0 < len(kept) < len(rows)
    expected = evaluate_detections(truth, Detections([r[0] for r in kept], [r[1] for r in kept],
                                                     *(np.array([r[k] for r in kept]) for k in (2, 3, 4))),
                                   card.classes, "activitynet", card.tiou).as_dict(card.classes)
    assert out["video_labels"]["mAP"] == pytest.approx(expected["mAP"], abs=1e-9)
    # a file without one of the dataset's classes, or with a row of another length, is named
    names.remove(card.classes[5])
    scores.write_text(json.dumps({"class": names, "results": {}}))
    assert main([*args, "--video-scores", str(scores)]) == 2
    assert f"{scores}, field 'class': has no scores of 1 of the dataset's 200 classes, e.g. ['{card.classes[5]}']" \
        in capsys.readouterr().err
    scores.write_text(json.dumps({"class": card.classes, "results": {"abc": [0.5] * 3}}))
    assert main([*args, "--video-scores", str(scores)]) == 2
    assert f"{scores}, video abc, field 'results': expected 200 finite scores, one per class" in capsys.readouterr().err
