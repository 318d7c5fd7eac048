"""Ragged batches: samples with different numbers of visual tokens (here one image and two)
run in one left-padded batch, and each sample equals that sample alone, in prefill and in
cached decode, at every site. The decoder sites pad the shorter samples with ghost slots
(``fico.adapters.ghosts``)."""

import pytest
import torch

import fico
from fico import embedded
from test_wave2 import ALL_METHODS

PROMPTS = ["USER: <image> what is the color of the circle ? ASSISTANT:",
           "USER: <image>\n<image> how many objects ? ASSISTANT:"]
IMAGES = [[1], [2, 3]]

CASES = {**ALL_METHODS, "fastv": ["k=2"], "tome": ["r=16"], "evit": ["layers=[0,2]"],
         "ficoco_l": ["k=1", "r=40"], "ficoco_vl": ["v.layers=[1]", "v.r=60", "l.k=2", "l.r=30"],
         "fastv_fixed": []}
# one count for every sample, whatever its candidates: the samples still differ in what they keep
FASTV_FIXED = """
name: fastv_fixed
steps:
  - site: llm
    layers: [2]
    remove: 100
    filter: {name: attention_rank, signal: last_query_attention}
    correlate: none
    compress: drop
"""


def _inputs(processor, samples, prompts=PROMPTS, dtype=torch.float64):
    images = [embedded.example_image(seed) for s in samples for seed in IMAGES[s]]
    out = processor(images=images, text=[prompts[s] for s in samples], return_tensors="pt", padding=True)
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def _trailing_text(inputs) -> int:
    """How many tokens follow the last image placeholder (the rows compared: a ghost slot may
    sit among the visual rows before them)."""
    ids = inputs["input_ids"][0]
    return len(ids) - 1 - int((ids == embedded.WORDS.index(embedded.IMAGE_TOKEN)).nonzero().max())


def _generate(model, inputs, steps=3):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, 1)


def _recipe(name, folder=None):
    if name == "fastv_fixed":
        path = folder / "fastv_fixed.yaml"
        path.write_text(FASTV_FIXED)
        return fico.load_recipe(path)
    base = name.replace("_v2", "").replace("_llm", "").replace("_fixed", "")
    return fico.load_recipe(base, CASES[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_sample_of_a_ragged_batch_equals_it_alone(tiny_model, processor, name, tmp_path):
    model = tiny_model()
    batch = _inputs(processor, [0, 1])
    with torch.no_grad(), fico.apply(model, _recipe(name, tmp_path)) as run:
        logits = model(**batch).logits
        tokens, scores = _generate(model, batch)
        for i in range(2):
            alone = _inputs(processor, [i])
            alone_logits = model(**alone).logits
            # the prompts' final tokens line up at the right (left padding). A plain forward
            # numbers the padding too (Hugging Face's default, where generate numbers from the
            # mask); DART's pivot score, the L1 norm of post-RoPE keys, reads absolute
            # positions, so only its generate (prefill included) is compared
            if name != "dart":
                text = _trailing_text(alone)
                assert (logits[i, -text:] - alone_logits[0, -text:]).abs().max() < 1e-6, i
            alone_tokens, alone_scores = _generate(model, alone)
            assert torch.equal(tokens[i, batch["input_ids"].shape[1]:], alone_tokens[0, alone["input_ids"].shape[1]:])
            assert (scores[i] - alone_scores[0]).abs().max() < 1e-6
    assert run.trace.llm[0] == batch["input_ids"].shape[1] or run.trace.vision_features is not None


def test_ghost_slots_are_what_pads_the_shorter_sample(tiny_model, processor):
    """FastV at k=2 removes half of each sample's visual tokens: 288 of one image's 576, 576 of
    two images' 1152; the one-image sample keeps 288 ghost slots so that the batch stays
    rectangular, and its trace says what the first sample holds."""
    model = tiny_model()
    batch = _inputs(processor, [0, 1])
    with torch.no_grad(), fico.apply(model, fico.load_recipe("fastv", ["k=2"])) as run:
        model(**batch)
    length = batch["input_ids"].shape[1]
    assert run.trace.llm == [length, length, length - 288, length - 288]
    assert run.trace.visual == [576, 576, 288, 288]
    assert run.trace.steps[0].removed == 288


def test_unpadded_ragged_batch_materialises_the_causal_mask(tiny_model, processor, tmp_path):
    """Two samples of one length (the one-image prompt is longer in words) need no padding, so
    the model passes no mask; ghost slots still need one, in prefill and in each decode step."""
    model = tiny_model()
    prompts = _equal_length_prompts(processor)
    batch = _inputs(processor, [0, 1], prompts)
    assert bool(batch["attention_mask"].all())
    for name in ("fastv_fixed", "pdrop"):
        with torch.no_grad(), fico.apply(model, _recipe(name, tmp_path)):
            tokens, scores = _generate(model, batch)
            no_mask = model(**{k: v for k, v in batch.items() if k != "attention_mask"}).logits
            for i in range(2):
                alone = _inputs(processor, [i], prompts)
                alone_tokens, alone_scores = _generate(model, alone)
                assert torch.equal(tokens[i, batch["input_ids"].shape[1]:],
                                   alone_tokens[0, alone["input_ids"].shape[1]:]), name
                assert (scores[i] - alone_scores[0]).abs().max() < 1e-6, name
                text = _trailing_text(alone)
                assert (no_mask[i, -text:] - model(**alone).logits[0, -text:]).abs().max() < 1e-6, name


def _equal_length_prompts(processor) -> list[str]:
    """The two prompts, the one-image prompt lengthened in words to the two-image one's length."""
    def length(sample, prompt):
        images = [embedded.example_image(1)] * len(IMAGES[sample])
        return len(processor(images=images, text=[prompt], return_tensors="pt")["input_ids"][0])

    words = length(1, PROMPTS[1]) - length(0, PROMPTS[0])
    return [PROMPTS[0].replace("circle", "circle" + " circle" * words), PROMPTS[1]]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ragged_batches_stay_finite_in_half_precision(tiny_model, processor, attn, dtype):
    model = tiny_model(dtype=dtype, attn=attn)
    batch = _inputs(processor, [0, 1], dtype=dtype)
    for name in ("fastv", "pdrop", "ficoco_l"):
        with torch.no_grad(), fico.apply(model, _recipe(name)):
            logits = model(**batch).logits
            _, scores = _generate(model, batch, 2)
        assert torch.isfinite(logits).all(), name
        assert not torch.isnan(scores).any(), name


def test_eager_attention_equals_sdpa_on_a_ragged_batch(tiny_model, processor):
    """The eager layers take an additive float mask: ghost columns are masked there too. (An
    unpadded batch: transformers' eager attention itself gives NaN rows on left padding.)"""
    batch = _inputs(processor, [0, 1], _equal_length_prompts(processor))
    out = []
    for attn in ("eager", "sdpa"):
        model = tiny_model(attn=attn)
        with torch.no_grad(), fico.apply(model, _recipe("pdrop")):
            out.append(_generate(model, batch))
    assert torch.equal(out[0][0], out[1][0])
    assert (out[0][1] - out[1][1]).abs().max() < 1e-6


ADAPTIVE_THEN_DECODER = """
name: prumerge_then_fastv
base: prumerge
steps:
  - site: vision_output
    keep: adaptive
    order: method
    filter: {name: iqr_outliers, signal: next_cls_attention_fullwidth}
    correlate: {name: key_neighbours, neighbors: 32}
    compress: target_plus_sum
  - site: llm
    layers: [2]
    KEEP
    filter: {name: attention_rank, signal: last_query_attention}
    correlate: none
    compress: drop
"""


@pytest.mark.parametrize("schedule", ["keep_ratio: 0.5", "keep: 3", "keep: 500"])
def test_decoder_steps_follow_an_adaptive_count_sample_by_sample(tiny_model, processor, tmp_path, schedule):
    """PruMerge chooses each image's count; a decoder step after it acts on each sample's own
    count (a keep above it keeps every token), and each sample equals that sample alone."""
    path = tmp_path / "adaptive.yaml"
    path.write_text(ADAPTIVE_THEN_DECODER.replace("KEEP", schedule).replace("base: prumerge\n", ""))
    recipe = fico.load_recipe(path)
    model = tiny_model()
    batch = _inputs(processor, [0, 1])
    with torch.no_grad(), fico.apply(model, recipe) as run:
        logits = model(**batch).logits
        counts = run.trace.vision_features
        tokens, _ = _generate(model, batch)
        for i in range(2):
            alone = _inputs(processor, [i])
            text = _trailing_text(alone)
            assert (logits[i, -text:] - model(**alone).logits[0, -text:]).abs().max() < 1e-6, i
            alone_tokens, _ = _generate(model, alone)
            assert torch.equal(tokens[i, batch["input_ids"].shape[1]:], alone_tokens[0, alone["input_ids"].shape[1]:])
    assert isinstance(counts, list) and len(set(counts)) > 1, "the images keep different counts"
    if schedule == "keep: 500":  # above every count: the decoder step removes nothing
        with torch.no_grad(), fico.apply(model, fico.load_recipe("prumerge")):
            assert torch.equal(model(**batch).logits, logits)


def test_a_decoder_schedule_that_cannot_run_on_the_bound_is_refused(tiny_model, tmp_path):
    path = tmp_path / "adaptive.yaml"
    path.write_text(ADAPTIVE_THEN_DECODER.replace("KEEP", "keep: 600").replace("base: prumerge\n", ""))
    with pytest.raises(fico.RecipeError, match="keep: keeps 600 tokens"):
        fico.apply(tiny_model(), fico.load_recipe(path))
