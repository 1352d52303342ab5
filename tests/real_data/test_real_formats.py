"""Every real file of ../shared/data read by the project's readers, with exact counts."""
from __future__ import annotations

import csv
import json
import re
from collections import Counter

import numpy as np
import pytest

from gcm_core.data.cards import load_card
from gcm_core.data.dataset import DatasetSource
from gcm_core.data.formats import (
    Detections, FormatError, ProposalSource, Video, load_features, read_annotations, read_avoid_list,
    read_detections, read_proposals, read_ssn_blocks, read_video_info, read_video_proposals, result_json,
)
from gcm_core.evaluation import evaluate_detections


@pytest.fixture(scope="module")
def thumos():
    return load_card("thumos14")


@pytest.fixture(scope="module")
def anet():
    return load_card("activitynet13")


def instances(videos):
    return Counter((v.id, i.label, round(i.start, 3), round(i.end, 3)) for v in videos.values() for i in v.instances)


def ambiguous(videos):
    return sorted((v.id, s, e) for v in videos.values() for s, e in v.ambiguous)


def test_thumos_class_folders(shared_data, thumos):
    root = shared_data / "thumos14/annotations"
    val = read_annotations(root / "temporal_annotations_validation", thumos)
    test = read_annotations(root / "temporal_annotations_test", thumos)
    assert (len(val), sum(len(v.instances) for v in val.values())) == (200, 3007)
    assert (len(test), sum(len(v.instances) for v in test.values())) == (213, 3358)
    assert test["video_test_0001292"].instances == [] and test["video_test_0001292"].ambiguous
    amb_lines = [ln for ln in (root / "temporal_annotations_test/Ambiguous_test.txt").read_text().splitlines() if ln.strip()]
    assert len(ambiguous(test)) == len(amb_lines)
    assert all(v.duration and v.subset == "test" for v in test.values())  # merged from test_durations.txt
    # official double labelling: every CliffDiving instance is also a Diving one
    cliff = {(k[0], k[2], k[3]) for k in instances(test) if k[1] == "CliffDiving"}
    diving = {(k[0], k[2], k[3]) for k in instances(test) if k[1] == "Diving"}
    assert cliff and cliff <= diving


def test_thumos_json_and_csvs_agree_with_the_folder_on_every_test_instance(shared_data, thumos):
    root = shared_data / "thumos14/annotations"
    folder = read_annotations(root / "temporal_annotations_test", thumos)
    whole = read_annotations(root / "thumos14.json", thumos)
    assert (len(whole), sum(len(v.instances) for v in whole.values())) == (412, 6365)
    as_json = {k: v for k, v in whole.items() if v.subset == "test"}
    gtad = read_annotations(root / "test_Annotation.csv", thumos)  # type_idx: official indices
    bsn = read_annotations(root / "thumos14_test_groundtruth.csv", thumos)  # label-idx: 0-based
    assert instances(folder) == instances(as_json) == instances(gtad) == instances(bsn)
    assert ambiguous(folder) == ambiguous(gtad) == ambiguous(bsn)
    assert all(v.fps and v.n_frames for v in bsn.values())
    val = read_annotations(root / "val_Annotation.csv", thumos)
    assert instances(val) == instances(read_annotations(root / "temporal_annotations_validation", thumos))


def test_thumos_class_lists_match_the_card(shared_data, thumos):
    root = shared_data / "thumos14/annotations"
    det_list = [ln.split()[1] for ln in (root / "detclasslist.txt").read_text().splitlines() if ln.strip()]
    assert tuple(det_list) == thumos.classes
    for name in ("official_readme_val.txt", "official_readme_test.txt"):
        pairs = re.findall(r"^(\d+) (\w+)\s*$", (root / name).read_text(), flags=re.M)
        assert [(int(i), n) for i, n in pairs] == list(zip(thumos.official_index, thumos.classes))


def test_thumos_video_info_files(shared_data):
    info = read_video_info(shared_data / "thumos14/video_info/TH14_video_info.json")
    assert len(info) == 412 and all(v.fps and v.n_frames for v in info.values())
    lengths = {**read_video_info(shared_data / "thumos14/video_info/thumos14_video_length_val.txt"),
               **read_video_info(shared_data / "thumos14/video_info/thumos14_video_length_test.txt")}
    assert len(lengths) == 413
    test_d = read_video_info(shared_data / "thumos14/annotations/test_durations.txt")
    val_d = read_video_info(shared_data / "thumos14/annotations/validation_durations.txt")
    assert (len(test_d), len(val_d)) == (1574, 1010)
    shared = set(info) & set(test_d)
    assert max(abs(info[v].duration - test_d[v].duration) for v in shared) < 0.5
    assert len(read_avoid_list(shared_data / "thumos14/annotations/test_avoid_videos.txt")) == 14
    assert len(read_avoid_list(shared_data / "thumos14/annotations/validation_avoid_videos.txt")) == 7


def test_thumos_proposal_lists(shared_data, thumos):
    root = shared_data / "thumos14"
    assert [len(read_ssn_blocks(root / f"proposals/tag_{s}_proposal_list.txt")) for s in ("val", "test")] == [199, 213]
    info = read_video_info(root / "video_info/TH14_video_info.json")
    val = read_proposals(root / "proposals/tag_val_proposal_list.txt", info)
    assert len(val) == 199 and 6 <= min(map(len, val.values())) and max(map(len, val.values())) == 1282
    test_gt = read_annotations(root / "annotations/temporal_annotations_test", thumos)
    test = read_proposals(root / "proposals/tag_test_proposal_list.txt", test_gt)
    assert len(test) == 213 and max(map(len, test.values())) == 1875
    for vid, props in test.items():  # seconds, inside the video after clipping the small overshoot
        assert (props.end > props.start).all() and props.end.max() <= test_gt[vid].duration
    # the list's embedded ground truth (frames, 1-based labels) is the annotation, at 30 fps
    block = read_ssn_blocks(root / "proposals/tag_test_proposal_list.txt")[0]
    fps = block.n_frames / test_gt[block.video].duration
    embedded = sorted((thumos.classes[label - 1], s / fps, e / fps) for label, s, e in block.gt)
    annotated = sorted((i.label, i.start, i.end) for i in test_gt[block.video].instances)
    assert [x[0] for x in embedded] == [x[0] for x in annotated]
    assert np.abs(np.array([x[1:] for x in embedded]) - np.array([x[1:] for x in annotated])).max() < 0.1
    turn_gt = read_annotations(root / "annotations/thumos14_test_groundtruth.csv", thumos)
    turn = read_proposals(root / "proposals/test_proposals_from_TURN.txt", turn_gt)
    n_lines = sum(1 for ln in (root / "proposals/test_proposals_from_TURN.txt").read_text().splitlines() if ln.strip())
    assert len(turn) == 213 and sum(map(len, turn.values())) == n_lines
    # what a preprocessing worker reads: one video at a time, the same proposals, also where its
    # annotations hold only some of the file's videos (one subset of a file covering several)
    for path, whole, videos in ((root / "proposals/tag_test_proposal_list.txt", test, test_gt),
                                (root / "proposals/test_proposals_from_TURN.txt", turn, turn_gt)):
        picked = list(whole)[::20]
        source = ProposalSource(path, {vid: videos[vid] for vid in picked})
        for vid in picked:
            one = source[vid]
            for field in ("start", "end", "score"):
                np.testing.assert_array_equal(getattr(one, field), getattr(whole[vid], field))
        if path.name.startswith("tag"):  # what gcm detect reads: one video picked, given its fps and duration
            for vid in list(whole)[::40]:
                one = read_video_proposals(path, Video(vid, videos[vid].duration, videos[vid].fps))
                np.testing.assert_array_equal(one.intervals, whole[vid].intervals)
        with pytest.raises(FormatError, match="video_test_9999999: no proposals for this video"):
            ProposalSource(path, {**videos, "video_test_9999999": Video("video_test_9999999", 10.0, 30.0)})[
                "video_test_9999999"]


def test_cbr_results_and_untrimmednet_scores(shared_data, thumos):
    for t in (0.1, 0.5, 0.7):
        path = shared_data / f"thumos14/results/CBR/CBR_THUMOS-14_IoU{t}.txt"
        det = read_detections(path, thumos)
        assert len(det) == sum(1 for ln in path.read_text().splitlines() if ln.strip())
    det = read_detections(shared_data / "thumos14/results/CBR/CBR_THUMOS-14_IoU0.5.txt", thumos)
    assert (det.start > det.end).any()  # reversed intervals are kept for the protocol to re-order
    scores = np.load(shared_data / "thumos14/untrimmednet_test_scores.npy", allow_pickle=False)
    assert scores.shape == (1574, 101) and scores.dtype == np.float32


def test_activitynet_annotations_and_video_info(shared_data, anet):
    root = shared_data / "activitynet"
    videos = read_annotations(root / "anet_anno_action.json")
    assert len(videos) == 19228
    assert Counter(v.subset for v in videos.values()) == {"training": 9649, "validation": 4728, "testing": 4851}
    assert {i.label for v in videos.values() for i in v.instances} == set(anet.classes)
    val_csv = read_annotations(root / "anet_val_groundtruth_label.csv", anet)  # label-idx: action_name.csv order
    val_json = {k: v for k, v in videos.items() if v.subset == "validation"}
    assert len(val_csv) == 4728 and instances(val_csv) == instances(val_json)
    with (root / "action_name.csv").open() as f:
        assert tuple(row[0] for row in list(csv.reader(f))[1:]) == anet.classes
    info = read_video_info(root / "video_info_new.csv")  # BSN's: video, numFrame, seconds, fps, rfps, subset
    assert len(info) == 19228 and info.keys() == videos.keys()
    first = info["v_---9CpRcKoU"]  # its row: v_---9CpRcKoU,418,14.07,30.0,29.70...,training,400
    assert (first.n_frames, first.duration, first.fps, first.subset) == (418, 14.07, 30.0, "training")
    sample = read_annotations(root / "official_schema_sample_gt.json", anet)
    assert len(sample) == 2 and sample["v_bYUmtLBL7W4"].duration == pytest.approx(224.49)
    assert len(sample["v_bYUmtLBL7W4"].instances) == 3


def test_activitynet_tag_list_prediction_sample_and_feature(shared_data):
    root = shared_data / "activitynet"
    blocks = read_ssn_blocks(root / "activitynet1.2_tag_val_normalized_proposal_list.txt")
    assert len(blocks) == 2383 and all(b.normalized for b in blocks)
    bsn = read_annotations(root / "anet_anno_action.json")  # BSN spells ids v_<YouTube id>, the list bare
    annotated = {k.removeprefix("v_"): v for k, v in bsn.items()}
    tag_list = root / "activitynet1.2_tag_val_normalized_proposal_list.txt"
    props = read_proposals(tag_list, bsn, skip_unknown=True)
    known = [b.video for b in blocks if b.video in annotated]
    assert sorted(props) == sorted(known) and len(known) < 2383  # v1.2 videos gone from v1.3 are skipped
    vid = known[0]
    assert props[vid].end.max() <= annotated[vid].duration
    np.testing.assert_array_equal(ProposalSource(tag_list, bsn)[f"v_{vid}"].intervals, props[vid].intervals)
    pred = read_detections(root / "sample_detection_prediction.json")
    assert len(pred) > 0 and len(set(pred.video)) > 1
    # written back as the official example (bare YouTube ids), also from BSN's v_<id> spelling
    official = json.loads((root / "sample_detection_prediction.json").read_text())
    assert result_json(pred)["results"] == official["results"]
    bsn_spelled = Detections([f"v_{v}" for v in pred.video], pred.label, pred.start, pred.end, pred.score)
    assert result_json(bsn_spelled)["results"] == official["results"]
    feat = load_features(root / "features/example_feat.npy")
    assert feat.shape == (100, 400) and feat.dtype == np.float32


def test_the_thumos14_card_scores_its_test_split_with_the_official_ambiguous_segments(shared_data, thumos, tmp_path):
    """thumos14.json (the card's annotations, for their frame rates) leaves out THUMOS'14's
    Ambiguous segments, whose detections the official protocol does not score: the card adds them
    from Ambiguous_test.txt, so that a run's test split scores CBR's real detections as the
    official per-class files do (30.09 without them)."""
    official = shared_data / "thumos14/annotations"
    root = tmp_path / "root"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations/thumos14.json").symlink_to(official / "thumos14.json")
    with pytest.raises(FormatError, match=r"Ambiguous_test.txt: no such file under the data root .*ambiguous\.test"):
        DatasetSource(thumos, root, "test")
    (root / "annotations/Ambiguous_test.txt").symlink_to(official / "temporal_annotations_test/Ambiguous_test.txt")
    videos = DatasetSource(thumos, root, "test").videos
    assert videos["video_test_0000278"].ambiguous == [(0.0, 1.4), (95.7, 97.2)]   # the file's first two lines
    per_class = read_annotations(official / "temporal_annotations_test", thumos)
    detections = read_detections(shared_data / "thumos14/results/CBR/CBR_THUMOS-14_IoU0.5.txt", thumos)
    ours = evaluate_detections(videos, detections, thumos.classes, "thumos14", [0.5]).map.item()
    theirs = evaluate_detections({v: per_class[v] for v in videos}, detections, thumos.classes, "thumos14",
                                 [0.5]).map.item()
    assert ours == pytest.approx(theirs, abs=1e-12) and 100 * ours == pytest.approx(30.56, abs=0.01)
