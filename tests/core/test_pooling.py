"""Unit pooling: the snippet conventions by hand, and the vectorised pooler against a loop."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

from gcm_core.data.pooling import SnippetGrid, unit_features


def test_i3d_convention_by_hand():
    # at 8 fps a second is 8 frames: snippet t covers frames [8t, 8t + 64) = seconds [t, t + 8)
    grid = SnippetGrid("i3d", num_snippets=30, duration=37.0, fps=8.0)
    first, last = grid.snippet_range(torch.tensor([2.0, 0.0, 20.0]), torch.tensor([12.0, 3.0, 37.0]))
    # [2, 12] s = frames [16, 96]: floor(16/8)=2 ... ceil((96-64)/8)=4
    # [0, 3] s is shorter than a clip: the snippet centred nearest 1.5 s (centre t + 4) is snippet 0
    # [20, 37] s: 20 ... ceil((296-64)/8)=29
    assert first.tolist() == [2, 0, 20] and last.tolist() == [4, 0, 29]


def test_center_and_rescaled_conventions_by_hand():
    center = SnippetGrid("center", num_snippets=10, duration=12.0, fps=8.0, stride_frames=8, clip_frames=16)
    # centres at t + 1 seconds; [2.5, 6] holds centres 3, 4, 5, 6 -> t = 2..5
    assert [x.item() for x in center.snippet_range(torch.tensor([2.5]), torch.tensor([6.0]))] == [2, 5]
    rescaled = SnippetGrid("rescaled", num_snippets=100, duration=50.0)
    # position t covers [0.5t, 0.5t + 0.5): [10.2, 20.0] overlaps 20 ... 39
    assert [x.item() for x in rescaled.snippet_range(torch.tensor([10.2]), torch.tensor([20.0]))] == [20, 39]


def test_parts_extend_by_half_the_length_and_clip_to_the_video():
    grid = SnippetGrid("rescaled", num_snippets=20, duration=20.0)
    feats = torch.arange(20, dtype=torch.float32)[:, None].repeat(1, 2)  # value = snippet index
    out = unit_features(feats, torch.tensor([[8.0, 12.0], [0.0, 2.0]]), grid)
    assert out["body"][:, 0].tolist() == [11.0, 1.0]          # [8, 12) -> snippets 8..11
    assert out["extended"][:, 0].tolist() == [13.0, 2.0]      # [6, 14) and [0, 3) (clipped at 0)
    assert out["three_part"].shape == (2, 6)
    assert out["three_part"][0].tolist() == [7.0, 7.0, 11.0, 11.0, 13.0, 13.0]  # [6,8), [8,12), [12,14)
    mean = unit_features(feats, torch.tensor([[8.0, 12.0]]), grid, reduce="mean", parts=("body",))
    assert mean["body"][0, 0].item() == pytest.approx(9.5)


def loop_range(grid: SnippetGrid, s: float, e: float) -> tuple[int, int]:
    """The conventions written out for one span, in plain Python."""
    s, e = min(max(s, 0.0), grid.duration), min(max(e, 0.0), grid.duration)
    e = max(e, s)
    top = grid.num_snippets - 1
    if grid.convention == "i3d":
        f, l = math.floor(s * grid.fps / grid.stride_frames), math.ceil((e * grid.fps - grid.clip_frames) / grid.stride_frames)
    elif grid.convention == "center":
        half = grid.clip_frames / 2
        f, l = math.ceil((s * grid.fps - half) / grid.stride_frames), math.floor((e * grid.fps - half) / grid.stride_frames)
    else:
        f, l = math.floor(s * grid.num_snippets / grid.duration), math.ceil(e * grid.num_snippets / grid.duration) - 1
    f, l = min(max(f, 0), top), min(max(l, 0), top)
    if l < f:
        centres = grid.centres().tolist()
        mid = (s + e) / 2
        f = l = min(range(len(centres)), key=lambda t: (abs(centres[t] - mid), t))
    return f, l


@given(convention=st.sampled_from(["i3d", "center", "rescaled"]), seed=st.integers(0, 10_000),
       n_snippets=st.integers(1, 60), reduce=st.sampled_from(["max", "mean"]))
def test_pooling_equals_a_per_unit_loop(convention, seed, n_snippets, reduce):
    gen = torch.Generator().manual_seed(seed)
    duration = 5.0 + n_snippets * 1.1
    grid = SnippetGrid(convention, n_snippets, duration, fps=8.0, stride_frames=8, clip_frames=16)
    feats = torch.randn(n_snippets, 3, generator=gen)
    starts = torch.rand(12, generator=gen, dtype=torch.float64) * duration
    intervals = torch.stack([starts, starts + 0.05 + torch.rand(12, generator=gen, dtype=torch.float64) * 15], 1)
    got = unit_features(feats, intervals, grid, reduce=reduce, parts=("body",))["body"]
    for k, (s, e) in enumerate(intervals.tolist()):
        f, l = loop_range(grid, s, e)
        window = feats[f:l + 1]
        expected = window.max(0).values if reduce == "max" else window.double().mean(0).float()
        torch.testing.assert_close(got[k], expected)
