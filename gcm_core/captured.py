"""A two-stage head's inference as one replayed CUDA graph: unit graph and head in a single launch.

Building a video's unit graph and running the head over it launches a few hundred small kernels;
on a GPU their host-side cost, not the arithmetic, bounds an inference pass (README, "model
speed"). :class:`CapturedInference` captures :func:`~gcm_core.graph.build_dense_graph` followed by
the head once per padded unit count and then replays it: a video's inputs are copied into fixed
buffers, the units past its count are padding (nobody's neighbour, their outputs dropped), and
the outputs equal the eager model's on the same graph (tested). On a CPU the same steps run
eagerly, so one code path serves both. Heads whose branches are ``gcm`` or ``mlp`` (a head of
``mlp`` branches alone builds no graph).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from typing import Literal

import torch
from torch import Tensor, nn

from gcm_core.detectors.base import UnitBatch, UnitOutputs
from gcm_core.graph import GraphSpec, build_dense_graph
from gcm_core.units import as_intervals

_PADDING_START, _PADDING_END = 0.0, 1.0  # any positive-length interval keeps the padding rows finite
_OUTPUTS = ("logits", "completeness", "offsets")


def _fill_padding(staged: Tensor, body: Tensor, comp: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Intervals, body and comp of a replay's buffers with the rows past the video's units made
    padding, and the unit count (0-d). ``staged``: the intervals, flattened, then the unit count."""
    size = body.shape[0]
    num_units = staged[-1]
    valid = torch.arange(size, device=staged.device) < num_units
    given = staged[:-1].view(size, 2)
    intervals = torch.stack([torch.where(valid, given[:, 0], _PADDING_START),
                             torch.where(valid, given[:, 1], _PADDING_END)], dim=1)
    rows = valid[:, None]  # where(), not a product: a previous video's non-finite rows must not leak in
    return intervals, torch.where(rows, body, 0), None if comp is None else torch.where(rows, comp, 0), num_units


class _Replay:
    """Fixed buffers for ``size`` units and the pass over them (captured on a GPU).

    A video enters through one host-to-device copy (its intervals and unit count, staged in
    page-locked memory, asynchronous) and one device copy per feature input; the padding is
    filled inside the pass and its outputs leave packed in one float32 buffer: seven CUDA calls per
    video where an earlier version made 17. Each costs the host about 20 us on the H200 measured:
    with the SSN head at N = 2000, the call took 0.40 ms beyond its 0.65 ms replay, now 0.20 ms.
    """

    def __init__(self, size: int, step: Callable[["_Replay"], Tensor], body_dim: int,
                 comp_dim: int | None, head_dtype: torch.dtype, device: torch.device) -> None:
        on_gpu = device.type == "cuda"
        self.host = torch.zeros(2 * size + 1, dtype=torch.float64, pin_memory=on_gpu)  # intervals, then N
        self.staged = torch.zeros(2 * size + 1, dtype=torch.float64, device=device)
        self.body = torch.zeros(size, body_dim, device=device)  # float32: the graph's cosines read it
        self.comp = None if comp_dim is None else torch.zeros(size, comp_dim, dtype=head_dtype, device=device)
        self.layout: list[tuple[str, tuple[int, ...]]] = []  # each output's name and shape per unit
        self._staged_copy = torch.cuda.Event() if on_gpu else None  # the host buffer is free again
        self._step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        if on_gpu:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the capture (kernel selection, allocator)
                    step(self)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.packed = step(self)

    def pack(self, outputs: UnitOutputs) -> Tensor:
        """The outputs as one float32 [size, width] buffer; ``layout`` says how to unpack it."""
        present = [(name, getattr(outputs, name)) for name in _OUTPUTS if getattr(outputs, name) is not None]
        self.layout = [(name, tuple(t.shape[1:])) for name, t in present]
        return torch.cat([t.float().flatten(1) for _, t in present], dim=1)

    def unpack(self, packed: Tensor) -> UnitOutputs:
        columns, parts = 0, dict.fromkeys(_OUTPUTS)
        for name, shape in self.layout:
            width = math.prod(shape)
            parts[name] = packed[:, columns:columns + width].unflatten(1, shape)
            columns += width
        return UnitOutputs(**parts)

    def load(self, intervals: Tensor, body: Tensor, comp: Tensor | None) -> None:
        n = intervals.shape[0]
        if self._staged_copy is not None:
            self._staged_copy.synchronize()  # the previous video's copy has left the host buffer
        self.host[:2 * n].copy_(intervals.reshape(-1))
        self.host[-1] = n
        self.staged.copy_(self.host, non_blocking=True)
        if self._staged_copy is not None:
            self._staged_copy.record()
        self.body[:n].copy_(body)
        if self.comp is not None:
            self.comp[:n].copy_(comp)

    def run(self, n: int) -> UnitOutputs:
        """The outputs of the first ``n`` units, in new tensors (the next replay reuses the buffer)."""
        if self.graph is None:
            return self.unpack(self._step(self)[:n].clone())
        self.graph.replay()
        return self.unpack(self.packed[:n].clone())


class CapturedInference:
    """Inference of a two-stage head over every unit of one video, graph construction included.

    ``pad_to``: unit counts are rounded up to a multiple of it, so that videos of similar size
    share one capture; the ``max_cached`` most recent captures are kept. The head runs in its
    parameters' dtype: a head converted with ``model.to(torch.bfloat16)`` gets bfloat16 inputs
    and keeps its weights in bfloat16 between replays. ``autocast``: a lower precision for a
    float32 head's products instead (e.g. ``torch.bfloat16``; it re-casts the weights at every
    replay). Either way the graph is built from the float32 features, so that its edges do not
    change (TF32, where a user enables it globally, does reach the graph's cosine products).
    ``max_units``: the dense graph holds a few N x N float64 buffers (several GiB at 8192 units);
    longer videos belong to the eager path.
    ``compile``: ``"graph"`` builds the graph through ``torch.compile``, which fuses its two dozen
    elementwise passes over the N x N pairs into a few kernels; ``"step"`` compiles the graph and
    the head together, which also fuses the head's N x N mean operator and its elementwise work
    with the products around them. One compilation for any unit count (dynamic shapes), paid on
    the first video (about 30 s for the SSN head with compile="step" on an H200).
    """

    def __init__(self, model: nn.Module, spec: GraphSpec = GraphSpec(), *, pad_to: int = 64,
                 autocast: torch.dtype | None = None, max_cached: int = 8, max_units: int = 8192,
                 compile: Literal["graph", "step"] | None = None) -> None:
        config = model.config
        branches = {config.act_module} | ({config.comp_module} if config.detector == "ssn" else set())
        if not branches <= {"gcm", "mlp"}:
            raise ValueError(f"captured inference runs gcm and mlp branches, not {sorted(branches - {'gcm', 'mlp'})}")
        self.model, self.spec = model.eval(), spec
        self._needs_graph = "gcm" in branches
        if compile not in (None, "graph", "step"):
            raise ValueError(f"compile is 'graph', 'step' or None, not {compile!r}")
        self._build_graph = torch.compile(build_dense_graph, dynamic=True) if compile == "graph" else build_dense_graph
        self._forward = torch.compile(self._forward_eager, dynamic=True) if compile == "step" else self._forward_eager
        self.pad_to, self.autocast, self.max_cached, self.max_units = pad_to, autocast, max_cached, max_units
        weight = next(model.parameters())
        self.device, self.head_dtype = weight.device, weight.dtype
        self._replays: OrderedDict[int, _Replay] = OrderedDict()

    def _forward_eager(self, staged: Tensor, body: Tensor, comp: Tensor | None) -> UnitOutputs:
        intervals, body, comp, num_units = _fill_padding(staged, body, comp)
        graph = self._build_graph(intervals, body, self.spec, num_units, validate=False) \
            if self._needs_graph else None
        precision = nullcontext() if self.autocast is None else \
            torch.autocast(self.device.type, self.autocast, cache_enabled=False)
        with precision:
            return self.model(UnitBatch(body.to(self.head_dtype), comp, graph))

    def _step(self, replay: _Replay) -> Tensor:
        with torch.no_grad():
            return replay.pack(self._forward(replay.staged, replay.body, replay.comp))

    def _replay_for(self, n: int, body: Tensor, comp: Tensor | None) -> _Replay:
        size = max(1, math.ceil(n / self.pad_to)) * self.pad_to
        if size > self.max_units:
            raise ValueError(f"{n} units exceed max_units={self.max_units} of captured inference (dense N x N "
                             "graph); run the model eagerly on build_graph's sparse graph instead")
        if size in self._replays:
            self._replays.move_to_end(size)
        else:
            if len(self._replays) >= self.max_cached:
                self._replays.popitem(last=False)
            comp_dim = None if comp is None else comp.shape[1]
            self._replays[size] = _Replay(size, self._step, body.shape[1], comp_dim, self.head_dtype, self.device)
        return self._replays[size]

    def __call__(self, intervals: Tensor, body: Tensor, comp: Tensor | None = None) -> UnitOutputs:
        """Outputs for the units of one video (``intervals`` [N, 2], ``body`` [N, d], ``comp`` [N, d'])."""
        intervals = as_intervals(intervals)
        n = intervals.shape[0]
        ssn = self.model.config.detector == "ssn"
        if ssn and comp is None:
            raise ValueError("the SSN head needs completeness features (comp)")
        widths = {"body": (body, self.model.classifier.in_features)}
        if ssn:
            widths["comp"] = (comp, self.model.completeness.in_features)
        for name, (features, width) in widths.items():
            if tuple(features.shape) != (n, width):
                raise ValueError(f"{name} features must be [{n} units, {width}] for this head, "
                                 f"got {list(features.shape)}")
        replay = self._replay_for(n, body, comp)
        replay.load(intervals, body, comp)
        return replay.run(n)
