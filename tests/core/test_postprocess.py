"""NMS and Soft-NMS against brute-force loops written here, class by class."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from gcm_core.postprocess import nms, soft_nms


def iou(a, b):
    a, b = sorted(a), sorted(b)
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))


def brute_nms(dets, thr, top_k):
    kept = []
    for k in sorted(range(len(dets)), key=lambda k: -dets[k][2]):  # stable
        if all(dets[j][3] != dets[k][3] or iou(dets[j][:2], dets[k][:2]) <= thr for j in kept):
            kept.append(k)
    return kept[:top_k]


def brute_soft_nms(dets, method, sigma, thr, min_score, top_k):
    scores = [d[2] for d in dets]
    left = list(range(len(dets)))
    out = []
    while left and len(out) < top_k:
        best = max(left, key=lambda k: (scores[k], -k))
        if scores[best] < min_score:
            break
        out.append((best, scores[best]))
        left.remove(best)
        for k in left:
            if dets[k][3] != dets[best][3]:
                continue
            o = iou(dets[k][:2], dets[best][:2])
            if method == "linear":
                scores[k] *= (1 - o) if o > thr else 1.0
            else:
                scores[k] *= math.exp(-o * o / sigma)
    return out


dets_strategy = st.lists(
    st.tuples(st.integers(0, 30), st.integers(1, 10), st.sampled_from([0.2, 0.5, 0.7, 0.9, 0.95]),
              st.integers(0, 2)).map(lambda t: (float(t[0]), float(t[0] + t[1]), t[2], t[3])),
    max_size=40)


def tensors(dets):
    if not dets:
        return torch.zeros(0, 2), torch.zeros(0), torch.zeros(0, dtype=torch.long)
    arr = np.array(dets)
    return torch.tensor(arr[:, :2]), torch.tensor(arr[:, 2]), torch.tensor(arr[:, 3]).long()


@given(dets=dets_strategy, thr=st.sampled_from([0.0, 0.3, 0.5, 0.7]), top_k=st.sampled_from([3, 100]))
def test_nms_equals_brute_force(dets, thr, top_k):
    seg, score, label = tensors(dets)
    assert nms(seg, score, label, thr, top_k).tolist() == brute_nms(dets, thr, top_k)


@given(dets=dets_strategy, method=st.sampled_from(["linear", "gaussian"]), top_k=st.sampled_from([5, 100]))
def test_soft_nms_equals_brute_force(dets, method, top_k):
    seg, score, label = tensors(dets)
    idx, new_scores = soft_nms(seg, score, label, method, sigma=0.5, iou_threshold=0.3, min_score=0.05, top_k=top_k)
    expected = brute_soft_nms(dets, method, 0.5, 0.3, 0.05, top_k)
    assert idx.tolist() == [k for k, _ in expected]
    np.testing.assert_allclose(new_scores.numpy(), [s for _, s in expected], rtol=1e-9)


def test_nms_keeps_overlaps_of_different_classes():
    seg = torch.tensor([[0.0, 10.0], [0.0, 10.0], [1.0, 10.0]])
    kept = nms(seg, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 0]), iou_threshold=0.5)
    assert kept.tolist() == [0, 1]


@pytest.mark.parametrize("method", ["nms", "soft-nms"])
def test_one_stage_windows_merge_by_the_configured_suppression(method):
    """D-SSAD's windows of a video are merged by the inference config's NMS or Soft-NMS (its
    merge ran hard NMS whatever the config said): the brute-force loops above on the fused
    anchors give its detections."""
    from gcm_core.one_stage import Clip, fuse_detections
    from gcm_core.postprocess import InferenceConfig

    anchors = torch.tensor([[0.0, 4.0], [1.0, 5.0], [0.5, 4.5], [6.0, 9.0], [6.5, 9.5], [2.0, 8.0]],
                           dtype=torch.float64)
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.2, 0.7], [0.6, 0.3], [0.1, 0.5], [0.55, 0.4]], dtype=torch.float64)
    clips = [Clip("v", torch.zeros(4, 1), 4, start, 1.0, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
             for start in (0.0, 3.0)]   # two windows: the second's anchors shifted by 3 s
    per_clip = [(probs, torch.zeros(6, 2, dtype=torch.float64))] * 2
    config = InferenceConfig(nms=method, nms_threshold=0.3, soft_nms_sigma=0.5, top_k=7)
    found = fuse_detections({"flow": per_clip}, clips, lambda seconds: anchors * seconds, {"v": 20.0}, ["a", "b"],
                            config=config)
    score, label = probs.max(dim=1)
    dets = [(float(s + c.start), float(e + c.start), float(p), int(k))
            for c in clips for (s, e), p, k in zip(anchors.tolist(), score, label)]
    if method == "nms":
        expected = [(k, dets[k][2]) for k in brute_nms(dets, 0.3, 7)]
    else:
        expected = brute_soft_nms(dets, "gaussian", 0.5, 0.0, 1e-3, 7)
    assert found.label == [["a", "b"][dets[k][3]] for k, _ in expected]
    np.testing.assert_allclose(np.stack([found.start, found.end], 1), [dets[k][:2] for k, _ in expected])
    np.testing.assert_allclose(found.score, [s for _, s in expected], rtol=1e-9)


def test_one_stage_candidates_per_video_counts_the_videos_pairs_not_each_windows():
    """``candidates_per_video`` N: NMS runs over the N best (anchor, class) pairs of the whole
    video, as for the two-stage heads (each D-SSAD window kept N of its own, so a video of three
    windows entered NMS with up to 3N): the brute-force loop over the video's N best pairs."""
    from gcm_core.one_stage import Clip, fuse_detections
    from gcm_core.postprocess import InferenceConfig

    gen = torch.Generator().manual_seed(3)
    anchors = torch.rand(6, 1, generator=gen, dtype=torch.float64) * 8 + torch.tensor([0.0, 3.0], dtype=torch.float64)
    clips = [Clip("v", torch.zeros(4, 1), 4, start, 1.0, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
             for start in (0.0, 4.0, 8.0)]
    per_clip = [(torch.rand(6, 2, generator=gen, dtype=torch.float64), torch.zeros(6, 2, dtype=torch.float64))
                for _ in clips]
    config = InferenceConfig(candidates_per_video=5, nms_threshold=0.3, top_k=100)
    found = fuse_detections({"flow": per_clip}, clips, lambda seconds: anchors * seconds, {"v": 30.0}, ["a", "b"],
                            config=config)
    dets = [(float(s + c.start), float(e + c.start), float(p.max()), int(p.argmax()))
            for c, (probs, _) in zip(clips, per_clip) for (s, e), p in zip(anchors.tolist(), probs)]
    best = sorted(dets, key=lambda d: -d[2])[:5]
    expected = [best[k] for k in brute_nms(best, 0.3, 100)]
    assert len(found.score) <= 5 < len(dets)
    assert found.label == [["a", "b"][d[3]] for d in expected]
    np.testing.assert_allclose(np.stack([found.start, found.end], 1), [d[:2] for d in expected])
    np.testing.assert_allclose(found.score, [d[2] for d in expected], rtol=1e-12)
