"""`gcm eval-detections` as a user runs it: real files in, a table or JSON out, clear errors."""
from __future__ import annotations

import csv
import json

import pytest

from gcm_core.data.cards import load_card
from gcm_core.data.formats import read_annotations, read_detections
from gcm_core.evaluation import evaluate_detections
from reference_metrics import loop_thumos_ap, loop_tiou
from workflows.cli import main


def test_eval_detections_json_on_real_cbr_results(shared_data, capsys):
    th = shared_data / "thumos14"
    rc = main(["eval-detections", "--protocol", "thumos14",
               "--ground-truth", str(th / "annotations/temporal_annotations_test"),
               "--detections", str(th / "results/CBR/CBR_THUMOS-14_IoU0.5.txt"), "--tiou", "0.5", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == "thumos14" and out["tiou"] == [0.5]
    assert out["mAP"][0] == pytest.approx(31.0, abs=0.1)
    assert len(out["per_class"]) == 20
    assert out["average"] == pytest.approx(sum(v[0] for v in out["per_class"].values()) / 20, abs=1e-3)


def test_eval_detections_class_agnostic_on_real_cbr_results(shared_data, capsys):
    """--class-agnostic: CBR's real detections with every class merged and suppressed across
    classes (greedy NMS at 0.35, written out here), as the THUMOS'14 evaluator's loop scores them."""
    th = shared_data / "thumos14"
    folder, results = th / "annotations/temporal_annotations_test", th / "results/CBR/CBR_THUMOS-14_IoU0.5.txt"
    assert main(["eval-detections", "--protocol", "thumos14", "--ground-truth", str(folder), "--detections",
                 str(results), "--tiou", "0.5", "--class-agnostic", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    card = load_card("thumos14")
    gt, dets = read_annotations(folder, card), read_detections(results, card)
    index = {vid: k for k, vid in enumerate(gt)}
    kept: list[tuple] = []
    for k in sorted(range(len(dets)), key=lambda k: -dets.score[k]):
        row = (index[dets.video[k]], 0, dets.start[k], dets.end[k], dets.score[k], k)
        if all(other[0] != row[0] or loop_tiou(other[2:4], row[2:4]) <= 0.35 for other in kept):
            kept.append(row)
    det_rows = sorted(kept, key=lambda row: row[5])
    gt_rows = [(index[v.id], 0, i.start, i.end) for v in gt.values() for i in v.instances]
    ambiguous = [(index[v.id], s, e) for v in gt.values() for s, e in v.ambiguous]
    reference = 100 * loop_thumos_ap(gt_rows, det_rows, 0.5, 1, ambiguous)[0]
    assert out["class_agnostic"]["mAP"] == [pytest.approx(reference, abs=1e-3)]
    assert out["mAP"][0] == pytest.approx(31.0, abs=0.1)  # the class-aware result is still there


def test_eval_detections_per_class_on_real_cbr_results(shared_data, capsys):
    """--per-class: each class's AP, as the THUMOS'14 evaluator's loop scores CBR's real detections."""
    th = shared_data / "thumos14"
    folder, results = th / "annotations/temporal_annotations_test", th / "results/CBR/CBR_THUMOS-14_IoU0.5.txt"
    assert main(["eval-detections", "--protocol", "thumos14", "--ground-truth", str(folder), "--detections",
                 str(results), "--tiou", "0.5", "--per-class"]) == 0
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith(("| tIoU", "| mAP", "| AP (%) of class"))]
    card = load_card("thumos14")
    gt, dets = read_annotations(folder, card), read_detections(results, card)
    index, label = {vid: k for k, vid in enumerate(gt)}, {name: c for c, name in enumerate(card.classes)}
    det_rows = [(index[dets.video[k]], label[dets.label[k]], dets.start[k], dets.end[k], dets.score[k], k)
                for k in range(len(dets))]
    gt_rows = [(index[v.id], label[i.label], i.start, i.end) for v in gt.values() for i in v.instances]
    ambiguous = [(index[v.id], s, e) for v in gt.values() for s, e in v.ambiguous]
    reference = 100 * loop_thumos_ap(gt_rows, det_rows, 0.5, len(card.classes), ambiguous)
    assert [name.strip() for name, *_ in rows] == list(card.classes)
    for (name, ap, average), expected in zip(rows, reference):
        assert float(ap) == pytest.approx(expected, abs=0.006) and average.strip() == ap.strip(), name


def test_eval_detections_picks_the_test_subset_of_a_json_holding_two(shared_data, capsys):
    th = shared_data / "thumos14"
    rc = main(["eval-detections", "--protocol", "activitynet",
               "--ground-truth", str(th / "annotations/thumos14.json"),
               "--detections", str(th / "results/CBR/CBR_THUMOS-14_IoU0.5.txt"), "--tiou", "0.5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "212 videos (test)" in out  # thumos14.json omits the Ambiguous-only video and "31.35" in out


def test_eval_detections_on_a_json_of_several_subsets_and_no_card_names_them(shared_data, capsys):
    anet = shared_data / "activitynet"
    rc = main(["eval-detections", "--protocol", "activitynet", "--ground-truth", str(anet / "anet_anno_action.json"),
               "--detections", str(anet / "sample_detection_prediction.json")])
    assert rc == 2
    with open(anet / "video_info_new.csv", newline="") as f:   # BSN's annotations take their subsets from it
        subsets = sorted({row["subset"] for row in csv.DictReader(f)})
    assert f"holds the subsets {subsets}: choose one with --subset, or give the dataset's --card" \
        in capsys.readouterr().err
    assert main(["eval-detections", "--protocol", "activitynet", "--ground-truth", str(anet / "anet_anno_action.json"),
                 "--detections", str(anet / "sample_detection_prediction.json"), "--card", "activitynet13",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mAP"][0] == pytest.approx(97.66, abs=0.01)


def test_missing_file_is_one_clear_error(tmp_path, capsys):
    rc = main(["eval-detections", "--protocol", "thumos14", "--ground-truth", str(tmp_path / "nope"),
               "--detections", str(tmp_path / "d.txt")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_a_report_of_nothing_is_refused_and_writes_nothing(tmp_path, capsys):
    """A mistyped or unfinished folder would otherwise just be missing from the report."""
    (tmp_path / "unfinished" / "run").mkdir(parents=True)
    (tmp_path / "unfinished" / "run" / "config.yaml").write_text("name: run\n")   # no metrics.json yet
    for folder, problem in (("unfinished", "nothing to report in"), ("mistyped", "no folder")):
        assert main(["report", str(tmp_path / folder), "--out", str(tmp_path / "report")]) == 2
        assert capsys.readouterr().err.startswith(f"gcm report: error: {problem} {tmp_path / folder}")
    # a run trained without scoring its test split (evaluate: false) is told how to score it
    (tmp_path / "unfinished" / "run" / "model.pt").write_bytes(b"weights")
    assert main(["report", str(tmp_path / "unfinished" / "run"), "--out", str(tmp_path / "report")]) == 2
    assert (f"the run has no test metrics (metrics.json): trained with evaluate: false, or not finished; score its "
            f"checkpoint with `gcm evaluate --checkpoint {tmp_path / 'unfinished' / 'run' / 'model.pt'}") \
        in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_a_negative_seed_is_an_error_of_its_option(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path / "data"), "--seed", "-1"])
    assert "argument --seed: must be a number >= 0, got '-1'" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_help_shows_real_defaults_only(capsys):
    from workflows.cli import build_parser
    from workflows.commands import REGISTRY

    for command in REGISTRY:
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "(default: False)" not in text, command
        if command == "synth":
            assert "--scale {small,medium,full} small: a few dozen videos" in text and "(default: small)" in text


def test_a_failed_ray_task_is_reported_by_its_own_error(monkeypatch, capsys):
    from ray.exceptions import RayTaskError

    from workflows import commands

    def failing_stage(args):
        raise RayTaskError("evaluate_pair", "Traceback (most recent call last): ...", ValueError("video_7: bad"))

    add_arguments = commands.REGISTRY["report"][1]
    monkeypatch.setitem(commands.REGISTRY, "report", ("fails", add_arguments, failing_stage))
    assert main(["report", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "gcm report: error: video_7: bad"


def test_the_demo_recreates_only_a_folder_it_made(tmp_path):
    """gcm demo empties its folder on every run; pointed at a folder of the user's, it refuses."""
    from workflows.demo import MARK, claim_folder

    mine = tmp_path / "runs"
    (mine / "ssn-gcm").mkdir(parents=True)
    (mine / "ssn-gcm" / "model.pt").write_bytes(b"weights")
    with pytest.raises(FileExistsError, match=f"^{mine} exists and is not a folder an earlier gcm demo made"):
        claim_folder(mine)
    assert (mine / "ssn-gcm" / "model.pt").read_bytes() == b"weights"

    demo = tmp_path / "demo"
    claim_folder(demo)                                  # new: created and marked
    (demo / "results.md").write_text("an earlier demo's table")
    claim_folder(demo)                                  # an earlier demo's: emptied for the new one
    assert sorted(p.name for p in demo.iterdir()) == [MARK]


def test_what_the_ground_truth_does_not_name_is_counted_and_said(shared_data, tmp_path, capsys):
    """The official evaluators score detections on other videos as false positives and ignore
    other labels without a word; the command says how many there are. Real case: thumos14.json
    leaves out video_test_0001292 (only Ambiguous instances), on which CBR's results hold
    detections; a class index that is no class (102) is ignored with a note."""
    th = shared_data / "thumos14"
    results = th / "results/CBR/CBR_THUMOS-14_IoU0.5.txt"
    rows = [line.split() for line in results.read_text().splitlines() if line.strip()]
    on_left_out = sum(row[0] == "video_test_0001292" for row in rows)
    assert on_left_out > 0

    base = ["eval-detections", "--protocol", "thumos14", "--ground-truth", str(th / "annotations/thumos14.json"),
            "--tiou", "0.5"]
    assert main([*base, "--detections", str(results), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["unmatched"] == {
        "detections_on_other_videos": on_left_out, "detections_of_other_labels": 0, "videos_without_detections": 0}
    assert captured.err == (f"note: {th / 'annotations/thumos14.json'} gives no Ambiguous segments, on which the "
                            "THUMOS'14 protocol scores no detection: detections there count as false positives (give "
                            "--ambiguous Ambiguous_test.txt, or the official per-class folder as --ground-truth)\n"
                            f"note: {on_left_out} detections on 1 video outside the evaluated ones "
                            "(video_test_0001292): scored as false positives\n")
    # with the official Ambiguous segments, thumos14.json's videos score as on the official per-class files
    ambiguous = th / "annotations/temporal_annotations_test/Ambiguous_test.txt"
    assert main([*base, "--detections", str(results), "--ambiguous", str(ambiguous), "--json"]) == 0
    captured = capsys.readouterr()
    card = load_card("thumos14")
    listed = read_annotations(th / "annotations/thumos14.json", card)
    per_class = read_annotations(th / "annotations/temporal_annotations_test", card)
    official = evaluate_detections({v: per_class[v] for v in listed if v in per_class}, read_detections(results, card),
                                   card.classes, "thumos14", [0.5])
    assert json.loads(captured.out)["mAP"][0] == pytest.approx(100 * official.map.item(), abs=1e-4)   # printed to 4 places
    assert "Ambiguous" not in captured.err

    stray = tmp_path / "stray.txt"
    stray.write_text("\n".join(" ".join([*row[:3], "102" if k < 3 else row[3], row[4]]) for k, row in enumerate(rows)))
    assert main([*base, "--detections", str(stray)]) == 0
    assert "note: 3 detections with labels outside the 20 classes (#102): ignored" in capsys.readouterr().err


def test_a_detection_file_of_another_label_convention_is_named(shared_data, tmp_path, capsys):
    """CBR's real detections numbered 0-19 or 1-20 (the card's class order) instead of the official
    7...97: read under the official convention, 80-84% were dropped as no class and the rest given
    the wrong class (zero-based 7 is not the official 7), for an mAP of 0 and a note. Now the
    convention that names every index is given, and under it the file scores the original's mAP."""
    th = shared_data / "thumos14"
    results = th / "results/CBR/CBR_THUMOS-14_IoU0.5.txt"
    card = load_card("thumos14")
    rows = [line.split() for line in results.read_text().splitlines() if line.strip()]
    base = ["eval-detections", "--protocol", "thumos14", "--ground-truth",
            str(th / "annotations/temporal_annotations_test"), "--tiou", "0.5", "--json"]
    for convention, first in (("zero_based", 0), ("one_based", 1)):
        renumbered = tmp_path / f"{convention}.txt"
        renumbered.write_text("\n".join(" ".join([*row[:3], str(card.official_index.index(int(row[3])) + first),
                                                  row[4]]) for row in rows))
        assert main([*base, "--detections", str(renumbered)]) == 2
        assert (f"{renumbered}: class indices {first}, {first + 1}, {first + 2}, {first + 3}, {first + 4} ... are not "
                f"classes of card 'thumos14' under the official convention, and every class index of the file is one "
                f"under {convention}: give the file's (--label-convention {convention})") in capsys.readouterr().err
        assert main([*base, "--detections", str(renumbered), "--label-convention", convention]) == 0
        assert json.loads(capsys.readouterr().out)["mAP"][0] == pytest.approx(31.0, abs=0.1)
    assert main([*base, "--detections", str(results), "--label-convention", "one_based"]) == 2
    assert "every class index of the file is one under official" in capsys.readouterr().err
