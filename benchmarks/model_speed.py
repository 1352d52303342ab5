"""Speed of the SSN head with GCM branches against the same head with MLP branches, one run.

    python benchmarks/model_speed.py [--device cpu|cuda] [--precision fp32|tf32|bf16|bf16-autocast] [--videos 8]
                                     [--units 2500] [--repeat 5] [--compile graph|step] [--skip-all-units]

- training step: forward + backward + SGD over a batch of ``--videos`` videos x ``--units`` units,
  1024-d body and 3072-d three-part features, graphs precomputed (as training does). Two ways:
  ``sampled``: only the units entering the losses (8 per video, fg : incomplete : bg = 1 : 6 : 1)
  and their sampled neighbourhoods are computed (Eq. 18); ``all units``: every unit is computed,
  neighbourhoods sampled (what the authors' code does).
- inference pass: one video of N = 800 and 2000 units, graph construction included, full
  neighbourhoods, eval mode; graph construction alone is timed too.
- on a GPU, the inference pass once more as one replayed CUDA graph
  (:class:`gcm_core.captured.CapturedInference`: dense fixed-shape graph, units padded to a
  multiple of 64; ``--compile graph``: its graph built through ``torch.compile``; ``--compile step``:
  graph and head compiled together).
- ``--precision tf32`` lets CUDA matrix products use TF32 (float32 storage, 10-bit mantissa
  products); ``bf16`` also converts the captured passes' head to bfloat16 (weights cast once),
  ``bf16-autocast`` runs it under bfloat16 autocast instead (weights re-cast at every replay);
  the eager rows stay TF32 with either; the default keeps exact float32 products.

Prints milliseconds per video and the GCM / MLP ratio of each. Issue 4's anchors (authors' code,
H100): 6.96 ms per video per training step, 2.8 / 4.0 ms per inference pass at N = 800 / 2000,
1.48 ms for an MLP-only step. Targets: GPU <= 2.0 ms (training step) and <= 1.0 ms (inference,
N = 2000); CPU GCM within 1.5x of MLP.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from gcm_core.captured import CapturedInference
from gcm_core.data.sampling import FOREGROUND, INCOMPLETE, BACKGROUND
from gcm_core.detectors import ModelConfig, UnitBatch, build_detector
from gcm_core.graph import Graph, GraphSpec, build_graph
from gcm_core.losses import ssn_loss

CLASSES = 20


def video(n: int, gen: torch.Generator, dim: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    start = torch.rand(n, generator=gen, dtype=torch.float64) * 300
    intervals = torch.stack([start, start + 0.5 + torch.rand(n, generator=gen, dtype=torch.float64) * 30], 1)
    return intervals, torch.randn(n, dim, generator=gen), torch.randn(n, 3 * dim, generator=gen)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def training_step(kind: str, sampled: bool, args, batch: UnitBatch, device: str) -> float:
    torch.manual_seed(0)
    model = build_detector(ModelConfig(act_module=kind, comp_module=kind), 1024, CLASSES).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step_batch = batch if sampled else UnitBatch(batch.body, batch.comp, batch.graph, None,
                                                 *_all_targets(batch.body.shape[0], device))

    def step():
        out = model(step_batch)
        terms = ssn_loss(out.logits, out.completeness, out.offsets, step_batch.role, step_batch.label,
                         step_batch.reg_target)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()

    return timed(step, device, args.repeat) / args.videos


def _all_targets(n: int, device: str):
    role = torch.tensor([FOREGROUND, INCOMPLETE, BACKGROUND], device=device).repeat(n // 3 + 1)[:n]
    return role, torch.randint(1, CLASSES + 1, (n,), device=device), torch.randn(n, 2, device=device)


def inference_pass(kind: str, n: int, device: str, repeat: int) -> float:
    gen = torch.Generator().manual_seed(n)
    intervals, body, comp = video(n, gen)
    body, comp = body.to(device), comp.to(device)
    torch.manual_seed(0)
    model = build_detector(ModelConfig(act_module=kind, comp_module=kind), 1024, CLASSES).to(device).eval()

    @torch.no_grad()
    def run():
        graph = build_graph(intervals.to(device), body, GraphSpec()) if kind == "gcm" else \
            Graph(n, torch.empty(2, 0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.uint8, device=device),
                  torch.empty(0, device=device))
        model(UnitBatch(body, comp, graph.to(device)))

    return timed(run, device, repeat)


def captured_pass(kind: str, n: int, precision: str, compile: str | None, repeat: int) -> float:
    intervals, body, comp = video(n, torch.Generator().manual_seed(n))
    body, comp = body.cuda(), comp.cuda()  # features already on the device, as in inference_pass
    torch.manual_seed(0)
    model = build_detector(ModelConfig(act_module=kind, comp_module=kind), 1024, CLASSES).cuda()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    autocast = torch.bfloat16 if precision == "bf16-autocast" else None
    captured = CapturedInference(model, GraphSpec(), autocast=autocast, compile=compile)
    return timed(lambda: captured(intervals, body, comp), "cuda", repeat)


def graph_construction(n: int, device: str, repeat: int) -> float:
    intervals, body, _ = video(n, torch.Generator().manual_seed(n))
    body = body.to(device)
    return timed(lambda: build_graph(intervals.to(device), body, GraphSpec()), device, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "tf32", "bf16", "bf16-autocast"), default="fp32")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--units", type=int, default=2500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--compile", choices=("graph", "step"),
                        help="captured passes compile the graph, or graph and head, through torch.compile")
    parser.add_argument("--skip-all-units", action="store_true", help="skip the slow every-unit training step")
    args = parser.parse_args()
    device = args.device
    torch.backends.cuda.matmul.allow_tf32 = args.precision != "fp32"
    gen = torch.Generator().manual_seed(0)
    graphs, bodies, comps, nodes, roles = [], [], [], [], []
    for v in range(args.videos):
        intervals, body, comp = video(args.units, gen)
        graphs.append(build_graph(intervals, body, GraphSpec()))
        bodies.append(body)
        comps.append(comp)
        picked = torch.randperm(args.units, generator=gen)[:8]
        nodes.append(picked + v * args.units)
        roles.append(torch.tensor([FOREGROUND] + [INCOMPLETE] * 6 + [BACKGROUND]))
    role = torch.cat(roles).to(device)
    batch = UnitBatch(torch.cat(bodies).to(device), torch.cat(comps).to(device), Graph.batch(graphs).to(device),
                      torch.cat(nodes).to(device), role, torch.randint(1, CLASSES + 1, role.shape, device=device),
                      torch.randn(role.numel(), 2, device=device))
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}, {args.precision} products; batch {args.videos} videos x {args.units} units, 1024-d body, 3072-d three-part")
    rows = [("training step, sampled units (Eq. 18)", lambda k: training_step(k, True, args, batch, device))]
    if not args.skip_all_units:
        rows.append(("training step, all units", lambda k: training_step(k, False, args, batch, device)))
    rows += [(f"inference pass, N={n}, graph included", lambda k, n=n: inference_pass(k, n, device, args.repeat))
             for n in (800, 2000)]
    if device == "cuda":
        rows += [(f"same, one CUDA graph, N={n}",
                  lambda k, n=n: captured_pass(k, n, args.precision, args.compile, args.repeat))
                 for n in (800, 2000)]
    for label, fn in rows:
        gcm, mlp = fn("gcm") * 1e3, fn("mlp") * 1e3
        print(f"{label:42s} GCM {gcm:9.2f} ms/video   MLP {mlp:9.2f} ms/video   GCM/MLP x{gcm / mlp:.2f}")
    for n in (800, 2000):
        print(f"{f'of which graph construction, N={n}':42s} {graph_construction(n, device, args.repeat) * 1e3:9.2f} ms")


if __name__ == "__main__":
    main()
