"""The synthetic benchmark: real-data layout, determinism, calibration and its knobs."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from gcm_core.data.cards import load_card
from gcm_core.data.dataset import DatasetSource
from gcm_core.data.formats import read_annotations, read_proposals
from gcm_core.data.synthetic import Relations, generate_dataset, measure_structure
from workflows.cli import main


def digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_written_as_real_data_and_read_back(tmp_path):
    assert main(["synth", "--out", str(tmp_path), "--scale", "small", "--seed", "1"]) == 0
    card = load_card(tmp_path / "card.yaml")
    assert card.snippets["dim"] == 128 and card.extra["generated"]["videos"] == {"test": 24, "validation": 48}
    for role, n in (("train", 48), ("test", 24)):
        source = DatasetSource(card, tmp_path, role)
        assert len(source.videos) == n
        inputs = source.load(source.video_ids[0])
        assert inputs.features["rgb"].shape == inputs.features["flow"].shape
        assert inputs.features["rgb"].shape[1] == 128 and len(inputs.proposals) > 20


def test_deterministic_for_a_seed(tmp_path):
    card = load_card("synthetic")
    generate_dataset(tmp_path / "a", card, "small", seed=5)
    generate_dataset(tmp_path / "b", card, "small", seed=5)
    generate_dataset(tmp_path / "c", card, "small", seed=6)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_structure_is_calibrated_to_thumos(tmp_path, shared_data):
    """Sampled videos reproduce the measured THUMOS'14 statistics written in the card."""
    card = load_card("synthetic")
    generate_dataset(tmp_path, card, "medium", seed=0)
    videos = read_annotations(tmp_path / "annotations.json", card)
    measured = measure_structure(videos, list(card.classes))
    target = card.extra["structure"]
    assert measured["foreground_fraction"][0] == pytest.approx(target["foreground_fraction"][0], abs=0.04)
    assert measured["second_class_probability"] == pytest.approx(target["second_class_probability"], abs=0.06)
    lengths = np.array(measured["class_log_length"])[:, 0]
    assert np.corrcoef(lengths, np.array(target["class_log_length"])[:, 0])[0, 1] > 0.9
    # and the card's numbers are what the real files give
    thumos = load_card("thumos14")
    real = {}
    for folder in ("temporal_annotations_validation", "temporal_annotations_test"):
        real.update(read_annotations(shared_data / "thumos14/annotations" / folder, thumos))
    again = measure_structure(real, list(thumos.classes))
    assert again["foreground_fraction"] == target["foreground_fraction"]
    assert again["class_log_length"] == target["class_log_length"]


def test_relation_knobs_show_in_the_features(tmp_path):
    """Background snippets of videos sharing a home scene look alike, unless the control is asked."""
    card = load_card("synthetic")

    def scene_separation(root, control):
        generate_dataset(root, card, "small", seed=2, control=control)
        source = DatasetSource(load_card(root / "card.yaml"), root, "train")
        means, scenes = [], []
        for vid in source.video_ids:
            v = source.videos[vid]
            feats = source.load(vid).features["rgb"]
            means.append(feats.mean(0) / np.linalg.norm(feats.mean(0)))
            scenes.append(card.classes.index(v.instances[0].label) % 5)
        sim = np.array(means) @ np.array(means).T
        same = np.equal.outer(scenes, scenes) & ~np.eye(len(scenes), dtype=bool)
        return sim[same].mean() - sim[~same & ~np.eye(len(scenes), dtype=bool)].mean()

    related, control = scene_separation(tmp_path / "rel", False), scene_separation(tmp_path / "ctl", True)
    assert related > 0.05 and related > 4 * abs(control), (related, control)
    assert all(v == 0 for v in vars(Relations.control()).values())


def test_shared_look_makes_a_videos_instances_alike(tmp_path):
    """With ``shared_look`` the instances of one video resemble each other more than instances of
    their class in other videos do, by more than twice what the video's scene alone gives."""
    card = load_card("synthetic")

    def within_minus_across(share):
        card.extra["relations"] = {**card.extra["relations"], "shared_look": share}
        root = tmp_path / str(share)
        generate_dataset(root, card, "small", seed=3)
        source = DatasetSource(load_card(root / "card.yaml"), root, "train")
        means, labels, videos = [], [], []
        for vid in source.video_ids:
            feats = source.load(vid).features["flow"]
            seconds = np.arange(len(feats)) * 8 / 30 + 32 / 30  # snippet centres (frames [8t, 8t + 64))
            for inst in source.videos[vid].instances:
                inside = feats[(seconds >= inst.start) & (seconds <= inst.end)]
                if len(inside):
                    means.append(inside.mean(0) / np.linalg.norm(inside.mean(0)))
                    labels.append(inst.label)
                    videos.append(vid)
        sim = np.array(means) @ np.array(means).T
        pair = np.equal.outer(labels, labels) & ~np.eye(len(labels), dtype=bool)
        same_video = np.equal.outer(videos, videos)
        return sim[pair & same_video].mean() - sim[pair & ~same_video].mean()

    shared, own = within_minus_across(1.0), within_minus_across(0.0)
    assert shared > 2 * own and shared - own > 0.05, (shared, own)


def test_structure_from_real_annotation_and_proposals(tmp_path, shared_data):
    th = shared_data / "thumos14"
    rc = main(["synth", "--out", str(tmp_path), "--structure-from", str(th / "annotations/temporal_annotations_test"),
               "--proposals", str(th / "proposals/tag_test_proposal_list.txt")])
    assert rc == 0
    card = load_card(tmp_path / "card.yaml")
    videos = read_annotations(tmp_path / "annotations.json", card)
    assert len(videos) == 212 and sum(len(v.instances) for v in videos.values()) == 3358
    props = read_proposals(tmp_path / "proposals/test_proposal_list.txt", videos)
    real = read_proposals(th / "proposals/tag_test_proposal_list.txt",
                          read_annotations(th / "annotations/temporal_annotations_test", load_card("thumos14")))
    vid = "video_test_0000004"
    assert len(props[vid]) == len(real[vid])
    np.testing.assert_allclose(props[vid].start, real[vid].start, atol=1 / 30 + 1e-6)


def test_real_structure_the_card_cannot_hold_is_refused(tmp_path, shared_data, capsys):
    """ActivityNet's annotations name more classes than the synthetic card has (a KeyError on
    the first class past its 20 before); videos of none of its subsets would give no dataset."""
    annotations = shared_data / "activitynet/anet_anno_action.json"
    names = {a["label"] for v in json.loads(annotations.read_text()).values() for a in v["annotations"]}
    assert len(names) > 20
    assert main(["synth", "--out", str(tmp_path / "out"), "--structure-from", str(annotations),
                 "--structure-card", "activitynet13"]) == 2
    assert (f"the real annotations name {len(names)} classes, the synthetic card 20"
            in capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
    # the card's classes, but videos of a subset the card does not have: no train or test video
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"database": {"v1": {"subset": "training", "duration": 100.0, "annotations": [
        {"segment": [10.0, 20.0], "label": load_card("synthetic").classes[0]}]}}}))
    assert main(["synth", "--out", str(tmp_path / "out"), "--structure-from", str(other),
                 "--structure-card", "synthetic"]) == 2
    assert "the real videos' subsets ['training'] are not the card's ['test', 'validation']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
