"""LLaVA integration: identity at zero reduction, exact removal, generate with KV cache,
left-padded batches, dtypes, eager vs SDPA, local loading."""

import pytest
import torch

import fico
from fico import embedded
from reference import fastv_logits

RECIPES = {
    "tome": ["r=16"],
    "evit": ["layers=[0,2]"],
    "fastv": ["k=2"],
}


def combined_recipe(tmp_path, llm_k=2):
    """A recipe with a vision step and an llm step (both sites at once)."""
    path = tmp_path / "both.yaml"
    path.write_text(f"""
name: both
r: 16
k: {llm_k}
ratio: 0.5
steps:
  - site: vision
    layers: all
    remove: ${{r}}
    proportional_attention: true
    filter: bipartite_matching
    correlate: key_similarity
    compress: weighted_average
  - site: llm
    layers: ["${{k}}"]
    remove_ratio: ${{ratio}}
    filter: {{name: attention_rank, signal: last_query_attention}}
    correlate: none
    compress: drop
""")
    return fico.load_recipe(path)


def snapshot(model):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    classes = [type(m) for m in model.modules()]
    return hooks, classes, sorted(model.__dict__), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,overrides", [("tome", ["r=0"]), ("evit", ["keep_rate=1.0", "layers=[0,1]"]),
                                            ("fastv", ["ratio=0"])])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_zero_reduction_is_bitwise_identical(tiny_model, batch_inputs, name, overrides, attn):
    model = tiny_model(dtype=torch.float32, attn=attn)
    inputs = batch_inputs(torch.float32)
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with fico.apply(model, fico.load_recipe(name, overrides)):
            actual = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(actual, expected)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_remove_restores_the_vanilla_model(tiny_model, batch_inputs, name):
    model = tiny_model(dtype=torch.float32)
    inputs = batch_inputs(torch.float32)
    before = snapshot(model)
    with torch.no_grad():
        expected = model(**inputs).logits
        run = fico.apply(model, fico.load_recipe(name, RECIPES[name]))
        assert snapshot(model)[:3] != before[:3]
        reduced = model(**inputs).logits
        run.remove()
        after = model(**inputs).logits
    assert reduced.shape != expected.shape or not torch.equal(reduced, expected)
    assert torch.equal(after, expected)
    hooks, classes, attrs, state = snapshot(model)
    assert (hooks, classes, attrs) == before[:3]
    assert all(torch.equal(state[k], before[3][k]) for k in state)


def test_apply_twice_raises_and_keeps_the_first(tiny_model, single_inputs):
    model = tiny_model(dtype=torch.float32)
    with fico.apply(model, fico.load_recipe("fastv")) as run:
        with pytest.raises(fico.ApplyError, match="already"):
            fico.apply(model, fico.load_recipe("tome"))
        assert model._fico_run is run
    assert getattr(model, "_fico_run", None) is None


def test_failed_apply_leaves_model_untouched(tiny_model, monkeypatch):
    from fico.adapters.families import llava

    model = tiny_model(dtype=torch.float32)
    before = snapshot(model)

    def broken(self):
        raise RuntimeError("boom in the middle of attaching")

    monkeypatch.setattr(llava.LLMSite, "attach", broken)  # vision site is attached by then
    with pytest.raises(RuntimeError, match="boom"):
        fico.apply(model, fico.load_recipe("tome"))
    hooks, classes, attrs, _ = snapshot(model)
    assert (hooks, classes, attrs) == before[:3]


def _generate(model, inputs, steps=4, **kwargs):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("name", ["tome", "evit"])
def test_vision_side_generate_cache_equals_recompute(tiny_model, batch_inputs, name):
    model = tiny_model()
    inputs = batch_inputs()
    with torch.no_grad(), fico.apply(model, fico.load_recipe(name, RECIPES[name])):
        cached, cached_scores = _generate(model, inputs)
        recomputed, recomputed_scores = _generate(model, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert (cached_scores - recomputed_scores).abs().max() < 1e-8
    # the caller's prompt comes back unchanged, so slicing by its length gives the new tokens
    assert torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def _generate_positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def test_llm_side_generate_cache_equals_recompute_with_frozen_keep_set(tiny_model, batch_inputs):
    """Cached decode attends exactly to the kept tokens: it equals recomputing the whole
    sequence each step with the prefill's keep set (FastV's KV-cache semantics)."""
    model = tiny_model()
    inputs = batch_inputs()
    steps = 4
    with torch.no_grad():
        with fico.apply(model, fico.load_recipe("fastv", ["k=2"])) as run:
            sequences, scores = _generate(model, inputs, steps)
        prompt = inputs["input_ids"].shape[1]
        _, keep = fastv_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], 2, 0.5,
                               position_ids=_generate_positions(inputs["attention_mask"]))
        for step in range(steps):
            ids = sequences[:, : prompt + step]
            mask = torch.cat([inputs["attention_mask"], torch.ones(2, step, dtype=torch.long)], 1)
            logits, _ = fastv_logits(model, ids, mask, inputs["pixel_values"], 2, 0.5,
                                     position_ids=_generate_positions(mask), replay=(keep, prompt))
            assert (logits[:, -1] - scores[:, step]).abs().max() < 1e-6
            assert torch.equal(logits[:, -1].argmax(-1), sequences[:, prompt + step])
        with fico.apply(model, fico.load_recipe("fastv", ["k=2"])) as run:
            cache = model(**inputs, use_cache=True).cache
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert lengths == run.trace.llm
    assert lengths[0] == lengths[1] == prompt and lengths[2] == lengths[3] == prompt - 288


def test_both_sites_generate(tiny_model, batch_inputs, tmp_path):
    model = tiny_model()
    inputs = batch_inputs()
    recipe = combined_recipe(tmp_path)
    with torch.no_grad(), fico.apply(model, recipe) as run:
        cached, cached_scores = _generate(model, inputs, 3)
        assert run.trace.vision_features == 576 - 16 * 3 + 0 - 0  # layers 0..2 reduce before the feature layer
        llm = run.trace.llm
    assert llm[2] == llm[1] - round(0.5 * run.trace.vision_features)
    assert torch.isfinite(cached_scores).all()
    assert torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("name", sorted(RECIPES) + ["both"])
def test_batch_equals_each_sample_alone(tiny_model, batch_inputs, processor, name, tmp_path):
    model = tiny_model(dtype=torch.float32)
    recipe = combined_recipe(tmp_path) if name == "both" else fico.load_recipe(name, RECIPES[name])
    batch = batch_inputs(torch.float32)
    prompts = ["USER: <image> what is the color of the circle ? ASSISTANT:", "USER: <image> how many objects ? ASSISTANT:"]
    with torch.no_grad(), fico.apply(model, recipe):
        tokens, scores = _generate(model, batch, 3)
        for i, (prompt, seed) in enumerate(zip(prompts, [1, 2])):
            alone = embedded.example_inputs(processor, prompts=[prompt], seeds=[seed])
            alone_tokens, alone_scores = _generate(model, alone, 3)
            new = alone_tokens[0, alone["input_ids"].shape[1]:]
            assert torch.equal(tokens[i, batch["input_ids"].shape[1]:], new)
            assert (scores[i] - alone_scores[0]).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_dtypes_run_without_nan(tiny_model, batch_inputs, dtype, name):
    model = tiny_model(dtype=dtype)
    inputs = batch_inputs(dtype)
    with torch.no_grad(), fico.apply(model, fico.load_recipe(name, RECIPES[name])):
        logits = model(**inputs).logits
        _, scores = _generate(model, inputs, 2)
    assert torch.isfinite(logits).all()
    assert not torch.isnan(scores).any()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_eager_equals_sdpa_on_real_tokens(tiny_model, batch_inputs, name):
    # float32: transformers' eager mask turns left-padded float64 rows into NaN even without fico
    inputs = batch_inputs(torch.float32)
    results = {}
    for attn in ("sdpa", "eager"):
        model = tiny_model(dtype=torch.float32, attn=attn)
        with torch.no_grad(), fico.apply(model, fico.load_recipe(name, RECIPES[name])) as run:
            results[attn] = model(**inputs).logits
            trace = run.trace
    # Fully masked (left-pad) query rows differ between implementations; compare real rows.
    real = torch.ones(results["sdpa"].shape[:2], dtype=torch.bool)
    for i, pads in enumerate((inputs["attention_mask"] == 0).sum(1)):
        real[i, :pads] = False
    assert (results["sdpa"] - results["eager"])[real].abs().max() < 1e-5
    assert trace.steps


def test_last_query_signal_matches_eager_attentions(tiny_model, batch_inputs):
    """The row fico recomputes under SDPA equals eager's output_attentions row."""
    from fico.adapters import decoder

    model = tiny_model(dtype=torch.float32, attn="eager")
    inputs = batch_inputs(torch.float32)
    seen = {}
    original = decoder.attention_signals

    def spy(names, source, last_row, text_queries):
        out = original(names, source, last_row, text_queries)
        seen.update(out)
        return out

    decoder.attention_signals = spy
    try:
        with torch.no_grad():
            eager = model(**inputs, output_attentions=True).attentions[1]  # layer k-1 = 1
            with fico.apply(model, fico.load_recipe("fastv", ["k=2"])):
                model(**inputs)
    finally:
        decoder.attention_signals = original
    expected = eager[:, :, -1].mean(1)
    assert (seen["last_query_attention"] - expected).abs().max() < 1e-7


def test_local_save_and_load(tiny_model, processor, single_inputs, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    # batched prompts read the last position's logits: the saved tokenizer must still pad on the left
    assert loaded_processor.tokenizer.padding_side == "left"
    inputs = embedded.example_inputs(loaded_processor)
    with torch.no_grad():
        with fico.apply(model, fico.load_recipe("tome")):
            expected = model(**inputs).logits
        with fico.apply(loaded, fico.load_recipe("tome")):
            actual = loaded(**inputs).logits
    assert torch.equal(actual, expected)


def test_llm_side_fused_tokens(tiny_model, batch_inputs, processor, tmp_path):
    """A compressor may append tokens on the llm site (EViT-style fusion, two steps): counts,
    padded batch vs alone, and cached generation."""
    path = tmp_path / "fuse_llm.yaml"
    path.write_text("""
steps:
  - site: llm
    layers: [1, 2]
    remove: 100
    filter: {name: attention_rank, signal: last_query_attention}
    correlate: {name: convergent, signal: text_attention}
    compress: fuse
""")
    recipe = fico.load_recipe(path)
    model = tiny_model(dtype=torch.float32)
    batch = batch_inputs(torch.float32)
    n = batch["input_ids"].shape[1]
    with torch.no_grad(), fico.apply(model, recipe) as run:
        tokens, scores = _generate(model, batch, 3)
        assert run.trace.llm == [n, n - 99, n - 198, n - 198]
        alone = embedded.example_inputs(processor, prompts=["USER: <image> how many objects ? ASSISTANT:"], seeds=[2])
        alone_tokens, alone_scores = _generate(model, alone, 3)
    assert torch.equal(tokens[1, n:], alone_tokens[0, alone["input_ids"].shape[1]:])
    assert (scores[1] - alone_scores[0]).abs().max() < 1e-5


def test_text_signal_matches_eager_attentions(tiny_model, batch_inputs, tmp_path):
    """Text-to-visual attention, formed from the text query rows only (and the last row,
    asked for together), equals the mean of eager's output_attentions rows over each
    sample's text tokens."""
    from fico.adapters import decoder

    path = tmp_path / "text_rows.yaml"
    path.write_text("""
steps:
  - site: llm
    layers: [2]
    remove: 100
    filter: {name: attention_rank, signal: last_query_attention}
    correlate: {name: convergent, signal: text_attention}
    compress: fuse
""")

    model = tiny_model(dtype=torch.float32, attn="eager")
    inputs = batch_inputs(torch.float32)
    calls = []
    original = decoder.attention_signals

    def spy(names, source, last_row, text_queries):
        out = original(names, source, last_row, text_queries)
        calls.append((source.attn, out))
        return out

    decoder.attention_signals = spy
    try:
        with torch.no_grad():
            eager = model(**inputs, output_attentions=True).attentions
            with fico.apply(model, fico.load_recipe(path)):
                model(**inputs)
    finally:
        decoder.attention_signals = original
    attn, first = calls[0]
    layer = [decoder.self_attn for decoder in model.model.language_model.layers].index(attn)
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    image = ids == model.config.image_token_id
    after_image = image.int().cumsum(1) > 0
    text = real & ~image & after_image
    rows = eager[layer].mean(1)  # (B, L, L)
    expected = (text[:, :, None] * rows).sum(1) / text.sum(1, keepdim=True)
    assert text.sum(1).min() > 0 and (text.sum(1)[0] != text.sum(1)[1])  # padded batch, unequal text lengths
    assert set(first) == {"text_attention", "last_query_attention"}
    assert (first["text_attention"] - expected).abs().max() < 1e-7
    assert (first["last_query_attention"] - rows[:, -1]).abs().max() < 1e-7
