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

import torch
from torch import Tensor, nn

from gcm_core.detectors.base import UnitBatch, UnitOutputs
from gcm_core.graph import GraphSpec, build_dense_graph
from gcm_core.units import as_intervals

_PADDING_INTERVAL = (0.0, 1.0)  # any positive-length interval keeps the padding rows finite


class _Replay:
    """Fixed input buffers for ``size`` units and the pass over them (captured on a GPU)."""

    def __init__(self, size: int, step: Callable[["_Replay"], UnitOutputs], body_dim: int,
                 comp_dim: int | None, head_dtype: torch.dtype, device: torch.device) -> None:
        self.intervals = torch.tensor([_PADDING_INTERVAL], dtype=torch.float64, device=device).repeat(size, 1)
        self.body = torch.zeros(size, body_dim, device=device)  # float32: the graph's cosines read it
        self.comp = None if comp_dim is None else torch.zeros(size, comp_dim, dtype=head_dtype, device=device)
        self.num_units = torch.zeros((), dtype=torch.long, device=device)
        self._step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        if device.type == "cuda":
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the capture (kernel selection, allocator)
                    step(self)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = step(self)

    def load(self, intervals: Tensor, body: Tensor, comp: Tensor | None) -> None:
        n = intervals.shape[0]
        self.intervals[:n].copy_(intervals)
        for column, value in enumerate(_PADDING_INTERVAL):  # scalar fills: no host tensor per video
            self.intervals[n:, column].fill_(value)
        self.body[:n].copy_(body)
        self.body[n:].zero_()
        if self.comp is not None:
            self.comp[:n].copy_(comp)
            self.comp[n:].zero_()
        self.num_units.fill_(n)

    def run(self) -> UnitOutputs:
        if self.graph is None:
            return self._step(self)
        self.graph.replay()
        return self.outputs


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
    ``compile_graph``: build the graph through ``torch.compile`` (one compilation, for any unit
    count), which fuses its two dozen elementwise passes over the N x N pairs into a few kernels.
    """

    def __init__(self, model: nn.Module, spec: GraphSpec = GraphSpec(), *, pad_to: int = 64,
                 autocast: torch.dtype | None = None, max_cached: int = 8, max_units: int = 8192,
                 compile_graph: bool = False) -> None:
        config = model.config
        branches = {config.act_module} | ({config.comp_module} if config.detector == "ssn" else set())
        if not branches <= {"gcm", "mlp"}:
            raise ValueError(f"captured inference runs gcm and mlp branches, not {sorted(branches - {'gcm', 'mlp'})}")
        self.model, self.spec = model.eval(), spec
        self._needs_graph = "gcm" in branches
        self._build_graph = torch.compile(build_dense_graph, dynamic=True) if compile_graph else build_dense_graph
        self.pad_to, self.autocast, self.max_cached, self.max_units = pad_to, autocast, max_cached, max_units
        weight = next(model.parameters())
        self.device, self.head_dtype = weight.device, weight.dtype
        self._replays: OrderedDict[int, _Replay] = OrderedDict()

    def _step(self, replay: _Replay) -> UnitOutputs:
        with torch.no_grad():
            graph = self._build_graph(replay.intervals, replay.body, self.spec, replay.num_units,
                                      validate=False) if self._needs_graph else None
            precision = nullcontext() if self.autocast is None else \
                torch.autocast(self.device.type, self.autocast, cache_enabled=False)
            with precision:
                return self.model(UnitBatch(replay.body.to(self.head_dtype), replay.comp, graph))

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
        if self.model.config.detector == "ssn" and comp is None:
            raise ValueError("the SSN head needs completeness features (comp)")
        replay = self._replay_for(intervals.shape[0], body, comp)
        replay.load(intervals, body, comp)
        out = replay.run()
        n = intervals.shape[0]
        keep = lambda t: None if t is None else t[:n].float().clone()  # noqa: E731
        return UnitOutputs(keep(out.logits), keep(out.completeness), keep(out.offsets))
