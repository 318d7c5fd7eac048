"""Invariants of the wave-2 components, on random states (hypothesis)."""

import math


import torch
from hypothesis import given, settings, strategies as st

from fico.correlators.clusters import cluster_count, density_peaks, recycled_count
from fico.filters.diversity import MaxMinDiversity, cosine_distance
from fico.filters.window import WindowRepresentatives, window_of
from fico.filters.dpp import ConditionalDPP
from fico.selection import greedy_dpp_map, greedy_max_min, iqr_outlier_count, split_keeping, uniform_stride
from fico.state import TokenState

SEEDS = st.integers(0, 10_000)


def state(b, n, d=8, seed=0, protected=1, grid=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    positions = torch.arange(n).expand(b, n)
    candidate = positions >= protected
    patch = torch.where(candidate, positions - protected, -1)
    return TokenState(hidden=hidden, positions=positions, candidate=candidate, visual=torch.ones_like(candidate),
                      text=torch.zeros_like(candidate), patch=patch, grid=grid)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(2, 30), seed=SEEDS, data=st.data())
def test_diversity_selection_never_picks_a_token_twice(b, n, seed, data):
    k = data.draw(st.integers(1, n))
    x = torch.randn(b, n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    chosen = greedy_max_min(cosine_distance(x), torch.zeros(b, dtype=torch.long), k)
    for row in chosen:
        assert len(set(row.tolist())) == k


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(3, 40), seed=SEEDS, data=st.data())
def test_max_min_diversity_keeps_exactly_the_count_and_the_protected(b, n, seed, data):
    s = state(b, n, seed=seed)
    r = data.draw(st.integers(0, n - 1))
    split = MaxMinDiversity().split(s, r)
    assert split.discarded.shape == (b, r) and split.preserved.shape == (b, n - r)
    assert bool((split.preserved[:, :1] == 0).all())  # the protected token stays
    both = torch.cat([split.discarded, split.preserved], 1).sort(1).values
    assert torch.equal(both, torch.arange(n).expand(b, n))


@given(count=st.integers(1, 50), total=st.integers(1, 600))
def test_uniform_stride_is_evenly_spaced_and_in_range(count, total):
    picks = uniform_stride(count, total)
    assert len(picks) == min(count, len(range(0, total, max(1, total // count))))
    assert picks == sorted(set(picks)) and all(0 <= p < total for p in picks)
    if len(picks) > 1:
        assert len({b - a for a, b in zip(picks, picks[1:])}) == 1


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), seed=SEEDS, data=st.data())
def test_density_peaks_gives_every_token_a_cluster_and_each_centre_its_own(n, seed, data):
    clusters = data.draw(st.integers(1, n))
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assignment = density_peaks(x, clusters)
    assert assignment.shape == (n,) and int(assignment.min()) >= 0 and int(assignment.max()) < clusters
    assert len(set(assignment.tolist())) == clusters  # every cluster has its centre


@given(removed=st.integers(0, 600), fraction=st.floats(0, 1))
def test_recycled_clusters_never_outnumber_the_recycled(removed, fraction):
    assert cluster_count(removed, fraction) <= max(recycled_count(removed, fraction), 0) or removed == 0


@given(values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=200))
def test_iqr_outlier_count_is_a_count_of_the_values(values):
    count = iqr_outlier_count(torch.tensor(values, dtype=torch.float64))
    assert 0 <= count < len(values) or len(values) == 1 and count == 0


@settings(max_examples=30, deadline=None)
@given(side=st.integers(2, 12), kernel=st.integers(1, 5))
def test_window_keeps_one_representative_per_whole_window(side, kernel):
    if kernel > side:
        return
    n = side * side
    s = state(1, n + 1, grid=(side, side))
    assert WindowRepresentatives(kernel).planned_keep(n) == (side // kernel) ** 2
    split = WindowRepresentatives(kernel).split(s, n - (side // kernel) ** 2)
    window, corner = window_of(s.patch, (side, side), kernel)
    kept_windows = window[0, split.preserved[0]][corner[0, split.preserved[0]]]
    assert sorted(kept_windows.tolist()) == list(range((side // kernel) ** 2))


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 30), seed=SEEDS)
def test_split_keeping_lists_every_token_once(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    count = int(torch.randint(0, n + 1, (1,), generator=g))
    keep = torch.zeros(b, n, dtype=torch.bool)
    for row in range(b):
        keep[row, torch.randperm(n, generator=g)[:count]] = True
    split = split_keeping(keep, torch.zeros(b, n))
    assert split.preserved.shape == (b, count)
    assert torch.equal(torch.cat([split.discarded, split.preserved], 1).sort(1).values, torch.arange(n).expand(b, n))
    assert bool(torch.gather(keep, 1, split.preserved).all())


def test_shaped_7b_has_llava_7b_architecture():
    from fico.benchmarks.shaped import build_shaped_7b

    model = build_shaped_7b(device="meta")
    parameters = sum(p.numel() for p in model.parameters())
    assert math.isclose(parameters, 7.0634e9, rel_tol=1e-3)
    assert next(model.parameters()).dtype == torch.float16


def test_prumerge_appends_its_extra_token_even_when_nothing_is_discarded():
    """The official code appends the weighted sum of the pruned tokens whatever their number;
    with none pruned (every patch an outlier or a supplement) it is a zero vector."""
    from fico.compressors.target_plus import TargetPlusSum
    from fico.stages import Correlation, Split

    s = state(1, 5)
    empty = torch.zeros(1, 0, dtype=torch.long)
    split = Split(scores=torch.zeros(1, 5), discarded=empty, preserved=torch.arange(5)[None],
                  targets=torch.ones(1, 5, dtype=torch.bool))
    correlation = Correlation(shares=torch.zeros(1, 0, 5, dtype=torch.float64),
                              fused=torch.zeros(1, 0, dtype=torch.float64))
    out = TargetPlusSum().compress(s, split, correlation)
    assert TargetPlusSum().appended(0) == 1 and out.hidden.shape == (1, 6, 8)
    assert torch.equal(out.hidden[:, :5], s.hidden) and not out.hidden[:, 5].any()


def test_prumerge_plus_defines_the_stride_the_official_code_cannot():
    """No outlier: the official 1 / ratio fails; fico's limit (an infinite stride) keeps patch 0 alone."""
    from fico.filters.outliers import IQROutliers

    s = state(1, 17, grid=(4, 4))
    s.signals = {"next_cls_attention_fullwidth": torch.ones(1, 17, dtype=torch.float64)}
    chosen, _ = IQROutliers(supplements=True)._choose(s)
    assert chosen.tolist() == [1]  # token 1 is patch 0 ([CLS] is token 0)


def _kernel(b, n, d, seed):
    x = torch.nn.functional.normalize(
        torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)
    relevance = torch.rand(b, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.1
    return relevance[:, :, None] * (x @ x.transpose(1, 2)) * relevance[:, None, :]


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(2, 30), d=st.integers(1, 12), seed=SEEDS, data=st.data())
def test_dpp_selection_never_picks_a_token_twice_even_past_the_kernels_rank(b, n, d, seed, data):
    k = data.draw(st.integers(1, n))
    for row in greedy_dpp_map(_kernel(b, n, d, seed), k):
        assert len(set(row.tolist())) == k


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), seed=SEEDS, data=st.data())
def test_each_dpp_pick_maximises_the_determinant_of_the_chosen_set(n, seed, data):
    """Within the kernel's rank, the Cholesky update's gain is det(L_{S+j}) / det(L_S)."""
    kernel = _kernel(1, n, n + 4, seed)[0]
    k = data.draw(st.integers(1, n))
    chosen = greedy_dpp_map(kernel[None], k)[0].tolist()
    for step, pick in enumerate(chosen):
        before = chosen[:step]
        gains = torch.tensor([float("-inf") if j in before else float(torch.det(kernel[before + [j]][:, before + [j]]))
                              for j in range(n)])
        assert gains[pick] >= gains.max() * (1 - 1e-9)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(3, 40), seed=SEEDS, data=st.data())
def test_conditional_dpp_keeps_exactly_the_count_and_the_protected(b, n, seed, data):
    s = state(b, n, seed=seed)
    s.signals = {"instruction_similarity": torch.rand(b, n, generator=torch.Generator().manual_seed(seed),
                                                      dtype=torch.float64)}
    r = data.draw(st.integers(0, n - 1))
    split = ConditionalDPP().split(s, r)
    assert split.discarded.shape == (b, r) and split.preserved.shape == (b, n - r)
    assert bool((split.preserved[:, :1] == 0).all())
    both = torch.cat([split.discarded, split.preserved], 1).sort(1).values
    assert torch.equal(both, torch.arange(n).expand(b, n))
