"""External video-level labels (UntrimmedNet top-2, score product) with the real THUMOS'14 scores."""
from __future__ import annotations

import numpy as np

from gcm_core.data.cards import load_card
from gcm_core.data.detections import read_untrimmednet_scores
from gcm_core.data.formats import read_annotations, read_detections
from gcm_core.postprocess import rescore_with_video_labels


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
    # independently: a detection is kept iff its official class index is among its video's two best columns
    expected = []
    for v, lab, s, e, sc in zip(det.video, det.label, det.start, det.end, det.score):
        if lab not in card.classes:
            continue
        row = raw[int(v.split("_")[-1]) - 1]
        official = np.array(card.official_index)
        best_two = set(official[np.argsort(-row[official - 1], kind="stable")[:2]])
        idx = card.official_index[card.classes.index(lab)]
        if idx in best_two:
            expected.append((v, lab, s, e, sc * row[idx - 1]))
    got = sorted(zip(out.video, out.label, out.start, out.end, out.score))
    assert len(got) == len(expected) and 0 < len(got) < len(det)
    for a, b in zip(got, sorted(expected)):
        assert a[:4] == b[:4] and np.isclose(a[4], b[4], rtol=1e-6)
