"""Captured inference (one CUDA graph per padded unit count) gives the eager head's outputs."""
from __future__ import annotations

import pytest
import torch

from gcm_core.captured import CapturedInference
from gcm_core.detectors import ModelConfig, UnitBatch, build_detector
from gcm_core.graph import GraphSpec, build_graph

DIM, CLASSES = 16, 4
SPEC = GraphSpec(theta_ctx=0.5, k_sur=2, l_sem=2)


def video(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    start = torch.rand(n, generator=g, dtype=torch.float64) * 60
    intervals = torch.stack([start, start + 0.5 + torch.rand(n, generator=g, dtype=torch.float64) * 10], 1)
    return intervals, torch.randn(n, DIM, generator=g), torch.randn(n, 3 * DIM, generator=g)


def eager(model, intervals, body, comp):
    with torch.no_grad():
        return model(UnitBatch(body, comp, build_graph(intervals, body, SPEC)))


def assert_same(got, want, rtol=1e-5, atol=1e-5):
    for name in ("logits", "completeness", "offsets"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("config", [
    ModelConfig(),
    ModelConfig(weighting="embed-cos"),
    ModelConfig(weighting="binary", self_add=False),
    ModelConfig(act_module="mlp", comp_module="gcm"),
    ModelConfig(detector="single"),
])
def test_outputs_equal_the_eager_head_for_videos_sharing_a_padded_size(config):
    torch.manual_seed(0)
    model = build_detector(config, DIM, CLASSES).eval()
    captured = CapturedInference(model, SPEC, pad_to=16)
    for n, seed in ((9, 1), (16, 2), (13, 3), (40, 4)):  # 9, 16, 13 share the 16-unit buffers
        intervals, body, comp = video(n, seed)
        comp = comp if config.detector == "ssn" else None
        assert_same(captured(intervals, body, comp), eager(model, intervals, body, comp))
    assert sorted(captured._replays) == [16, 48]


def test_a_video_after_one_with_non_finite_features_gets_the_eager_outputs():
    """The rows past a video's units still hold the previous video's features; they must not leak."""
    torch.manual_seed(0)
    model = build_detector(ModelConfig(), DIM, CLASSES).eval()
    captured = CapturedInference(model, SPEC, pad_to=16)
    intervals, body, comp = video(16, 1)
    body[12], comp[12] = float("nan"), float("inf")
    assert captured(intervals, body, comp).logits[12].isnan().all()
    intervals, body, comp = video(9, 2)
    assert_same(captured(intervals, body, comp), eager(model, intervals, body, comp))


def test_lower_precision_products_stay_close_and_the_cache_is_bounded():
    torch.manual_seed(0)
    model = build_detector(ModelConfig(), DIM, CLASSES).eval()
    captured = CapturedInference(model, SPEC, pad_to=8, autocast=torch.bfloat16, max_cached=2)
    for n in (5, 12, 20, 7):
        intervals, body, comp = video(n, n)
        got, want = captured(intervals, body, comp), eager(model, intervals, body, comp)
        assert got.logits.dtype == torch.float32
        assert float((got.logits - want.logits).norm() / want.logits.norm()) < 3e-2
    assert list(captured._replays) == [24, 8]  # 20 -> 24, then 7 -> 8; 16 was evicted


def test_branches_without_a_dense_form_too_many_units_and_wrong_widths_are_refused():
    model = build_detector(ModelConfig(comp_module="mp"), DIM, CLASSES)
    with pytest.raises(ValueError, match="gcm and mlp branches, not \\['mp'\\]"):
        CapturedInference(model, SPEC)
    with pytest.raises(ValueError, match="compile is 'graph', 'step' or None, not 'head'"):
        CapturedInference(build_detector(ModelConfig(), DIM, CLASSES), SPEC, compile="head")
    captured = CapturedInference(build_detector(ModelConfig(), DIM, CLASSES), SPEC, pad_to=8, max_units=16)
    with pytest.raises(ValueError, match="17 units exceed max_units=16"):
        captured(*video(17, 0))
    intervals, body, comp = video(5, 0)
    with pytest.raises(ValueError, match=rf"comp features must be \[5 units, {3 * DIM}\] for this head, got \[5, {DIM}\]"):
        captured(intervals, body, body)
    with pytest.raises(ValueError, match=rf"body features must be \[5 units, {DIM}\] for this head, got \[4, {DIM}\]"):
        captured(intervals, body[:4], comp)


@pytest.mark.parametrize("compile", ["graph", "step"])
def test_a_compiled_graph_or_step_gives_the_same_outputs(compile):
    torch.manual_seed(0)
    model = build_detector(ModelConfig(), DIM, CLASSES).eval()
    captured = CapturedInference(model, SPEC, pad_to=16, compile=compile)
    for n, seed in ((11, 1), (30, 2)):
        intervals, body, comp = video(n, seed)
        assert_same(captured(intervals, body, comp), eager(model, intervals, body, comp))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturing a CUDA graph needs a CUDA device")
@pytest.mark.parametrize("compile", [None, "graph", "step"])
def test_replayed_cuda_graph_equals_the_eager_head_on_the_gpu(compile):
    torch.manual_seed(0)
    model = build_detector(ModelConfig(), DIM, CLASSES).cuda().eval()
    captured = CapturedInference(model, SPEC, pad_to=32, compile=compile)
    for n, seed in ((20, 1), (31, 2), (7, 3)):  # one capture, replayed with three videos
        intervals, body, comp = video(n, seed)
        want = eager(model, intervals.cuda(), body.cuda(), comp.cuda())
        assert_same(captured(intervals, body, comp), want)


def test_a_bfloat16_head_runs_in_bfloat16_on_the_float32_graph():
    torch.manual_seed(0)
    model = build_detector(ModelConfig(weighting="embed-cos"), DIM, CLASSES).eval()
    half = build_detector(ModelConfig(weighting="embed-cos"), DIM, CLASSES).eval()
    half.load_state_dict(model.state_dict())
    captured = CapturedInference(half.to(torch.bfloat16), SPEC, pad_to=16)
    for n, seed in ((9, 1), (30, 2)):
        intervals, body, comp = video(n, seed)
        got, want = captured(intervals, body, comp), eager(model, intervals, body, comp)
        assert captured._replays[16 if n <= 16 else 32].comp.dtype == torch.bfloat16
        for name in ("logits", "completeness", "offsets"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == torch.float32
            assert float((a - b).norm() / b.norm()) < 3e-2, name
