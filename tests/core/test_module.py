"""Properties of the GCM and its baselines that every detector relies on."""
from __future__ import annotations

import pytest
import torch

from gcm_core.graph import Graph, GraphSpec, build_graph
from gcm_core.module import GCM, MLP, make_module


def random_video(n: int, dim: int, seed: int) -> tuple[torch.Tensor, Graph]:
    g = torch.Generator().manual_seed(seed)
    start = torch.rand(n, generator=g) * 100
    intervals = torch.stack([start, start + 1 + torch.rand(n, generator=g) * 20], dim=1)
    x = torch.randn(n, dim, generator=g)
    return x, build_graph(intervals, x, GraphSpec(theta_ctx=0.3, k_sur=3, l_sem=3))


def dense_reference(module: GCM, x: torch.Tensor, graph: Graph) -> torch.Tensor:
    """Eq. 1-2 with the degree-normalised adjacency plus identity, as an explicit dense matrix."""
    n = graph.num_nodes
    a = torch.zeros(n, n, dtype=x.dtype)
    src, dst = graph.edge_index
    a[src, dst] = graph.weight.to(x.dtype)
    degree = (torch.zeros(n).index_add_(0, src, torch.ones(src.numel()))).clamp(min=1)
    a = a / degree[:, None] + torch.eye(n)
    h = x
    for k, layer in enumerate(module.layers):
        h = (a @ h) @ layer.weight.T
        if k < len(module.layers) - 1:
            h = torch.relu(h)
    return h + x


@pytest.mark.parametrize("kind", ["gcm", "mlp", "mp", "attention"])
def test_modules_keep_the_feature_size(kind):
    x, graph = random_video(30, 8, 0)
    out = make_module(kind, 8).eval()(x, graph)
    assert out.shape == x.shape


def test_gcm_in_eval_is_eq1_with_residual():
    torch.manual_seed(0)
    x, graph = random_video(40, 6, 1)
    gcm = GCM(6).eval()
    torch.testing.assert_close(gcm(x, graph), dense_reference(gcm, x, graph), rtol=1e-5, atol=1e-5)


def test_no_edges_gcm_equals_mlp_with_the_same_weights():
    torch.manual_seed(0)
    x, graph = random_video(25, 8, 2)
    empty = Graph(graph.num_nodes, graph.edge_index[:, :0], graph.edge_type[:0], graph.weight[:0])
    gcm, mlp = GCM(8).train(), MLP(8).train()
    mlp.load_state_dict(gcm.state_dict())
    torch.testing.assert_close(gcm(x, empty), mlp(x, empty))


def test_sampling_with_ns_covering_every_degree_equals_full():
    torch.manual_seed(0)
    x, graph = random_video(50, 8, 3)
    max_degree = int(torch.bincount(graph.edge_index[0]).max())
    gcm = GCM(8, num_samples=max_degree)
    full = gcm.eval()(x, graph)
    torch.testing.assert_close(gcm.train()(x, graph), full)


def test_sampling_takes_at_most_ns_neighbours_and_is_unbiased():
    torch.manual_seed(0)
    x, graph = random_video(40, 4, 4)
    gcm = GCM(4, num_layers=1, num_samples=2)
    with torch.no_grad():
        gcm.layers[0].weight.copy_(torch.eye(4))
    full = gcm.eval()(x, graph)
    gcm.train()
    mean = torch.stack([gcm(x, graph) for _ in range(3000)]).mean(0)
    torch.testing.assert_close(mean, full, atol=0.05, rtol=0.05)


def test_sampled_subset_of_nodes_equals_those_rows_when_ns_covers_all():
    torch.manual_seed(0)
    x, graph = random_video(60, 8, 5)
    gcm = GCM(8, num_samples=1000).train()
    nodes = torch.tensor([7, 3, 41, 3])
    torch.testing.assert_close(gcm(x, graph, nodes), gcm(x, graph)[nodes])


@pytest.mark.parametrize("kind", ["gcm", "mlp", "mp", "attention"])
def test_permuting_units_permutes_outputs(kind):
    torch.manual_seed(0)
    x, graph = random_video(30, 8, 6)
    module = make_module(kind, 8).eval()
    perm = torch.randperm(30)
    inverse = torch.argsort(perm)
    src, dst = graph.edge_index
    permuted = Graph(30, torch.stack([inverse[src], inverse[dst]]), graph.edge_type, graph.weight)
    torch.testing.assert_close(module(x[perm], permuted), module(x, graph)[perm], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gcm", "mlp", "mp", "attention"])
def test_batch_equals_videos_one_by_one(kind):
    torch.manual_seed(0)
    videos = [random_video(n, 8, 10 + n) for n in (12, 30, 7)]
    module = make_module(kind, 8).eval()
    batched = module(torch.cat([x for x, _ in videos]), Graph.batch([g for _, g in videos]))
    alone = torch.cat([module(x, g) for x, g in videos])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,weighting", [("gcm", "cos"), ("gcm", "embed-cos"), ("gcm", "binary"),
                                             ("mlp", "cos"), ("mp", "cos"), ("attention", "cos")])
def test_gradients_reach_every_parameter(kind, weighting):
    torch.manual_seed(0)
    x, graph = random_video(30, 8, 7)
    module = make_module(kind, 8, weighting=weighting, dropout=0.1).train()
    module(x, graph).pow(2).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ssn_branches_aggregate_the_same_sampled_neighbourhoods_in_one_iteration():
    """Algorithm 1 samples once per iteration, and the authors' code gives SSN's GCM1 and GCM2 one
    sampled tree: with the same weights and inputs the two branches agree exactly, where two
    separate draws do not."""
    from gcm_core.detectors import ModelConfig, UnitBatch, build_detector

    torch.manual_seed(0)
    x, graph = random_video(60, 8, 8)
    nodes = torch.tensor([0, 5, 17, 33, 48])
    assert int(torch.bincount(graph.edge_index[0]).max()) > 4   # N_s = 4 leaves neighbours out
    head = build_detector(ModelConfig(comp_input="extended"), 8, 3).train()
    head.gcm2.load_state_dict(head.gcm1.state_dict())
    outputs = {}
    for name in ("gcm1", "gcm2"):
        getattr(head, name).register_forward_hook(lambda module, args, out, name=name: outputs.update({name: out}))
    head(UnitBatch(x, x.clone(), graph, nodes))
    torch.testing.assert_close(outputs["gcm1"], outputs["gcm2"], rtol=0, atol=0)
    assert not torch.equal(head.gcm1(x, graph, nodes), head.gcm2(x, graph, nodes))
