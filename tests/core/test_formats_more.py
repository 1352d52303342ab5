"""Formats that the shared real files do not cover: feature containers, BSN CSVs, writers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gcm_core.data.atomic import atomic_copy, atomic_write, atomic_write_text
from gcm_core.data.cards import load_card
from gcm_core.data.formats import (
    Detections, FormatError, Instance, ProposalSource, Proposals, Video, load_features, read_annotations,
    read_detections, read_proposals, read_video_proposals, write_annotations_json, write_result_json, write_ssn_list,
    write_thumos_text,
)


def test_feature_containers_read_alike(tmp_path):
    feats = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float64)
    np.save(tmp_path / "a.npy", feats)
    np.savez(tmp_path / "b.npz", feats=feats, other=np.zeros(3))
    torch.save(torch.from_numpy(feats), tmp_path / "c.pt")
    loaded = [load_features(tmp_path / name) for name in ("a.npy", "b.npz", "c.pt")]
    for array in loaded:
        assert array.dtype == np.float32 and array.shape == (12, 5)
        np.testing.assert_array_equal(array, loaded[0])


def test_bsn_csv_folder_and_single_csv(tmp_path):
    videos = {"v1": Video("v1", duration=100.0, fps=25.0), "v2": Video("v2", duration=50.0, fps=25.0)}
    folder = tmp_path / "pem"
    folder.mkdir()
    (folder / "v1.csv").write_text("xmin,xmax,xmin_score,xmax_score,iou_score,score\n0.1,0.3,1,1,1,0.9\n0.5,0.6,1,1,1,0.4\n")
    (folder / "v2.csv").write_text("xmin,xmax,score\n0.0,1.0,0.7\n")
    props = read_proposals(folder, videos)
    np.testing.assert_allclose(props["v1"].intervals, [[10, 30], [50, 60]])
    np.testing.assert_allclose(props["v1"].score, [0.9, 0.4])
    assert props["v2"].intervals.tolist() == [[0.0, 50.0]]
    single = tmp_path / "all.csv"
    single.write_text("video-name,t-start,t-end,score\nv1,3.0,9.5,0.8\nv2,1.0,2.0,0.1\n")
    props = read_proposals(single, videos)
    assert props["v1"].intervals.tolist() == [[3.0, 9.5]] and props["v2"].score.tolist() == [0.1]
    for path, video, expected in ((folder, "v1", [[10, 30], [50, 60]]), (single, "v1", [[3.0, 9.5]])):
        np.testing.assert_allclose(ProposalSource(path, videos)[video].intervals, expected)  # one video at a time


def test_normalized_csv_of_many_videos_read_one_video_at_a_time(tmp_path):
    """Positions as fractions need the video's duration: a reader that knows some of the file's
    videos (one subset; gcm detect's one new video) reads those and is not stopped by the others."""
    path = tmp_path / "bmn.csv"
    path.write_text("video,xmin,xmax,score\nv1,0.1,0.2,0.9\nv2,0.3,0.5,0.8\nv1,0.5,1.0,0.3\n")
    v1 = Video("v1", duration=40.0, fps=25.0)
    np.testing.assert_allclose(ProposalSource(path, {"v1": v1})["v1"].intervals, [[4, 8], [20, 40]])
    np.testing.assert_allclose(read_video_proposals(path, v1).score, [0.9, 0.3])
    assert list(read_proposals(path, {"v1": v1}, skip_unknown=True)) == ["v1"]
    with pytest.raises(FormatError, match="v2: no annotation for this video: its duration is needed"):
        read_proposals(path, {"v1": v1})


def test_written_files_read_back(tmp_path):
    card = load_card("thumos14")
    video = Video("video_test_0000001", duration=30.0, fps=30.0, n_frames=900, subset="test",
                  instances=[Instance("Diving", 2.0, 5.0), Instance("HighJump", 10.0, 14.5)])
    write_annotations_json(tmp_path / "gt.json", {video.id: video}, card.classes)
    back = read_annotations(tmp_path / "gt.json", card)[video.id]
    assert [(i.label, i.start, i.end) for i in back.instances] == [("Diving", 2.0, 5.0), ("HighJump", 10.0, 14.5)]
    assert json.loads((tmp_path / "gt.json").read_text())["database"][video.id]["annotations"][0]["label_id"] == 7
    props = Proposals(np.array([1.0, 9.9]), np.array([5.5, 15.0]), np.ones(2))
    write_ssn_list(tmp_path / "list.txt", {video.id: video}, {video.id: props}, card.classes)
    again = read_proposals(tmp_path / "list.txt", {video.id: video})[video.id]
    np.testing.assert_allclose(again.intervals, props.intervals, atol=1 / 30)
    dets = Detections([video.id] * 2, ["Diving", "HighJump"], np.array([2.1, 10.0]), np.array([5.0, 14.0]),
                      np.array([0.9, 0.5]))
    write_result_json(tmp_path / "dets.json", dets)
    write_thumos_text(tmp_path / "dets.txt", dets, card)
    for path in (tmp_path / "dets.json", tmp_path / "dets.txt"):
        read = read_detections(path, card)
        assert read.label == dets.label and read.start.tolist() == pytest.approx(dets.start.tolist())
    assert (tmp_path / "dets.txt").read_text().split()[3] == "26"  # Diving's official index


def test_atomic_write_keeps_old_file_on_failure_and_uses_normal_permissions(tmp_path):
    target = tmp_path / "results.md"
    atomic_write_text(target, "first")
    reference = tmp_path / "plain.md"
    reference.write_text("plain")
    assert target.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777

    def fail_midway(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail_midway)
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.md", "results.md"]
    with pytest.raises(FileNotFoundError):  # a copy (a run's weights, a card) whose source vanished
        atomic_copy(tmp_path / "gone.md", target)
    atomic_copy(reference, target)
    assert target.read_text() == "plain"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.md", "results.md"]
