"""Bad input: one clear error per case, naming the file, the video and the line or field."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import yaml

from gcm_core.data.cards import CardError, load_card
from gcm_core.data.dataset import DatasetSource
from gcm_core.data.formats import FormatError, read_annotations, read_detections, read_proposals, read_video_proposals
from gcm_core.data.model import Detections, Video
from gcm_core.data.synthetic import generate_dataset
from gcm_core.evaluation import evaluate_detections


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny synthetic dataset laid out as real data; tests break copies of its files."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, load_card("synthetic"), "small", seed=3)
    return root


@pytest.fixture()
def broken(dataset, tmp_path):
    import shutil
    shutil.copytree(dataset, tmp_path / "data")
    return tmp_path / "data"


def first_video(root, role="train"):
    source = DatasetSource(load_card(root / "card.yaml"), root, role)
    return source, source.video_ids[0]


def expect(call, *fragments):
    with pytest.raises(FormatError) as err:
        call()
    for fragment in fragments:
        assert str(fragment) in str(err.value), err.value
    return err.value


def test_wrong_data_root_is_named(dataset, tmp_path):
    expect(lambda: DatasetSource(load_card(dataset / "card.yaml"), tmp_path, "train"), "annotations.json",
           f"no such file under the data root {tmp_path.resolve()}", "--data-root")


def test_activitynet_ids_are_found_under_either_spelling(broken):
    """Annotations naming a video v_<YouTube id>, its features and proposal block the bare id
    (BSN's files beside official ones): the video loads as it did under one name."""
    source, vid = first_video(broken, "test")
    before = source.load(vid)
    for path in (broken / "annotations.json", broken / "proposals/test_proposal_list.txt"):
        new_id = "v_abcdefghijk" if path.suffix == ".json" else "abcdefghijk"
        path.write_text(path.read_text().replace(vid, new_id))
    for stream in ("rgb", "flow"):
        (broken / f"features/{stream}/{vid}.npy").rename(broken / f"features/{stream}/abcdefghijk.npy")
    after = DatasetSource(load_card(broken / "card.yaml"), broken, "test").load("v_abcdefghijk")
    np.testing.assert_array_equal(after.proposals.intervals, before.proposals.intervals)
    for stream in ("rgb", "flow"):
        np.testing.assert_array_equal(after.features[stream], before.features[stream])


def test_missing_feature_file(broken):
    source, vid = first_video(broken)
    source.feature_path(vid, "flow").unlink()
    expect(lambda: source.load(vid), "feature file missing", vid, f"flow/{vid}.npy")


def test_too_few_snippets_for_the_duration(broken):
    source, vid = first_video(broken)
    for stream in ("rgb", "flow"):
        path = source.feature_path(vid, stream)
        np.save(path, np.load(path)[:5])
    expect(lambda: source.load(vid), "T=5 snippets cover only", vid, "rgb")


def test_snippets_far_past_the_duration_are_another_videos_or_another_rate(broken):
    """Features spanning twice the annotated duration (another video's, or extracted at another
    frame rate than the card's) were pooled as if they fit: every unit from other seconds."""
    source, vid = first_video(broken)
    for stream in ("rgb", "flow"):
        path = source.feature_path(vid, stream)
        features = np.load(path)
        np.save(path, np.concatenate([features, features]))
    expect(lambda: source.load(vid), f"T={2 * len(features)} snippets at 30 fps span", vid, "rgb")


def test_native_frame_rate_snippets_need_annotations_with_frame_rates(broken):
    """A card whose snippets lie on each video's own frame rate (THUMOS'14's) read with annotations
    that give none (the official per-class files) stopped on a TypeError in every video's worker."""
    card = broken / "card.yaml"
    assert "\n  fps: 30\n" in card.read_text()
    card.write_text(card.read_text().replace("\n  fps: 30\n", "\n  fps: native\n"))
    annotations = json.loads((broken / "annotations.json").read_text())
    source, vid = first_video(broken)
    del annotations["database"][vid]["fps"]
    (broken / "annotations.json").write_text(json.dumps(annotations))
    source = DatasetSource(load_card(card), broken, "train")
    for call in (lambda: source.check_layout(proposals=True), lambda: source.load(vid)):
        expect(call, "annotations.json", f"video {vid}, field 'fps'", "no frame rate for 1 video(s)",
               "snippets.fps: native")


def test_flow_one_snippet_short_is_aligned_and_more_is_an_error(broken):
    """Optical flow of n frames has n - 1 fields: a flow stream one snippet shorter than RGB is the
    same frames, so RGB's last snippet is dropped; streams further apart are refused."""
    source, vid = first_video(broken)
    rgb, flow = (np.load(source.feature_path(vid, s)) for s in ("rgb", "flow"))
    np.save(source.feature_path(vid, "flow"), flow[:-1])
    loaded = source.load(vid)
    np.testing.assert_array_equal(loaded.features["rgb"], rgb[:-1])
    np.testing.assert_array_equal(loaded.features["flow"], flow[:-1])
    assert loaded.grid.num_snippets == len(rgb) - 1
    np.save(source.feature_path(vid, "flow"), flow[:-2])
    expect(lambda: source.load(vid), "streams disagree on the number of snippets", f"'rgb': {len(rgb)}",
           f"'flow': {len(rgb) - 2}", vid, f"rgb/{vid}.npy")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_features(broken, value):
    source, vid = first_video(broken)
    path = source.feature_path(vid, "rgb")
    feats = np.load(path)
    feats[7, 3] = value
    np.save(path, feats)
    expect(lambda: source.load(vid), "non-finite value", "snippet 7", vid)


@pytest.mark.parametrize("array,problem", [(np.zeros((10, 128), dtype=np.int32), "dtype int32"),
                                           (np.zeros((10, 4, 32), dtype=np.float32), "shape [T, C]")])
def test_wrong_dtype_or_ndim(broken, array, problem):
    source, vid = first_video(broken)
    np.save(source.feature_path(vid, "rgb"), array)
    expect(lambda: source.load(vid), problem, vid)


def test_a_format_error_crosses_processes_whole():
    """Ray hands a task's exception to the driver pickled: it comes back with its message and fields."""
    err = FormatError("features/flow/v1.npy", "bad width", video="v1", line=3, field="dim")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is FormatError
    assert str(back) == str(err) == "features/flow/v1.npy, line 3, video v1, field 'dim': bad width"
    assert (back.path, back.problem, back.video, back.line, back.field) == (err.path, "bad width", "v1", 3, "dim")


def test_pickled_npy_is_refused(broken):
    source, vid = first_video(broken)
    np.save(source.feature_path(vid, "rgb"), np.array([{"feats": 1}], dtype=object), allow_pickle=True)
    expect(lambda: source.load(vid), "without unpickling", vid)


def test_proposal_with_end_before_start(broken):
    path = broken / "proposals/test_proposal_list.txt"
    lines = path.read_text().splitlines()
    k = next(i for i, line in enumerate(lines) if len(line.split()) == 5)  # first proposal line
    label, iou, ov, s, e = lines[k].split()
    lines[k] = f"{label} {iou} {ov} {e} {s}"
    path.write_text("\n".join(lines) + "\n")
    source = DatasetSource(load_card(broken / "card.yaml"), broken, "test")
    expect(lambda: source.load(source.video_ids[0]), "end > start", f"line {k + 1}")


def test_proposal_outside_the_video(broken):
    videos = read_annotations(broken / "annotations.json")
    vid = next(iter(videos))
    text = broken / "turn.txt"
    text.write_text(f"{vid} 10 {int(videos[vid].duration + 50)} 0.5\n")
    expect(lambda: read_proposals(text, videos, time_unit="seconds"), "outside the video", vid, "line 1")


def test_label_not_in_the_card(broken):
    data = json.loads((broken / "annotations.json").read_text())
    vid = next(iter(data["database"]))
    data["database"][vid]["annotations"][0]["label"] = "Juggling"
    (broken / "annotations.json").write_text(json.dumps(data))
    expect(lambda: read_annotations(broken / "annotations.json", load_card("synthetic")),
           "'Juggling' is not a class", vid, "annotations[0].label")


def test_duplicate_video_ids(broken):
    text = (broken / "annotations.json").read_text()
    data = json.loads(text)
    vid, entry = next(iter(data["database"].items()))
    doubled = text.replace('"database": {', '"database": {' + json.dumps(vid) + ": " + json.dumps(entry) + ", ", 1)
    (broken / "annotations.json").write_text(doubled)
    expect(lambda: read_annotations(broken / "annotations.json"), "duplicate", vid)


def test_malformed_json(broken):
    path = broken / "annotations.json"
    path.write_text(path.read_text()[:-40])
    expect(lambda: read_annotations(path), "malformed JSON", "line 1")


def test_truncated_lines(tmp_path):
    card = load_card("thumos14")
    det = tmp_path / "dets.txt"
    det.write_text("video_test_0000004 1.0 2.0 7 0.5\nvideo_test_0000004 3.0 4.0\n")
    expect(lambda: read_detections(det, card), "line 2", "expected 'video start end class_index score'")
    ssn = tmp_path / "list.txt"
    ssn.write_text("# 0\nvideo_a\n300\n1\n0\n5\n0 0.1 0.1 10 20\n")
    expect(lambda: read_proposals(ssn, {}), "truncated block", "video_a")


def test_non_finite_detections_are_named(tmp_path):
    """A NaN score would sort anywhere and an infinite end match everything: refused, located."""
    card = load_card("thumos14")
    det = tmp_path / "dets.txt"
    det.write_text("video_test_0000004 1.0 2.0 7 0.5\nvideo_test_0000004 3.0 inf 7 0.4\n")
    expect(lambda: read_detections(det, card), "dets.txt, line 2, video video_test_0000004", "must be finite")
    result = tmp_path / "dets.json"
    result.write_text('{"results": {"v1": [{"label": "a", "score": 0.5, "segment": [1, 2]}, '
                      '{"label": "a", "score": NaN, "segment": [3, 4]}]}}')
    expect(lambda: read_detections(result), "video v1, field 'results[1]'", "must be finite, got [3, 4] and nan")


@pytest.mark.parametrize("tiou", [[0.5, 1.5], [0.0], []])
def test_tiou_thresholds_outside_0_1_are_refused(tiou):
    truth = {"v1": Video("v1", duration=10.0)}
    with pytest.raises(ValueError, match=r"tIoU thresholds must be in \(0, 1\]"):
        evaluate_detections(truth, Detections(["v1"], ["a"], np.array([1.0]), np.array([2.0]), np.array([0.5])),
                            ["a"], "thumos14", tiou)


@pytest.mark.parametrize("text, line, problem", [
    ("1.0 2.0\n\n3.0\n", 3, "expected 'start end [score]'"),
    ("1.0 2.0 0.9\n3.0 4.0 high\n", 2, "expected 'start end [score]'"),
    ("1.0 2.0\n5.0 4.0\n", 2, "end > start"),
    ("1.0 2.0\n50.0 64.0\n", 2, "outside the video"),
])
def test_proposals_of_one_new_video(tmp_path, text, line, problem):
    path = tmp_path / "props.txt"
    path.write_text(text)
    expect(lambda: read_video_proposals(path, Video("my_video", duration=60.0, fps=30.0)), f"line {line}", "my_video",
           problem)


@pytest.mark.parametrize("content", [b"not a checkpoint", pickle.dumps(ValueError("run me"), protocol=2)],
                         ids=["garbage", "pickled object"])
def test_unreadable_checkpoint(tmp_path, content):
    from gcm_core.checkpoint import load_checkpoint
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path}: unreadable checkpoint: not plain tensors and types") as err:
        load_checkpoint(path)
    assert "weights_only" not in str(err.value)  # not torch's advice to load it again unsafely
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_unreadable_pickle_in_pt_file(tmp_path):
    from gcm_core.data.features import load_features
    path = tmp_path / "v.pt"
    path.write_bytes(pickle.dumps(ValueError("run me"), protocol=2))  # an object only unpickling could make
    message = expect(lambda: load_features(path, "v"), "v.pt, video v: unreadable feature file: not plain tensors",
                     "gcm-tal never unpickles")
    assert "weights_only" not in str(message)


def test_one_feature_file_holding_every_stream(broken):
    # ActionFormer's THUMOS'14 layout: RGB and flow side by side in one file per video
    card_path = broken / "card.yaml"
    separate = DatasetSource(load_card(card_path), broken, "test")
    vid = separate.video_ids[0]
    expected = separate.load(vid).features
    dim = expected["rgb"].shape[1]
    (broken / "features" / "both").mkdir()
    np.save(broken / f"features/both/{vid}.npy", np.concatenate([expected["rgb"], expected["flow"]], axis=1))
    raw = yaml.safe_load(card_path.read_text())
    raw["paths"]["features"] = "features/both/{video}.npy"
    raw["snippets"]["stream_columns"] = {"rgb": [0, dim], "flow": [dim, 2 * dim]}
    card_path.write_text(yaml.safe_dump(raw))
    joined = DatasetSource(load_card(card_path), broken, "test").load(vid).features
    for stream in ("rgb", "flow"):
        np.testing.assert_array_equal(joined[stream], expected[stream])

    np.save(broken / f"features/both/{vid}.npy", expected["rgb"])  # one stream's width only
    expect(lambda: DatasetSource(load_card(card_path), broken, "test").load(vid), f"both/{vid}.npy", vid,
           f"features are {dim}-d, the streams' columns need {2 * dim}")
    del raw["snippets"]["stream_columns"]  # one file for every stream, but where does each lie?
    card_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CardError, match="paths.features has no {stream}.*stream_columns"):
        load_card(card_path)


@pytest.mark.parametrize("edit, problem", [
    (lambda raw: raw.update(units_per_video_tests=raw.pop("units_per_video_test")),   # would test 100 units, not 800
     r"unknown field units_per_video_tests \(did you mean units_per_video_test\?\)"),
    (lambda raw: raw["snippets"].update(stride_frame=4),   # ActionFormer's stride 4 left at 8
     r"unknown field snippets.stride_frame \(did you mean snippets.stride_frames\?\)"),
    (lambda raw: raw["paths"].update(ambigous=raw["paths"].pop("ambiguous")),   # scored without Ambiguous segments
     r"unknown field paths.ambigous \(did you mean paths.ambiguous\?\)"),
    (lambda raw: raw["snippets"].update(convention="centre"), r"snippets.convention 'centre' is not one of"),
    (lambda raw: raw["snippets"].update(fps="25fps"), r"snippets.fps must be native .* got '25fps'"),
    (lambda raw: raw["snippets"].update(clip_frames=16.5), r"snippets.clip_frames must be a whole number"),
])
def test_a_cards_misspelt_field_or_snippet_value_is_named(tmp_path, edit, problem):
    """A card field misspelt left its default in force unsaid (THUMOS'14 tested with 100 units
    instead of 800, ActionFormer's features laid at stride 8 instead of 4); a snippet value out of
    place failed at each video, far from the card."""
    raw = yaml.safe_load(load_card("thumos14").source.read_text())
    edit(raw)
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CardError, match=f"^{path}: {problem}"):
        load_card(path)
