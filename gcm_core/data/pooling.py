"""Unit features from snippet features: body x, extended x', and the three-part variant.

A video's snippet features ``[T, C]`` sit on a time grid (:class:`SnippetGrid`) given by its
dataset card:

- ``i3d`` (the authors' features): snippet t covers frames [stride*t, stride*t + clip) at the
  video's own fps. A span [s, e] (frames) pools snippets floor(s/stride) ... ceil((e-clip)/stride),
  the snippets lying inside it up to one stride, as the authors' code does;
- ``center`` (ActionFormer's convention): snippet t is centred at (stride*t + clip/2) frames, and a
  span pools the snippets whose centres fall inside it;
- ``rescaled`` (ActivityNet features resampled to a fixed T): position t covers
  [t, t+1) * duration / T, and a span pools the positions it overlaps.

When no snippet qualifies (a span shorter than a clip), the one whose centre is nearest the
span's centre is used (the authors' code also falls back to a single snippet; which one it takes
is our choice). Spans are clipped to the video first.

Units: ``body`` pools [s, e] (Eq. 9's x_i); ``extended`` pools [s - l/2, e + l/2] (x'_i of Eq. 10,
l = e - s); ``three_part`` concatenates [s - l/2, s], [s, e] and [e, e + l/2] (the authors'
completeness features, 3C wide). Max pooling by default (the paper), mean as an option.

Max over many ranges is answered from a sparse table (maxima of power-of-two windows, built in
log2(T) passes), mean from prefix sums, so pooling N units costs O(T C log T + N C) with no
per-unit Python loop.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

Convention = Literal["i3d", "center", "rescaled"]
Reduce = Literal["max", "mean"]
PARTS = ("body", "extended", "three_part")


def rate_per_video(snippets: Mapping[str, Any]) -> bool:
    """Whether a card's snippet layout lies on each video's own frame rate (``fps: native``, as
    THUMOS'14's I3D features), which must then be known per video; rescaled positions are laid
    over the duration at none."""
    return snippets.get("fps", "native") == "native" and snippets.get("convention") != "rescaled"


@dataclass(frozen=True)
class SnippetGrid:
    """Where the T snippets of one video lie in time."""

    convention: Convention
    num_snippets: int
    duration: float
    fps: float = 30.0
    stride_frames: int = 8
    clip_frames: int = 64

    @classmethod
    def of_layout(cls, snippets: Mapping[str, Any], num_snippets: int, duration: float, fps: float) -> SnippetGrid:
        """One video's grid on a card's snippet layout (its ``snippets``), at ``fps``."""
        return cls(snippets.get("convention", "i3d"), num_snippets, duration, float(fps),
                   int(snippets.get("stride_frames", 8)), int(snippets.get("clip_frames", 64)))

    def __post_init__(self) -> None:
        if self.convention not in get_args(Convention):
            raise ValueError(f"unknown snippet convention {self.convention!r}")
        if self.num_snippets < 1 or not self.duration > 0 or not self.fps > 0:
            raise ValueError(f"bad snippet grid {self}")

    def misfit(self) -> str | None:
        """What is wrong where the snippets do not span the video: they end well before it does (a
        truncated feature file, another video's, a wrong duration) or well after (a wrong duration
        or frame rate, another video's features: every unit would be pooled from other seconds).
        None where they span it to within a tenth of the video and one clip either way (its last
        frames need not start a snippet of their own; an extractor may pad its last clip)."""
        if self.convention == "rescaled":   # the positions are laid over the duration, whatever it is
            return None
        covered, slack = self.covered_until(), self.clip_frames / self.fps
        if covered < 0.9 * self.duration - slack:
            return f"T={self.num_snippets} snippets cover only {covered:.1f} s of the {self.duration:.1f} s video"
        if covered > 1.1 * self.duration + slack:
            return (f"T={self.num_snippets} snippets at {self.fps:g} fps span {covered:.1f} s, well past the end of "
                    f"the {self.duration:.1f} s video: a wrong duration or frame rate, or another video's features")
        return None

    def centres(self) -> Tensor:
        """Centre of every snippet, in seconds."""
        t = torch.arange(self.num_snippets, dtype=torch.float64)
        if self.convention == "rescaled":
            return (t + 0.5) * self.duration / self.num_snippets
        return (t * self.stride_frames + self.clip_frames / 2) / self.fps

    @property
    def seconds_per_snippet(self) -> float:
        """Seconds from one snippet to the next: the stride at the video's frame rate, or for
        rescaled features the duration over the positions (each video its own)."""
        if self.convention == "rescaled":
            return self.duration / self.num_snippets
        return self.stride_frames / self.fps

    def covered_until(self) -> float:
        """The time, in seconds, at which the last snippet ends."""
        if self.convention == "rescaled":
            return self.duration
        return ((self.num_snippets - 1) * self.stride_frames + self.clip_frames) / self.fps

    def snippet_range(self, start: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
        """Inclusive (first, last) snippet of each span [start, end] seconds; never empty."""
        start = start.to(torch.float64).clamp(0, self.duration)
        end = torch.maximum(end.to(torch.float64).clamp(0, self.duration), start)
        if self.convention == "i3d":
            first = torch.floor(start * self.fps / self.stride_frames)
            last = torch.ceil((end * self.fps - self.clip_frames) / self.stride_frames)
        elif self.convention == "center":
            half = self.clip_frames / 2
            first = torch.ceil((start * self.fps - half) / self.stride_frames)
            last = torch.floor((end * self.fps - half) / self.stride_frames)
        else:
            scale = self.num_snippets / self.duration
            first = torch.floor(start * scale)
            last = torch.ceil(end * scale) - 1
        top = self.num_snippets - 1
        first, last = first.clamp(0, top).long(), last.clamp(0, top).long()
        empty = last < first
        if bool(empty.any()):
            nearest = torch.bucketize((start + end) / 2, self._midpoints().to(start.device))
            first = torch.where(empty, nearest, first)
            last = torch.where(empty, nearest, last)
        return first, last

    def _midpoints(self) -> Tensor:
        c = self.centres()
        return (c[1:] + c[:-1]) / 2


class RangePooler:
    """Max or mean of ``features[first:last+1]`` for many ranges at once."""

    def __init__(self, features: Tensor, reduce: Reduce = "max") -> None:
        if reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
        self.reduce = reduce
        self.num_snippets = features.shape[0]
        if reduce == "max":
            levels = [features]
            width = 1
            while 2 * width <= features.shape[0]:
                prev = levels[-1]
                levels.append(torch.maximum(prev[:-width], prev[width:]))
                width *= 2
            self.levels = levels
        else:
            zero = torch.zeros(1, features.shape[1], dtype=torch.float64, device=features.device)
            self.prefix = torch.cat([zero, features.to(torch.float64).cumsum(0)])
            self.dtype = features.dtype

    def __call__(self, first: Tensor, last: Tensor) -> Tensor:
        """Each range's max or mean; ``first`` / ``last`` on the host or the features' device.

        Max: the rows are grouped by the level their length needs on the host, and the groups'
        indices reach the device in one copy, so that a GPU pooler waits for the device once per
        call instead of once per level."""
        device = self.levels[0].device if self.reduce == "max" else self.prefix.device
        if self.reduce == "mean":
            first, last = first.to(device), last.to(device)
            total = self.prefix[last + 1] - self.prefix[first]
            return (total / (last - first + 1)[:, None]).to(self.dtype)
        first, last = first.cpu(), last.cpu()
        level = torch.floor(torch.log2((last - first + 1).to(torch.float64))).long()
        order = torch.argsort(level, stable=True)
        counts = torch.bincount(level, minlength=len(self.levels)).tolist()
        second = last - torch.bitwise_left_shift(torch.ones_like(level), level) + 1   # the second window's start
        rows, left, right = torch.stack([order, first[order], second[order]]).to(device)
        out = self.levels[0].new_empty(first.numel(), self.levels[0].shape[1])
        start = 0
        for table, count in zip(self.levels, counts):
            if count:
                span = slice(start, start + count)
                out[rows[span]] = torch.maximum(table[left[span]], table[right[span]])
                start += count
        return out


def unit_features(features: Tensor, intervals: Tensor, grid: SnippetGrid, reduce: Reduce = "max",
                  parts: tuple[str, ...] = PARTS) -> dict[str, Tensor]:
    """Pooled features of N units ``intervals`` [N, 2] (seconds): {part: [N, C or 3C]}."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown feature parts {sorted(unknown)}; choose from {PARTS}")
    if features.shape[0] != grid.num_snippets:
        raise ValueError(f"features have {features.shape[0]} snippets, the grid {grid.num_snippets}")
    pool = RangePooler(features, reduce)
    # the ranges are a few float64 operations per unit: computed on the host, where a GPU pooler
    # pays no kernel launches for them and groups its rows without waiting for the device
    iv = intervals.detach().to(device="cpu", dtype=torch.float64)
    start, end = iv[:, 0], iv[:, 1]
    half = (end - start) / 2

    def pooled(s: Tensor, e: Tensor) -> Tensor:
        return pool(*grid.snippet_range(s, e))

    out: dict[str, Tensor] = {}
    body = pooled(start, end) if {"body", "three_part"} & set(parts) else None
    if "body" in parts:
        out["body"] = body
    if "extended" in parts:
        out["extended"] = pooled(start - half, end + half)
    if "three_part" in parts:
        out["three_part"] = torch.cat([pooled(start - half, start), body, pooled(end, end + half)], dim=1)
    return out
