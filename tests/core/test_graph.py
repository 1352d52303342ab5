"""The graph rules (Eq. 4-8) against a brute-force double loop written here."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from helpers import read_tag_proposals_frames
from gcm_core.candidates import CandidateCaps, candidate_edges, select_edges
from gcm_core.graph import EDGE_BIT, EDGE_TYPES, Graph, GraphSpec, build_dense_graph, build_graph
from gcm_core.pairwise import rank_smallest


def brute_force(intervals, feats, spec: GraphSpec) -> dict[tuple[int, int], tuple[int, float]]:
    """{(i, j): (type bits, weight)} by looping over every pair, straight from the definitions."""
    n = len(intervals)
    norms = [math.sqrt(sum(v * v for v in f)) for f in feats]

    def tiou(a, b):
        inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
        return inter / (max(a[1], b[1]) - min(a[0], b[0]))

    def dist(a, b):
        return abs((a[0] + a[1]) / 2 - (b[0] + b[1]) / 2) / (max(a[1], b[1]) - min(a[0], b[0]))

    def cos(i, j):
        return float(np.dot(feats[i], feats[j])) / (norms[i] * norms[j])

    edges: dict[tuple[int, int], int] = {}
    for i in range(n):
        others = [j for j in range(n) if j != i]
        disjoint = [j for j in others if tiou(intervals[i], intervals[j]) == 0]
        chosen: dict[str, list[int]] = {"contextual": [], "surrounding": [], "semantic": []}
        chosen["contextual"] = [j for j in others if tiou(intervals[i], intervals[j]) > spec.theta_ctx]
        near = sorted((dist(intervals[i], intervals[j]), j) for j in disjoint
                      if dist(intervals[i], intervals[j]) < spec.theta_sur)
        chosen["surrounding"] = [j for _, j in (near if spec.k_sur is None else near[:spec.k_sur])]
        if spec.semantic_rule == "disjoint-top":
            chosen["semantic"] = [j for _, j in sorted((-cos(i, j), j) for j in disjoint)[:spec.l_sem]]
        else:
            knn = [j for _, j in sorted((-cos(i, j), j) for j in others)[:spec.l_sem]]
            chosen["semantic"] = [j for j in knn if j in disjoint]
        for name in spec.edge_types:
            for j in chosen[name]:
                edges[(i, j)] = edges.get((i, j), 0) | EDGE_BIT[name]
    return {e: (bits, max(0.0, cos(*e))) for e, bits in edges.items()}


def as_dict(g: Graph) -> dict[tuple[int, int], tuple[int, float]]:
    pairs = g.edge_index.T.tolist()
    assert len(set(map(tuple, pairs))) == len(pairs), "duplicate (i, j) pairs"
    return {tuple(p): (int(t), float(w)) for p, t, w in zip(pairs, g.edge_type, g.weight)}


def assert_same_graph(got: Graph, expected: dict) -> None:
    got_d = as_dict(got)
    assert {k: v[0] for k, v in got_d.items()} == {k: v[0] for k, v in expected.items()}
    for key, (_, w) in expected.items():
        assert got_d[key][1] == pytest.approx(w, abs=1e-6)
    assert all(i != j for i, j in got_d), "self loop"


edge_type_sets = st.sampled_from([EDGE_TYPES, ("contextual",), ("surrounding",), ("semantic",),
                                  ("contextual", "semantic"), ("surrounding", "semantic")])


@st.composite
def videos(draw):
    n = draw(st.integers(1, 24))
    integer = draw(st.booleans())  # integer boundaries make exact ties and touching units
    starts = draw(st.lists(st.integers(0, 40) if integer else st.floats(0, 40), min_size=n, max_size=n))
    lens = draw(st.lists(st.integers(1, 15) if integer else st.floats(0.01, 15), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**16))
    feats = np.random.default_rng(seed).normal(size=(n, 5))
    return [(float(s), float(s + ln)) for s, ln in zip(starts, lens)], feats


@given(video=videos(),
       theta_ctx=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9]),
       theta_sur=st.sampled_from([0.5, 0.6, 0.75, 1.0]),
       k_sur=st.sampled_from([None, 0, 1, 2, 5]),
       l_sem=st.sampled_from([0, 1, 2, 4]),
       edge_types=edge_type_sets,
       rule=st.sampled_from(["disjoint-top", "knn-then-disjoint"]),
       block=st.sampled_from([7, 1 << 22]))
def test_graph_equals_brute_force(video, theta_ctx, theta_sur, k_sur, l_sem, edge_types, rule, block):
    intervals, feats = video
    spec = GraphSpec(theta_ctx, theta_sur, k_sur, l_sem, edge_types, rule)
    expected = brute_force(intervals, feats, spec)
    g = select_edges(candidate_edges(torch.tensor(intervals), torch.tensor(feats),
                                     CandidateCaps.for_spec(spec), max_block_elements=block), spec)
    assert_same_graph(g, expected)
    assert_same_graph(build_graph(torch.tensor(intervals), torch.tensor(feats), spec, max_block_elements=block),
                      expected)


@given(video=videos(),
       spec=st.builds(GraphSpec, st.sampled_from([0.0, 0.5, 0.7]), st.sampled_from([0.6, 1.0]),
                      st.sampled_from([None, 0, 2]), st.sampled_from([0, 2, 4]), edge_type_sets,
                      st.sampled_from(["disjoint-top", "knn-then-disjoint"])),
       padding=st.integers(0, 5))
def test_dense_graph_has_the_same_edges_and_weights_and_ignores_padding(video, spec, padding):
    """The fixed-shape graph of captured inference: padding units (any interval, zero features)
    appended after the video's units change none of its edges and are nobody's neighbour."""
    intervals, feats = video
    n = len(intervals)
    padded_iv = torch.tensor(intervals + [(0.0, 1.0)] * padding)
    padded_feats = torch.cat([torch.tensor(feats), torch.zeros(padding, feats.shape[1], dtype=torch.float64)])
    dense = build_dense_graph(padded_iv, padded_feats, spec, num_units=torch.tensor(n))
    assert not dense.adjacency[:, n:].any()
    real = dense.adjacency[:n, :n]
    got = {(i, j): float(dense.weight[i, j]) for i, j in real.nonzero().tolist()}
    expected = brute_force(intervals, feats, spec)
    assert got.keys() == expected.keys()
    for key, (_, w) in expected.items():
        assert got[key] == pytest.approx(w, abs=1e-6)
    assert not dense.weight[~dense.adjacency].any(), "weight off the graph"


@given(video=videos(), theta_ctx=st.sampled_from([0.5, 0.7, 0.9]), theta_sur=st.sampled_from([0.6, 1.0]),
       k_sur=st.sampled_from([0, 1, 2, 4]), l_sem=st.sampled_from([0, 1, 3]), edge_types=edge_type_sets)
def test_selection_from_loose_candidates_equals_direct_build(video, theta_ctx, theta_sur, k_sur, l_sem, edge_types):
    """One preprocessing pass under loose caps serves every setting of a grid."""
    intervals, feats = video
    loose = candidate_edges(torch.tensor(intervals), torch.tensor(feats), CandidateCaps(sur_k=4, sem_k=3, knn_k=3))
    for rule in ("disjoint-top", "knn-then-disjoint"):
        spec = GraphSpec(theta_ctx, theta_sur, k_sur, l_sem, edge_types, rule)
        assert_same_graph(select_edges(loose, spec), brute_force(intervals, feats, spec))


@given(rows=st.integers(0, 5), n=st.integers(1, 70), k=st.sampled_from([None, 0, 1, 2, 3, 8, 20]),
       inf_share=st.sampled_from([0.0, 0.5, 0.95]), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**16))
def test_ranked_k_smallest_are_the_sorted_rows(rows, n, k, inf_share, dtype, seed):
    """rank_smallest (the candidates' k nearest / most similar) against sorting each row by
    (value, column): few distinct values make ties, +inf marks ineligible entries."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 6, size=(rows, n)).astype(float)
    values[rng.random((rows, n)) < inf_share] = math.inf
    keyed = torch.tensor(values, dtype=dtype)
    row, col, rank = rank_smallest(keyed, k, torch.empty(rows, n, dtype=torch.bool))
    expected = [(i, j, r) for i in range(rows)
                for r, (_, j) in enumerate(sorted((v, j) for j, v in enumerate(values[i]) if v < math.inf))
                if k is None or r < k]
    assert list(zip(row.tolist(), col.tolist(), rank.tolist())) == expected


def test_ranked_k_smallest_of_rows_all_tied_are_the_first_columns():
    """Equal keys everywhere (units with equal features): the bound keeps every entry, so the
    argmin passes decide; ties go to the lower columns."""
    row, col, rank = rank_smallest(torch.zeros(3, 100), 8, torch.empty(3, 100, dtype=torch.bool))
    assert row.tolist() == [r for r in range(3) for _ in range(8)]
    assert col.tolist() == rank.tolist() == list(range(8)) * 3


def test_real_tag_proposals_match_brute_force(shared_data):
    """Real THUMOS'14 TAG proposal geometry (frames), seeded random features."""
    proposals = read_tag_proposals_frames(shared_data / "thumos14/proposals/tag_test_proposal_list.txt", 6)
    rng = np.random.default_rng(14)
    spec = GraphSpec(theta_ctx=0.7, theta_sur=1.0, k_sur=2, l_sem=2)
    checked = 0
    for video, spans in proposals.items():
        if len(spans) > 160:  # the pure-Python loop is O(N^2 log N); keep the test quick
            spans = spans[:160]
        feats = rng.normal(size=(len(spans), 16))
        intervals = [(float(s), float(e)) for s, e in spans]
        assert_same_graph(build_graph(torch.tensor(intervals), torch.tensor(feats), spec),
                          brute_force(intervals, feats, spec))
        checked += 1
    assert checked >= 5


def test_a_video_without_units_has_empty_graphs():
    assert build_graph(torch.zeros(0, 2), torch.zeros(0, 4)).num_edges == 0
    assert build_dense_graph(torch.zeros(0, 2), torch.zeros(0, 4)).adjacency.shape == (0, 0)


def test_touching_units_are_disjoint_and_weights_are_clamped_cosines():
    intervals = torch.tensor([[0.0, 2.0], [2.0, 4.0], [0.0, 2.2]])
    feats = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [1.0, 1.0]])
    g = build_graph(intervals, feats, GraphSpec(theta_ctx=0.5, k_sur=None, l_sem=0))
    d = as_dict(g)
    # 0 and 1 only touch: surrounding (disjoint), not contextual; cosine < 0 is clamped to 0
    assert d[(0, 1)] == (EDGE_BIT["surrounding"], 0.0)
    # 0 and 2 overlap with tIoU 2/2.2 > 0.5: contextual, weight cos = 1/sqrt(2)
    assert d[(0, 2)][0] == EDGE_BIT["contextual"]
    assert d[(0, 2)][1] == pytest.approx(1 / math.sqrt(2))


def test_loose_caps_reject_a_spec_they_cannot_serve():
    cands = candidate_edges(torch.tensor([[0.0, 1.0], [2.0, 3.0]]), torch.randn(2, 3), CandidateCaps(sur_k=1))
    with pytest.raises(ValueError, match="k_sur=2 exceeds sur_k=1"):
        select_edges(cands, GraphSpec(k_sur=2))


@given(video=videos(), k_sur=st.sampled_from([None, 1, 2]), l_sem=st.sampled_from([0, 2, 4]))
def test_union_of_one_rule_graphs_is_the_graph_of_all_rules(video, k_sur, l_sem):
    """The rules mark their edges independently, so the graphs of one rule each, joined, must be
    the graph of all three: every pair once, in build_graph's order, a pair several rules admit
    with all their bits, and the same weights."""
    intervals, feats = torch.tensor(video[0]), torch.tensor(video[1])
    spec = GraphSpec(k_sur=k_sur, l_sem=l_sem)
    ctx, sur, sem = (build_graph(intervals, feats, GraphSpec(k_sur=k_sur, l_sem=l_sem, edge_types=(t,)))
                     for t in EDGE_TYPES)
    joined, expected = ctx.union(sur).union(sem), build_graph(intervals, feats, spec)
    assert torch.equal(joined.edge_index, expected.edge_index)
    assert torch.equal(joined.edge_type, expected.edge_type)
    assert torch.equal(joined.weight, expected.weight)


def test_union_refuses_graphs_of_other_units():
    one, two = (build_graph(torch.tensor([[0.0, 1.0], [2.0, 3.0]])[:n], torch.randn(n, 3)) for n in (1, 2))
    with pytest.raises(ValueError, match="same units"):
        one.union(two)


def test_batch_is_block_diagonal():
    g1 = build_graph(torch.tensor([[0.0, 1.0], [3.0, 4.0]]), torch.randn(2, 3))
    g2 = build_graph(torch.tensor([[0.0, 1.0], [0.1, 1.0], [5.0, 6.0]]), torch.randn(3, 3))
    b = Graph.batch([g1, g2])
    assert b.ptr.tolist() == [0, 2, 5]
    src, dst = b.edge_index
    video_of = torch.bucketize(torch.arange(5), b.ptr[1:], right=True)
    assert torch.equal(video_of[src], video_of[dst])
    assert b.num_edges == g1.num_edges + g2.num_edges


def test_bad_intervals_are_named():
    with pytest.raises(ValueError, match="unit 1"):
        build_graph(torch.tensor([[0.0, 1.0], [2.0, 2.0]]), torch.randn(2, 3))


@pytest.mark.parametrize("caps", [None, CandidateCaps()])
def test_surrounding_threshold_is_strict(caps):
    """[0, 1] and [3, 4]: centres 3 apart, span 4, so d = 0.75 exactly (Eq. 5)."""
    intervals, feats = torch.tensor([[0.0, 1.0], [3.0, 4.0]]), torch.randn(2, 3)
    for theta_sur, expected in ((0.75, 0), (0.7501, 2)):
        spec = GraphSpec(theta_sur=theta_sur, edge_types=("surrounding",))
        cands = candidate_edges(intervals, feats, caps or CandidateCaps.for_spec(spec))
        assert select_edges(cands, spec).num_edges == expected


def test_caps_name_each_graph_setting_they_cannot_serve():
    """Candidates kept under caps serve only graphs within them; a setting beyond a cap is named
    with that cap, and only for the edge types the graph uses."""
    caps = CandidateCaps(min_ctx_tiou=0.5, sur_k=8, sur_max_dist=1.0, sem_k=8, knn_k=4)
    assert caps.uncovered(GraphSpec()) == {}
    wide = GraphSpec(theta_ctx=0.3, theta_sur=1.5, k_sur=None, l_sem=6, semantic_rule="knn-then-disjoint")
    assert caps.uncovered(wide) == {"min_ctx_tiou": "theta_ctx=0.3 < min_ctx_tiou=0.5",
                                    "sur_max_dist": "theta_sur=1.5 > sur_max_dist=1.0",
                                    "sur_k": "k_sur=None exceeds sur_k=8", "knn_k": "l_sem=6 exceeds knn_k=4"}
    assert caps.uncovered(replace(wide, edge_types=("semantic",))) == {"knn_k": "l_sem=6 exceeds knn_k=4"}
    assert caps.uncovered(replace(wide, semantic_rule="disjoint-top")).keys() == {"min_ctx_tiou", "sur_max_dist", "sur_k"}
    with pytest.raises(ValueError, match="graph settings outside the candidate caps: theta_ctx=0.3"):
        caps.check_covers(wide)
