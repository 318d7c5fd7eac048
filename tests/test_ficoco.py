"""FiCoCo-V / -L / -VL: equality with straightforward code, hand-checked examples, properties,
knob errors, and every documented ablation one-liner."""

import math
import shlex
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fico
from fico import embedded
from fico.compressors.self_preserving import SelfPreserving
from fico.correlators.attention import AttentionCorrelation, TextBridgedCorrelation
from fico.filters.ficoco import FiCoCoL, FiCoCoV
from fico.filters.local_penalty import local_penalty
from fico.selection import quantile_shares, split_by_scores
from fico.stages import Correlation
from fico.state import TokenState
from reference import projected_features
from reference_ficoco import ficoco_l_logits, ficoco_v_states

DOCS = Path(__file__).resolve().parent.parent / "docs" / "ficoco.md"


# ------------------------------------------------------------------ equality with the spec


@pytest.mark.parametrize("overrides,kwargs", [
    (["r=40", "layers=[1,2]"], dict(r=40, layers=[1, 2])),
    (["r=100", "layers=[0,2]", "lambda=0.8", "c=3", "window=3"], dict(r=100, layers=[0, 2], lam=0.8, c=3, window=3)),
    (["r=7", "layers=[1]", "epsilon=0.5"], dict(r=7, layers=[1], eps=0.5)),
])
def test_ficoco_v_equals_spec(tiny_model, single_inputs, overrides, kwargs):
    model = tiny_model()
    pixels = single_inputs()["pixel_values"]
    with torch.no_grad():
        expected = projected_features(model, ficoco_v_states(model.model.vision_tower, pixels, **kwargs))[0]
        with fico.apply(model, fico.load_recipe("ficoco_v", overrides)):
            actual = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() < 1e-6  # same tokens, same (original) order


@pytest.mark.parametrize("overrides,kwargs", [
    (["k=1", "r=50"], dict(r=50, layers=[1, 2, 3])),
    (["layers=[2]", "r=200", "beta=0.3", "gamma=0.2"], dict(r=200, layers=[2], beta=0.3, gamma=0.2)),
    (["layers=[1,3]", "r=30", "epsilon=0.9"], dict(r=30, layers=[1, 3], eps=0.9)),
])
def test_ficoco_l_equals_spec(tiny_model, batch_inputs, overrides, kwargs):
    model = tiny_model()
    inputs = batch_inputs()
    with torch.no_grad():
        expected, keep = ficoco_l_logits(model, inputs["input_ids"], inputs["attention_mask"],
                                         inputs["pixel_values"], **kwargs)
        with fico.apply(model, fico.load_recipe("ficoco_l", overrides)):
            actual = model(**inputs).logits
    assert actual.shape == expected.shape
    real = torch.gather(inputs["attention_mask"].bool(), 1, keep)
    assert (actual - expected)[real].abs().max() < 1e-6


def test_ficoco_vl_runs_both_parts(tiny_model, batch_inputs):
    model = tiny_model()
    inputs = batch_inputs()
    recipe = fico.load_recipe("ficoco_vl", ["v.layers=[1,2]", "v.r=40", "l.k=1", "l.r=20"])
    with torch.no_grad(), fico.apply(model, recipe) as run:
        model(**inputs)
    assert run.trace.vision_features == 576 - 80
    assert [s.site for s in run.trace.steps] == ["vision"] * 2 + ["llm"] * 3  # both images in one tower call


# ------------------------------------------------------------------ hand-checked examples


def grid_state(scores_2d):
    rows, cols = len(scores_2d), len(scores_2d[0])
    scores = torch.tensor(scores_2d, dtype=torch.float64).reshape(1, -1)
    return scores, torch.arange(rows * cols)[None], (rows, cols)


def test_local_penalty_paper_example():
    scores, patch, grid = grid_state([[1.0, 1.2], [1.1, 1.6]])  # the paper's Fig. (intro.png) example
    assert local_penalty(scores, patch, grid, 2, 2.0).reshape(2, 2).tolist() == [[1.0, 1.2], [1.1, 3.2]]


def test_local_penalty_negative_maximum_is_divided_and_ties_take_the_lower_position():
    scores, patch, grid = grid_state([[-1.0, -2.0, 3.0, 3.0], [-3.0, -4.0, 1.0, 0.0]])
    out = local_penalty(scores, patch, grid, 2, 2.0).reshape(2, 4).tolist()
    assert out == [[-0.5, -2.0, 6.0, 3.0], [-3.0, -4.0, 1.0, 0.0]]


def test_local_penalty_skips_absent_tokens_and_empty_windows():
    scores, patch, grid = grid_state([[5.0, 1.0], [2.0, 3.0]])
    scores[0, 0] = float("-inf")  # discarded earlier / protected
    out = local_penalty(scores, patch, grid, 2, 2.0)
    assert out.tolist() == [[float("-inf"), 1.0, 2.0, 6.0]]
    # a 4x4 grid where only window (0,0) has tokens left: only one score changes
    scores = torch.full((1, 16), float("-inf"), dtype=torch.float64)
    scores[0, [0, 1]] = torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert local_penalty(scores, torch.arange(16)[None], (4, 4), 2, 4.0)[0, :2].tolist() == [2.0, 0.25]


@pytest.mark.parametrize("n,expected", [(2, 1), (100, 1), (500, 1), (501, 2), (1000, 2), (1001, 3)])
def test_quantile_rule_target_count_depends_on_row_length(n, expected):
    g = torch.Generator().manual_seed(n)
    matrix = torch.rand(1, 3, n, generator=g, dtype=torch.float64)
    shares = quantile_shares(matrix, torch.ones(1, n, dtype=torch.bool), 0.998)
    assert ((shares > 0).sum(-1) == expected).all()
    assert expected == n - math.ceil(0.998 * (n - 1))
    if expected == 1:  # exactly the row maximum, with share 1
        assert torch.equal(shares.argmax(-1), matrix.argmax(-1)) and torch.allclose(shares.sum(-1), torch.ones(1, 3, dtype=torch.float64))


def test_self_preserving_hand_example():
    hidden = torch.tensor([[[1.0, 0.0], [2.0, 2.0], [0.0, 1.0]]], dtype=torch.float64)
    state = TokenState(hidden=hidden, positions=torch.arange(3)[None], candidate=torch.ones(1, 3, dtype=torch.bool),
                       visual=torch.ones(1, 3, dtype=torch.bool))
    split = split_by_scores(torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), 1)
    shares = torch.tensor([[[0.25, 0.75]]], dtype=torch.float64)
    out = SelfPreserving().compress(state, split, Correlation(shares=shares))
    expected = torch.tensor([[[1.5 / 1.25, 0.5 / 1.25], [1.5 / 1.75, 2.5 / 1.75]]], dtype=torch.float64)
    assert torch.allclose(out.hidden, expected)
    uniform = SelfPreserving("uniform").compress(state, split, Correlation(shares=shares))
    assert torch.allclose(uniform.hidden, torch.tensor([[[1.5, 1.0], [1.0, 1.5]]], dtype=torch.float64))
    assert out.positions.tolist() == [[0, 2]]


def test_ficoco_v_filter_hand_example():
    # [CLS] + 4 patches on a 2x2 grid; attention rows chosen by hand
    a = torch.tensor([[0.2, 0.1, 0.3, 0.2, 0.2],
                      [0.1, 0.2, 0.3, 0.2, 0.2],
                      [0.1, 0.1, 0.4, 0.2, 0.2],
                      [0.1, 0.3, 0.2, 0.2, 0.2],
                      [0.1, 0.1, 0.2, 0.2, 0.4]], dtype=torch.float64)[None]
    positions = torch.arange(5)[None]
    state = TokenState(hidden=torch.zeros(1, 5, 2, dtype=torch.float64), positions=positions,
                       candidate=positions != 0, visual=torch.ones(1, 5, dtype=torch.bool),
                       patch=torch.tensor([[-1, 0, 1, 2, 3]]), grid=(2, 2), signals={"attention": a})
    f = FiCoCoV(lambda_=0.5, c=1.0)
    received = a[0, 1:, 1:].mean(0)  # [0.175, 0.275, 0.2, 0.25]
    expected = 0.5 * received - 0.5 * a[0, 0, 1:]
    assert torch.allclose(f.redundancy(state)[0, 1:], expected)
    # s = 0.5 * ([0.175, 0.275, 0.2, 0.25] - [0.1, 0.3, 0.2, 0.2]) = [0.0375, -0.0125, 0, 0.025]
    assert f.split(state, 2).discarded.tolist() == [[1, 4]]
    f2 = FiCoCoV(lambda_=0.5, c=2.0)  # the single 2x2 window: its maximum doubles, nothing else changes
    scores = f2.split(state, 1).scores[0, 1:]
    assert torch.allclose(scores, torch.tensor([0.075, -0.0125, 0.0, 0.025], dtype=torch.float64))


# ------------------------------------------------------------------ properties


def llm_like_state(b, n_text_before, n_visual, n_text_after, seed, dtype=torch.float64):
    n = n_text_before + n_visual + n_text_after
    g = torch.Generator().manual_seed(seed)
    visual = torch.zeros(b, n, dtype=torch.bool)
    visual[:, n_text_before:n_text_before + n_visual] = True
    logits = torch.randn(b, n, n, generator=g, dtype=torch.float64)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    attention = logits.masked_fill(~causal, float("-inf")).softmax(-1).to(dtype)
    side = int(math.isqrt(n_visual))
    patch = torch.full((b, n), -1)
    patch[:, n_text_before:n_text_before + n_visual] = torch.arange(n_visual)
    return TokenState(hidden=torch.randn(b, n, 6, generator=g, dtype=torch.float64).to(dtype),
                      positions=torch.arange(n).expand(b, n), candidate=visual, visual=visual, text=~visual,
                      patch=patch, grid=(side, n_visual // side) if side else (1, n_visual),
                      signals={"attention": attention}, site="llm")


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), nv=st.sampled_from([4, 9, 16]), before=st.integers(1, 4), after=st.integers(1, 5),
       seed=st.integers(0, 1000), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), data=st.data())
def test_ficoco_l_stages_never_touch_text(b, nv, before, after, seed, dtype, data):
    state = llm_like_state(b, before, nv, after, seed, dtype)
    r = data.draw(st.integers(0, nv))  # up to every visual token
    split = FiCoCoL().split(state, r)
    assert state.visual.gather(1, split.discarded).all()
    correlation = TextBridgedCorrelation().correlate(state, split)
    if 0 < r < nv:
        assert torch.allclose(correlation.shares.sum(-1).double(), torch.ones(b, r, dtype=torch.float64), atol=1e-2)
        assert (correlation.shares * (~split.targets[:, None, :]) == 0).all()
    out = SelfPreserving().compress(state, split, correlation)
    text_before = state.hidden[:, ~state.visual[0]]
    text_after = out.hidden[:, ~out.visual[0]]
    assert torch.equal(text_before, text_after)
    assert torch.equal(out.positions, split.preserved)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), side=st.integers(2, 6), seed=st.integers(0, 1000),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), data=st.data())
def test_ficoco_v_stages_on_random_tensors(b, side, seed, dtype, data):
    n = side * side + 1
    g = torch.Generator().manual_seed(seed)
    attention = torch.randn(b, n, n, generator=g, dtype=torch.float64).softmax(-1).to(dtype)
    positions = torch.arange(n).expand(b, n)
    state = TokenState(hidden=torch.randn(b, n, 4, generator=g, dtype=torch.float64).to(dtype), positions=positions,
                       candidate=positions != 0, visual=torch.ones(b, n, dtype=torch.bool),
                       patch=positions - 1, grid=(side, side), signals={"attention": attention})
    r = data.draw(st.integers(0, n - 1))  # up to every patch
    split = FiCoCoV().split(state, r)
    assert not (split.discarded == 0).any()
    correlation = AttentionCorrelation().correlate(state, split)
    out = SelfPreserving().compress(state, split, correlation)
    assert out.hidden.shape == (b, n - r, 4) and out.hidden.dtype == dtype
    assert torch.equal(out.hidden[:, 0], state.hidden[:, 0])  # [CLS] is never a target
    receives = correlation.shares.sum(1) > 0 if r else torch.zeros(b, n - r, dtype=torch.bool)
    assert torch.equal(out.hidden[~receives], state.hidden.gather(1, split.preserved[..., None].expand(-1, -1, 4))[~receives])


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 7), cols=st.integers(1, 7), window=st.integers(1, 4), c=st.floats(0.1, 5),
       seed=st.integers(0, 1000))
def test_local_penalty_changes_at_most_one_score_per_window(rows, cols, window, c, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, rows * cols, generator=g, dtype=torch.float64)
    scores[torch.rand(2, rows * cols, generator=g) < 0.3] = float("-inf")
    patch = torch.arange(rows * cols).expand(2, -1)
    out = local_penalty(scores, patch, (rows, cols), window, c)
    changed = out != scores
    cells = torch.arange(rows * cols)
    window_of = (cells // cols // window) * math.ceil(cols / window) + (cells % cols) // window
    for sample in range(2):
        counts = torch.bincount(window_of[changed[sample]], minlength=window_of.max() + 1)
        assert (counts <= 1).all()
    assert torch.equal(local_penalty(scores, patch, (rows, cols), window, 1.0), scores)


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 5), t=st.integers(1, 30), eps=st.floats(0, 1), seed=st.integers(0, 1000))
def test_quantile_shares_sum_to_one_and_include_the_maximum(r, t, eps, seed):
    matrix = torch.rand(2, r, t, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    shares = quantile_shares(matrix, torch.ones(2, t, dtype=torch.bool), eps)
    assert torch.allclose(shares.sum(-1), torch.ones(2, r, dtype=torch.float64))
    assert (shares.gather(-1, matrix.argmax(-1, keepdim=True)) > 0).all()


def test_all_shares_on_one_target_is_the_weighted_mean():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 5, 3, generator=g, dtype=torch.float64)
    state = TokenState(hidden=hidden, positions=torch.arange(5)[None], candidate=torch.ones(1, 5, dtype=torch.bool),
                       visual=torch.ones(1, 5, dtype=torch.bool))
    split = split_by_scores(torch.tensor([[0.0, 3.0, 0.0, 2.0, 0.0]], dtype=torch.float64), 2)
    shares = torch.zeros(1, 2, 3, dtype=torch.float64)
    shares[0, :, 1] = 1.0  # both discarded tokens (1, 3) go to preserved token 2
    out = SelfPreserving().compress(state, split, Correlation(shares=shares))
    assert torch.allclose(out.hidden[0, 1], (hidden[0, 2] + hidden[0, 1] + hidden[0, 3]) / 3)
    assert torch.equal(out.hidden[0, [0, 2]], hidden[0, [0, 4]])


# ------------------------------------------------------------------ generation and batches


@pytest.mark.parametrize("name,overrides", [("ficoco_l", ["k=1", "r=40"]),
                                            ("ficoco_vl", ["v.layers=[1]", "v.r=60", "l.k=2", "l.r=30"]),
                                            ("ficoco_v", ["layers=[0,1,2]", "r=50"])])
def test_generate_left_padded_batch_equals_alone(tiny_model, batch_inputs, processor, name, overrides):
    model = tiny_model(dtype=torch.float32)
    batch = batch_inputs(torch.float32)
    with torch.no_grad(), fico.apply(model, fico.load_recipe(name, overrides)) as run:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        alone_inputs = embedded.example_inputs(processor, prompts=["USER: <image> how many objects ? ASSISTANT:"],
                                               seeds=[2])
        alone = model.generate(**alone_inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                               return_dict_in_generate=True)
        cache = model(**batch, use_cache=True).cache
    n = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[1, n:], alone.sequences[0, alone_inputs["input_ids"].shape[1]:])
    assert (torch.stack(out.scores, 1)[1] - torch.stack(alone.scores, 1)[0]).abs().max() < 1e-5
    assert [layer.keys.shape[-2] for layer in cache.layers] == run.trace.llm


# ------------------------------------------------------------------ knob errors


@pytest.mark.parametrize("name,overrides,match", [
    ("ficoco_v", ["r=-1"], r"remove: must be a non-negative integer, got -1 \(from \$\{r\}\)"),
    ("ficoco_v", ["epsilon=1.5"], r"steps\[0\]\.correlate: epsilon must be in \[0, 1\], got 1\.5"),
    ("ficoco_v", ["epsilon=-0.1"], r"epsilon must be in \[0, 1\]"),
    ("ficoco_v", ["window=0"], r"steps\[0\]\.filter: window must be >= 1, got 0"),
    ("ficoco_v", ["c=0"], r"steps\[0\]\.filter: c must be > 0, got 0"),
    ("ficoco_v", ["c=-2"], r"c must be > 0"),
    ("ficoco_v", ["lambda=1.2"], r"lambda must be in \[0, 1\]"),
    ("ficoco_v", ["steps.0.filter.vision_aware=sent"], r"vision_aware must be one of received, given"),
    ("ficoco_l", ["r=-3"], r"remove: must be a non-negative integer"),
    ("ficoco_l", ["k=-1"], r"steps\[0\]\.layers: layer indices are 0-based and non-negative, got '-1:' \(from \$\{layers\}\)"),
    ("ficoco_l", ["layers=oops"], r"steps\[0\]\.layers: must be 'all', 'START:STOP'"),
    ("ficoco_l", ["beta=2"], r"beta must be in \[0, 1\]"),
    ("ficoco_l", ["gamma=-1"], r"gamma must be in \[0, 1\]"),
    ("ficoco_l", ["epsilon=2"], r"epsilon must be in \[0, 1\]"),
    ("ficoco_l", ["steps.0.correlate.k=-1"], r"k must be >= 0 or null"),
    ("ficoco_vl", ["v.window=0"], r"window must be >= 1"),
    ("ficoco_vl", ["l.r=-1"], r"steps\[1\]\.remove: must be a non-negative integer, got -1 \(from \$\{l\.r\}\)"),
    ("ficoco_vl", ["v.rr=3"], r"override 'v\.rr'"),
])
def test_bad_knobs(name, overrides, match):
    with pytest.raises(fico.RecipeError, match=match):
        fico.load_recipe(name, overrides)


@pytest.mark.parametrize("name,overrides,match", [
    ("ficoco_v", [], r"layer 11 is out of range: the vision site of this model has layers 0\.\.3"),
    ("ficoco_l", [], r"'4:' selects no layer of the llm site"),
    ("ficoco_l", ["k=1", "r=200"], r"removes 200 tokens \(from \$\{r\}\) at llm layer 3, where only 176 reducible tokens are left"),
    ("ficoco_v", ["layers=[0,1]", "r=300"], r"removes 300 tokens \(from \$\{r\}\) at vision layer 1, where only 276"),
])
def test_schedule_errors_against_the_model(tiny_model, name, overrides, match):
    model = tiny_model(dtype=torch.float32)
    with pytest.raises(fico.RecipeError, match=match):
        fico.apply(model, fico.load_recipe(name, overrides))
    assert getattr(model, "_fico_run", None) is None


# ------------------------------------------------------------------ documented ablations


def ablation_lines():
    text = DOCS.read_text()
    block = text[text.index("<!-- ablations:begin -->"):text.index("<!-- ablations:end -->")]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip().startswith("fico run")]


@pytest.fixture(scope="module")
def embedded_model():
    return embedded.build_model(), embedded.build_processor()


@pytest.mark.parametrize("line", ablation_lines())
def test_documented_ablation_runs(embedded_model, line):
    model, processor = embedded_model
    words = shlex.split(line)
    recipe = fico.load_recipe(words[2], words[3:])
    inputs = embedded.example_inputs(processor)
    with torch.no_grad(), fico.apply(model, recipe) as run:
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    assert run.trace.steps and all(s.removed > 0 for s in run.trace.steps)


def test_ablations_are_all_listed():
    lines = ablation_lines()
    assert len(lines) >= 20
    assert any("convergent" in line and "ficoco_l" in line for line in lines)
