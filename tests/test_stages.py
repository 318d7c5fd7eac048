"""Stage components on random tensors: shapes, invariants, and ToMe's merge arithmetic."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fico.compressors.fuse import Fuse
from fico.compressors.weighted_average import WeightedAverage
from fico.correlators.convergent import Convergent
from fico.correlators.key_similarity import KeySimilarity
from fico.filters.attention_rank import AttentionRank
from fico.filters.bipartite import BipartiteMatching
from fico.selection import split_by_scores, top_k_shares
from fico.state import TokenState

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


def make_state(b, n, d, dtype, seed, protected_first=True):
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(n).expand(b, n)
    candidate = positions != 0 if protected_first else torch.ones(b, n, dtype=torch.bool)
    keys = torch.randn(b, n, 8, generator=g, dtype=torch.float64).to(dtype)
    attention = torch.rand(b, n, generator=g, dtype=torch.float64).to(dtype)
    return TokenState(hidden=torch.randn(b, n, d, generator=g, dtype=torch.float64).to(dtype), positions=positions,
                      candidate=candidate, visual=torch.ones(b, n, dtype=torch.bool),
                      signals={"keys": keys, "cls_attention": attention})


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(2, 40), dtype=DTYPES, seed=st.integers(0, 10_000), data=st.data())
def test_split_is_a_sorted_partition_of_the_top_scores(b, n, dtype, seed, data):
    state = make_state(b, n, 4, dtype, seed)
    r = data.draw(st.integers(0, n - 1))
    split = AttentionRank("cls_attention").split(state, r)
    assert split.discarded.shape == (b, r) and split.preserved.shape == (b, n - r)
    both = torch.cat([split.discarded, split.preserved], 1).sort(1).values
    assert torch.equal(both, torch.arange(n).expand(b, n))
    assert torch.equal(split.preserved, split.preserved.sort(1).values)
    assert not (split.discarded == 0).any()  # [CLS] is protected
    attention = state.signals["cls_attention"].float()
    for i in range(b):
        dropped = attention[i, split.discarded[i]]
        kept = attention[i, split.preserved[i]][split.preserved[i] != 0]
        if dropped.numel() and kept.numel():
            assert dropped.max() <= kept.min()


def test_ties_discard_the_lower_original_position_first():
    scores = torch.tensor([[float("-inf"), 1.0, 1.0, 1.0, 0.5]])
    split = split_by_scores(scores, 2)
    assert split.discarded.tolist() == [[1, 2]]


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(3, 41), dtype=DTYPES, seed=st.integers(0, 10_000), data=st.data())
def test_bipartite_matching_discards_only_a_side_candidates(b, n, dtype, seed, data):
    state = make_state(b, n, 4, dtype, seed)
    f = BipartiteMatching()
    r = data.draw(st.integers(0, f.max_discard(n, n - 1)))
    split = f.split(state, r)
    assert (split.discarded % 2 == 0).all() and not (split.discarded == 0).any()
    assert torch.equal(split.targets, split.preserved % 2 == 1)
    assert split.extras["tome_order"].shape == (b, n - r)
    corr = KeySimilarity(1).correlate(state, split)
    assert torch.allclose(corr.shares.sum(-1).double(), torch.ones(b, r, dtype=torch.float64))
    assert (corr.shares[~split.targets[:, None, :].expand_as(corr.shares)] == 0).all()


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), n=st.integers(3, 30), seed=st.integers(0, 10_000), data=st.data())
def test_weighted_average_matches_scatter_merge_and_conserves_size(b, n, seed, data):
    state = make_state(b, n, 5, torch.float64, seed)
    g = torch.Generator().manual_seed(seed + 1)
    state.size = torch.randint(1, 4, (b, n, 1), generator=g).double()
    f = BipartiteMatching()
    r = data.draw(st.integers(0, f.max_discard(n, n - 1)))
    split = f.split(state, r)
    corr = KeySimilarity(1).correlate(state, split)
    out = WeightedAverage(size_weighted=True).compress(state, split, corr)
    assert torch.allclose(out.size.sum(1), state.size.sum(1))
    # ToMe: x' = scatter_sum(x * m) / scatter_sum(m) over each target
    target = corr.shares.argmax(-1)  # (B, r) index into preserved
    for i in range(b):
        num = state.hidden[i, split.preserved[i]] * state.size[i, split.preserved[i]]
        den = state.size[i, split.preserved[i]].clone()
        src = split.discarded[i]
        num = num.index_add(0, target[i], state.hidden[i, src] * state.size[i, src])
        den = den.index_add(0, target[i], state.size[i, src])
        assert torch.allclose(out.hidden[i], num / den)
        untouched = torch.ones(n - r, dtype=torch.bool)
        untouched[target[i]] = False
        assert torch.equal(out.hidden[i][untouched], state.hidden[i, split.preserved[i]][untouched])
    assert torch.equal(out.positions, split.preserved)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), n=st.integers(3, 30), seed=st.integers(0, 10_000), data=st.data())
def test_fuse_appends_the_attention_weighted_sum(b, n, seed, data):
    state = make_state(b, n, 5, torch.float64, seed)
    r = data.draw(st.integers(1, n - 1))
    split = AttentionRank("cls_attention").split(state, r)
    corr = Convergent("cls_attention").correlate(state, split)
    out = Fuse().compress(state, split, corr)
    assert out.hidden.shape == (b, n - r + 1, 5)
    for i in range(b):
        w = state.signals["cls_attention"][i, split.discarded[i]]
        expected = (w[:, None] * state.hidden[i, split.discarded[i]]).sum(0)
        assert torch.allclose(out.hidden[i, -1], expected)
    assert (out.positions[:, -1] == -1).all() and out.candidate[:, -1].all()


@settings(max_examples=30, deadline=None)
@given(r=st.integers(1, 6), t=st.integers(1, 12), k=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_top_k_shares_rows_sum_to_one(r, t, k, seed):
    matrix = torch.rand(2, r, t, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k = min(k, t)
    shares = top_k_shares(matrix, k)
    assert torch.allclose(shares.sum(-1), torch.ones(2, r, dtype=torch.float64))
    assert ((shares > 0).sum(-1) <= k).all()


@settings(max_examples=40, deadline=None)
@given(r=st.integers(0, 12), t=st.integers(1, 40), per_row=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_receive_adds_the_nonzero_shares_exactly_as_the_dense_product(r, t, per_row, seed):
    from fico.compressors.weighted_average import receive

    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(2, r, t, generator=g, dtype=torch.float64)  # signed: cosine shares may be negative
    keep = torch.rand(2, r, t, generator=g).argsort(-1) < min(per_row, t)
    weights = weights * keep
    if r:
        weights[0, 0] = 0  # a row that sends nothing
    discarded = torch.randn(2, r, 5, generator=g, dtype=torch.float64)
    received, mass = receive(weights, discarded)
    torch.testing.assert_close(received, weights.transpose(1, 2) @ discarded, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mass, weights.sum(1)[..., None], rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 700), q=st.one_of(st.sampled_from([0.0, 0.5, 0.998, 0.999, 1.0]), st.floats(0, 1)),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_row_quantile_is_torch_quantile_bit_for_bit(n, q, dtype, seed):
    from fico.selection import row_quantile

    g = torch.Generator().manual_seed(seed)
    values = torch.randn(2, 3, n, generator=g, dtype=dtype)
    values[0, 0] = values[0, 0].round()  # ties
    assert torch.equal(row_quantile(values, q), torch.quantile(values, q, dim=-1, keepdim=True))
