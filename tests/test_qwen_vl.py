"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: native-resolution images (a different number of visual
tokens per image), 3-row M-RoPE positions, no [CLS], Qwen3-VL's DeepStack. Tiny models built
from the config classes the way transformers' own tests build them, with a batch of two image
sizes, left-padded."""

import functools
import re

import pytest
import torch

import fico
from fico import embedded_qwen

FAMILIES = embedded_qwen.FAMILIES
#: (height, width): 24 and 16 merged tokens (14 px patches); 24 and 16 at Qwen3-VL's 16 px
SIZES = {"qwen2-vl": [(112, 168), (112, 112)], "qwen2.5-vl": [(112, 168), (112, 112)],
         "qwen3-vl": [(128, 192), (128, 128)]}
PROMPTS = [embedded_qwen.prompt("what is the color of the circle ?"), embedded_qwen.prompt("how many objects ?")]
IMAGE = embedded_qwen.token_id("<|image_pad|>")

#: recipes at counts that fit 16-24 visual tokens and 4 decoder layers
LLM_CASES = {"fastv": ["k=2"], "pdrop": [], "ficoco_l": ["k=2", "r=6"], "dart": ["k=2", "keep=8"],
             "sparsevlm": ["layers=[0,1]", "steps.0.keep=[14,10]"], "fitprune": ["steps.0.remove=[0,0,6,4]"],
             "random_llm": ["site=llm", "layers=[2]", "keep=8"],
             "random_renumber": ["site=llm", "layers=[1]", "keep=8", "steps.0.positions=renumber"]}
PRE_LLM_CASES = {"random": ["keep=8"], "divprune": ["keep=8"], "pool": []}
CASES = {**LLM_CASES, **PRE_LLM_CASES}


@functools.cache
def _model(family, dtype=torch.float64, attn="sdpa", llm_layers=4):
    return embedded_qwen.build_model(family, seed=0, dtype=dtype, attn_implementation=attn, llm_layers=llm_layers)


def model_of(family, **kwargs):
    model = _model(family, **kwargs)
    assert getattr(model, "_fico_run", None) is None, "a previous test left a recipe applied"
    return model


def inputs(family, samples=(0, 1), dtype=torch.float64):
    out = embedded_qwen.example_inputs(family, sizes=[SIZES[family][i] for i in samples],
                                       prompts=[PROMPTS[i] for i in samples], seeds=[i + 1 for i in samples])
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def recipe(name):
    return fico.load_recipe(name.split("_")[0] if name.startswith("random") else name, CASES[name])


def _generate(model, batch, steps=3, **kwargs):
    out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, 1)


def test_the_embedded_inputs_are_what_the_processor_writes():
    """One placeholder per 2 x 2 patches, the run wrapped in vision start/end, type ids 1 on it."""
    batch = inputs("qwen2-vl")
    assert batch["image_grid_thw"].tolist() == [[1, 8, 12], [1, 8, 8]]
    assert (batch["input_ids"] == IMAGE).sum(1).tolist() == [24, 16]
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == IMAGE)
    assert batch["attention_mask"][1, 0] == 0  # the shorter prompt is left-padded


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,overrides", [("fastv", ["k=2", "ratio=0"]), ("random", ["keep=1280"]),
                                            ("random", ["site=llm", "layers=[1]", "keep=1280"])])
def test_zero_reduction_is_bitwise_identical(family, name, overrides):
    model = model_of(family)
    batch = inputs(family)
    with torch.no_grad():
        vanilla = model(**batch).logits
        vanilla_tokens, vanilla_scores = _generate(model, batch)
        with fico.apply(model, fico.load_recipe(name, overrides)):
            assert torch.equal(model(**batch).logits, vanilla)
            tokens, scores = _generate(model, batch)
    assert torch.equal(tokens, vanilla_tokens) and torch.equal(scores, vanilla_scores)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["fastv", "random"])
def test_remove_restores_the_vanilla_model(family, name):
    model = model_of(family)
    batch = inputs(family)
    with torch.no_grad():
        vanilla = model(**batch).logits
        run = fico.apply(model, recipe(name))
        assert not torch.equal(model(**batch).logits, vanilla)
        run.remove()
        assert torch.equal(model(**batch).logits, vanilla)
        assert model.forward.__func__ is type(model).forward and model.generate.__func__ is type(model).generate


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_each_sample_of_a_batch_of_two_image_sizes_equals_it_alone(family, name):
    """Prefill logits and greedy generate, at the decoder sites (ghost slots where the samples
    keep different numbers of tokens) and at pre_llm (each image's own count and positions)."""
    model = model_of(family)
    batch = inputs(family)
    with torch.no_grad(), fico.apply(model, recipe(name)) as run:
        logits = model(**batch).logits
        reduced = run.trace.llm[-1]
        tokens, scores = _generate(model, batch)
        for i in range(2):
            alone = inputs(family, [i])
            text = 8  # the prompt's tokens after the image
            assert (logits[i, -text:] - model(**alone).logits[0, -text:]).abs().max() < 1e-9, i
            alone_tokens, alone_scores = _generate(model, alone)
            assert torch.equal(tokens[i, batch["input_ids"].shape[1]:], alone_tokens[0, alone["input_ids"].shape[1]:])
            assert (scores[i] - alone_scores[0]).abs().max() < 1e-9
    assert reduced < batch["input_ids"].shape[1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["random", "pool", "random_llm", "random_renumber"])
def test_cached_generate_equals_a_recompute_without_cache(family, name):
    """The kept set of these recipes does not depend on the text, so generating without a
    cache (every step recomputes the whole sequence with the same drop) is the reference for
    the cached decode: M-RoPE positions continue the original numbering in both."""
    model = model_of(family)
    batch = inputs(family)
    with torch.no_grad(), fico.apply(model, recipe(name)):
        cached, cached_scores = _generate(model, batch)
        recomputed, recomputed_scores = _generate(model, batch, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert (cached_scores - recomputed_scores).abs().max() < 1e-9


@pytest.mark.parametrize("family", FAMILIES)
def test_a_decode_loop_that_leaves_positions_to_the_model_continues_after_a_pre_llm_step(family):
    """After a pre_llm step the model's ``rope_deltas`` account for the removed tokens, so a
    plain forward with the cache and no position_ids decodes what generate decodes."""
    model = model_of(family)
    one = inputs(family, [0])
    one.pop("attention_mask")  # stock Qwen decode with a 2-D mask fails (a transformers quirk)
    with torch.no_grad(), fico.apply(model, recipe("random")):
        tokens, scores = _generate(model, one, steps=2)
        out = model(**one, use_cache=True)
        first = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=first, cache=out.cache, use_cache=True)
    assert torch.equal(first[:, 0], tokens[:, one["input_ids"].shape[1]])
    assert (step.logits[0, -1].float() - scores[0, 1]).abs().max() < 1e-6  # generate's scores are float32


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_keeps_what_eager_attention_ranks_highest(family):
    """FastV at k = 2: the visual tokens it keeps are those the last query of decoder layer 1
    attends to most, head-mean, read from the eager model's ``output_attentions``."""
    batch = inputs(family)
    eager = embedded_qwen.build_model(family, seed=0, dtype=torch.float64, attn_implementation="eager")
    with torch.no_grad():
        model = model_of(family)
        with fico.apply(model, fico.load_recipe("fastv", ["k=2"]), provenance=True) as run:
            model(**batch)
        [record] = run.trace.steps
        for b in range(2):
            # each sample alone: eager attention of a left-padded row is NaN beyond layer 0
            alone = inputs(family, [b])
            attention = eager(**alone, output_attentions=True).attentions[1].mean(1)[0, -1]
            visual = (alone["input_ids"][0] == IMAGE).nonzero()[:, 0]
            padding = batch["input_ids"].shape[1] - alone["input_ids"].shape[1]
            discarded = sorted(i - padding for i in record.discarded[b])
            lowest = visual[attention[visual].argsort()[:len(discarded)]]
            assert discarded == sorted(lowest.tolist()) and len(discarded) == len(visual) // 2


@pytest.mark.parametrize("k", [1, 2])
def test_a_qwen3_vl_decoder_step_before_the_last_deepstack_injection_equals_a_reference(k):
    """Drop at the input of decoder layer k <= 2: the reference runs the decoder layer by layer,
    removes the tokens at layer k and, for every later DeepStack level, the rows of the removed
    visual tokens."""
    model = model_of("qwen3-vl")
    one = inputs("qwen3-vl", [0])
    one.pop("attention_mask")
    with torch.no_grad():
        with fico.apply(model, fico.load_recipe("random", ["site=llm", f"layers=[{k}]", "keep=6"]),
                        provenance=True) as run:
            reduced = model(**one).logits[0, -1]
        discarded = set(run.trace.steps[0].discarded[0])
        inner, lm = model.model, model.model.language_model
        features = inner.get_image_features(one["pixel_values"], one["image_grid_thw"], return_dict=True)
        ids = one["input_ids"]
        visual = ids == IMAGE
        hidden = lm.embed_tokens(ids).masked_scatter(visual[..., None], torch.cat(features.pooler_output))
        levels = [torch.cat(level) for level in features.deepstack_features]
        positions, _ = inner.get_rope_index(ids, mm_token_type_ids=one["mm_token_type_ids"],
                                            image_grid_thw=one["image_grid_thw"])
        cos, sin = lm.rotary_emb(hidden, positions)
        for i, layer in enumerate(lm.layers):
            if i == k:
                keep = torch.tensor([j for j in range(ids.shape[1]) if j not in discarded])
                kept_visual = visual[0, keep]
                levels = [level[visual[0].cumsum(0)[keep][kept_visual] - 1] for level in levels]
                hidden, cos, sin, visual = hidden[:, keep], cos[:, keep], sin[:, keep], visual[:, keep]
            hidden = layer(hidden, attention_mask=None, position_embeddings=(cos, sin))
            if i < len(levels):
                hidden = hidden.clone()
                hidden[visual] = hidden[visual] + levels[i]
        reference = model.lm_head(lm.norm(hidden))[0, -1]
    assert len(discarded) == 18
    assert (reduced - reference).abs().max() < 1e-9


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pre_llm_step_moves_each_deepstack_level_with_its_tokens_or_equals_a_layer_zero_drop(family):
    """A pre_llm drop enters the decoder as the same drop at decoder layer 0 would (Qwen3-VL:
    the DeepStack rows of the kept tokens): the reference feeds the model the kept features
    and the kept tokens' positions of the unreduced prompt."""
    model = model_of(family)
    one = inputs(family, [0])
    with torch.no_grad():
        with fico.apply(model, recipe("random"), provenance=True) as run:
            reduced = model(**one).logits[0, -1]
        kept = run.trace.steps[0].positions_out[0]
        inner = model.model
        features = inner.get_image_features(one["pixel_values"], one["image_grid_thw"], return_dict=True)
        ids = one["input_ids"][0]
        placeholders = (ids == IMAGE).nonzero()[:, 0]
        drop = set(placeholders[[i for i in range(len(placeholders)) if i not in kept.tolist()]].tolist())
        keep = torch.tensor([j for j in range(len(ids)) if j not in drop])
        positions, _ = inner.get_rope_index(one["input_ids"], mm_token_type_ids=one["mm_token_type_ids"],
                                            image_grid_thw=one["image_grid_thw"])
        position_ids = torch.cat([torch.arange(len(keep))[None, None], positions[:, :, keep]])
        output = type(features)(pooler_output=[features.pooler_output[0][kept]])
        if family == "qwen3-vl":
            output.deepstack_features = [[level[0][kept]] for level in features.deepstack_features]
        reference = model(input_ids=one["input_ids"][:, keep], position_ids=position_ids,
                          mm_encoder_outputs={"image": output}).logits[0, -1]
    assert len(kept) == 8
    assert (reduced - reference).abs().max() < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_finite(family, dtype):
    model = model_of(family, dtype=dtype)
    batch = inputs(family, dtype=dtype)
    for name in ("fastv", "divprune", "ficoco_l"):
        with torch.no_grad(), fico.apply(model, recipe(name)):
            assert torch.isfinite(model(**batch).logits).all(), name


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_side_steps_are_refused_with_the_reason(family):
    model = model_of(family)
    name = {"qwen2-vl": "Qwen2-VL", "qwen2.5-vl": "Qwen2.5-VL", "qwen3-vl": "Qwen3-VL"}[family]
    with pytest.raises(fico.RecipeError, match=rf"{name} has no vision site.*2 x 2 group.*pre_llm") as error:
        fico.apply(model, fico.load_recipe("tome"))
    with pytest.raises(fico.RecipeError, match=r"no vision_output site.*\[CLS\] token for the signal\(s\) "
                                               r"cls_attention"):
        fico.apply(model, fico.load_recipe("fastervlm"))
    assert "steps[0].site" in str(error.value)
    assert getattr(model, "_fico_run", None) is None


def test_pre_llm_inputs_are_checked():
    model = model_of("qwen2-vl")
    batch = inputs("qwen2-vl")
    with torch.no_grad(), fico.apply(model, recipe("random")):
        with pytest.raises(fico.InputError, match="mm_token_type_ids"):
            model(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"})
        with pytest.raises(fico.InputError, match="position_ids"):
            model(**batch, position_ids=torch.zeros(4, 2, batch["input_ids"].shape[1], dtype=torch.long))
        with pytest.raises(fico.InputError, match=r"videos \(pixel_values_videos\) are not supported yet"):
            model(**batch, pixel_values_videos=torch.zeros(4, 1176, dtype=torch.float64))
        cut = dict(batch, input_ids=batch["input_ids"].masked_fill(
            torch.arange(batch["input_ids"].shape[1]) == int((batch["input_ids"][0] == IMAGE).nonzero()[0]), 0))
        with pytest.raises(fico.InputError, match="placeholders"):
            model(**cut)


def test_every_bundled_recipe_runs_on_a_qwen_model_of_real_depth_or_names_what_it_lacks():
    """All bundled recipes and budget variants on a Qwen2.5-VL of Qwen2.5-VL-7B's depth (28
    decoder layers) with a batch of two image sizes: those that run keep the logits finite; the
    others are refused with a RecipeError that names the family and the site or signal it lacks,
    or the count a schedule written for LLaVA-1.5 cannot give."""
    model = model_of("qwen2.5-vl", dtype=torch.float32, llm_layers=28)
    batch = embedded_qwen.example_inputs("qwen2.5-vl", sizes=[(336, 448), (224, 224)], prompts=PROMPTS,
                                         seeds=[1, 2])
    refused = {}
    for name in fico.bundled_recipes():
        try:
            with torch.no_grad(), fico.apply(model, fico.load_recipe(name)) as run:
                logits = model(**batch).logits
        except fico.RecipeError as error:
            refused[name] = str(error)
            continue
        assert torch.isfinite(logits).all(), name
        assert run.trace.steps, name
    by_site = {name for name in fico.bundled_recipes()
               if any(s.site in ("vision", "vision_output") for s in fico.load_recipe(name).steps)}
    for name in by_site:
        assert re.search(r"Qwen2\.5-VL has no vision(_output)? site", refused.pop(name)), name
    for name in [n for n in refused if "cdpruner" in n]:
        assert re.search(r"cannot give the signal\(s\) instruction_similarity on Qwen2\.5-VL", refused.pop(name))
    # schedules written as counts for LLaVA-1.5's 576 tokens or 32 decoder layers say so
    for name, message in refused.items():
        assert name.split("/")[-1].split("_")[0] in ("ficoco", "fitprune"), name
        assert re.search(r"only \d+ visual tokens are left|written for 32 layers|no count list for a step at 28 layers", message), name


def _received_reference(model, family, one, block):
    """The attention each merged token receives in ``block``, from transformers' eager attention
    of the block's own input on one image, put in the merger's output order."""
    modeling = fico.adapters.family_of(model).modeling_module()
    tower = model.model.visual
    attention = tower.blocks[block].attn
    seen = {}
    handle = attention.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(hidden=args[0], rotary=kwargs["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        tower(one["pixel_values"], grid_thw=one["image_grid_thw"])
        handle.remove()
        n = seen["hidden"].shape[0]
        q, k, v = attention.qkv(seen["hidden"]).reshape(n, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = modeling.apply_rotary_pos_emb_vision(q, k, *seen["rotary"])
        _, weights = modeling.eager_attention_forward(attention, *(t.transpose(0, 1)[None] for t in (q, k, v)),
                                                      attention_mask=None, scaling=attention.scaling)
    merged = weights[0].mean(dim=(0, 1)).reshape(-1, 4).mean(1)  # heads, queries; then each 2 x 2 group
    if family == "qwen2.5-vl":  # the tower's blocks run in window order; its merger output does not
        window = modeling.get_vision_window_index(one["image_grid_thw"], spatial_merge_size=2,
                                                  window_size=tower.window_size, patch_size=14)[0]
        merged = merged[torch.argsort(window)]
    return merged


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_received_is_what_eager_attention_gives(family):
    """FasterVLM's [CLS]-free form (site=pre_llm signal=attention_received) on a batch of two
    image sizes keeps, per image, the merged tokens that receive the most attention in the last
    full-attention block, as transformers' eager attention of that image alone gives it."""
    model = model_of(family)
    batch = inputs(family)
    block = 3  # the last full-attention block of each tiny tower (depth 4; Qwen2.5-VL: 1 and 3)
    with torch.no_grad(), fico.apply(model, fico.load_recipe(
            "fastervlm", ["site=pre_llm", "signal=attention_received", "keep=8"]), provenance=True) as run:
        model(**batch)
    for image, record in enumerate(run.trace.steps):
        received = _received_reference(model, family, inputs(family, [image]), block)
        assert sorted(record.positions_out[0].tolist()) == sorted(received.topk(8).indices.tolist())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,overrides", [("visionzip", ["dominant=6", "contextual=2"]), ("fastervlm", ["keep=8"]),
                                            ("vispruner", ["keep=8"])])
def test_the_cls_free_forms_run_per_image_as_alone(family, name, overrides):
    model = model_of(family)
    batch = inputs(family)
    recipe = fico.load_recipe(name, ["site=pre_llm", "signal=attention_received", *overrides])
    with torch.no_grad(), fico.apply(model, recipe) as run:
        logits = model(**batch).logits
        alone = [model(**inputs(family, [i])).logits[0, -1] for i in range(2)]
    assert run.trace.vision_features == 8
    assert max((logits[i, -1] - alone[i]).abs().max() for i in range(2)) < 1e-9


def test_a_window_block_is_refused_as_the_signal_block():
    with pytest.raises(fico.RecipeError, match=r"vision_layer: 0 is not a vision block of Qwen2.5-VL whose "
                                               r"attention spans the whole image; those are 1, 3 \(of 4\)"):
        fico.apply(model_of("qwen2.5-vl"), fico.load_recipe(
            "fastervlm", ["site=pre_llm", "signal=attention_received", "steps.0.vision_layer=0"]))


@pytest.mark.parametrize("size", [(100, 150), (336, 448), (1080, 1920), (2304, 2304), (30, 3000), (5000, 40)])
@pytest.mark.parametrize("factor,low,high", [(28, 3136, 12845056), (32, 65536, 16777216), (28, 4096, 1003520)])
def test_the_cost_model_resizes_as_the_qwen_image_processor(size, factor, low, high):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as stock

    from fico.cost.native import smart_resize

    assert smart_resize(*size, factor, low, high) == stock(*size, factor, low, high)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,overrides", [(None, []), ("random", ["keep=8"]), ("pool", [])])
def test_the_full_count_equals_the_flop_counter(family, name, overrides):
    """Tower (window and full blocks), mergers (DeepStack's too), decoder and lm_head, on an
    image of the tiny model's processor, against torch's FlopCounterMode of the eager model."""
    from torch.utils.flop_counter import FlopCounterMode

    from fico.cost.model import model_spec, recipe_cost

    model = _model(family, dtype=torch.float32, attn="eager")
    one = inputs(family, [0], dtype=torch.float32)
    text = one["input_ids"].shape[1] - int((one["input_ids"] == IMAGE).sum())
    recipe = fico.load_recipe(name, overrides) if name else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if recipe is None:
            model(**one, logits_to_keep=1)
        else:
            with fico.apply(model, recipe):
                model(**one, logits_to_keep=1)
    analytic = recipe_cost(model_spec(f"embedded-{family}"), recipe, text, "full", image_size=SIZES[family][0])
    assert analytic.tflops * 1e12 == pytest.approx(counter.get_total_flops(), rel=1e-12)


@pytest.mark.parametrize("model,size,vision,tokens", [
    ("qwen2-vl-7b", (336, 336), 0.79, 144), ("qwen2-vl-7b", (1080, 1920), 32.77, 2691),
    ("qwen2.5-vl-7b", (336, 336), 0.75, 144), ("qwen2.5-vl-7b", (480, 640), 2.07, 391),
    ("qwen2.5-vl-7b", (1080, 1920), 16.27, 2691), ("qwen2.5-vl-7b", (2304, 2304), 49.54, 6724)])
def test_the_tower_cost_of_the_7b_models(model, size, vision, tokens):
    """The blocks and merger of Qwen's tower (model-families.md §8, which leaves out the patch
    embedding; fico counts it, as FlopCounterMode does)."""
    from fico.cost.model import recipe_cost

    report = recipe_cost(model, None, 64, "full", image_size=size)
    tower = sum(e["flops"] for e in report.per_layer
                if e["site"] in ("vision", "merger") and e["layer"] != "patch_embedding") / 1e12
    assert abs(tower - vision) < 0.01 and report.tokens["features"] == tokens


def test_fico_cost_counts_the_tower_of_a_qwen_model(capsys):
    from fico.commands.cli import main

    assert main(["cost", "qwen2.5-vl-7b", "fastervlm", "site=pre_llm", "signal=attention_received", "keep=128",
                 "--image-size", "640x480"]) == 0
    out = capsys.readouterr().out
    assert "resized to 644x476, 34x46 patches of 14 px, 17x23 = 391 visual tokens" in out
    assert "26% of the unreduced prefill" in out and "(full, 60" in out
    assert main(["cost", "qwen3-vl-8b", "--image-size", "1024x768", "--json"]) == 0
    assert '"features": 768' in capsys.readouterr().out


@pytest.mark.parametrize("family", FAMILIES)
def test_fico_run_takes_the_embedded_qwen_models(family, capsys):
    from fico.commands.cli import main

    assert main(["run", "fastervlm", "site=pre_llm", "signal=attention_received", "keep=16",
                 "--model", f"embedded-{family}", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert f"embedded tiny {family} (random)" in out and "what is the color of the circle ?" in out
    assert re.search(r"image features per image\s+│ 16", out)


@pytest.mark.parametrize("share,llava,qwen", [(33, 192, [8, 6]), (22, 128, [6, 4]), (11, 64, [3, 2])])
def test_the_protocol_shares_keep_each_images_own_fraction(share, llava, qwen):
    """``keep: 33.3%`` keeps ceil(share x n) of each image's tokens: LLaVA-1.5's 192 / 128 / 64
    of 576, and each Qwen image its own share (24 and 16 tokens here)."""
    from fico.recipe.plan import plan_recipe

    recipe = fico.load_recipe(f"budgets/divprune_keep{share}")
    assert plan_recipe(recipe, fico.adapters.family_for_config(fico.embedded.build_config()).planning_geometry(
        fico.embedded.build_config())).features == llava
    model = model_of("qwen2.5-vl")
    for name in (f"budgets/divprune_keep{share}", f"budgets/vispruner_cls_free_keep{share}",
                 f"budgets/random_keep{share}"):
        with torch.no_grad(), fico.apply(model, fico.load_recipe(name)) as run:
            model(**inputs("qwen2.5-vl"))
        assert run.trace.vision_features == qwen, name


def test_a_share_must_be_a_percentage():
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.keep: a share must be a percentage in \(0%, 100%\], "
                                               r"got '150%'"):
        fico.load_recipe("divprune", ["keep=150%"])


def test_attention_received_is_formed_in_bands_that_change_nothing(monkeypatch):
    """One query row per band keeps what the default bands keep; and with small bands fico's
    work never holds the image's whole (H, n, n) attention (measured by the memory probe)."""
    import fico.adapters.towers.packed_vit as packed_vit
    from fico.benchmarks.memory import prefill_memory

    model = model_of("qwen2-vl", dtype=torch.float32)
    one = embedded_qwen.example_inputs("qwen2-vl", sizes=[(448, 448)])  # 32 x 32 patches, 256 tokens
    recipe = fico.load_recipe("fastervlm", ["site=pre_llm", "signal=attention_received", "keep=64"])

    def kept():
        with torch.no_grad(), fico.apply(model, recipe, provenance=True) as run:
            model(**one)
        return run.trace.steps[0].positions_out

    default = kept()
    monkeypatch.setattr(packed_vit, "RECEIVED_BAND_ELEMENTS", 1)
    assert torch.equal(kept(), default)
    monkeypatch.setattr(packed_vit, "RECEIVED_BAND_ELEMENTS", 1 << 14)
    heads, patches = model.config.vision_config.num_heads, 32 * 32
    whole = heads * patches * patches * 4  # the float32 attention of every head: 16.8 MB
    with torch.no_grad():
        work = prefill_memory(model, one, recipe).work
    assert work is not None and work < whole / 4


@pytest.mark.parametrize("name,overrides,message", [
    ("fastervlm", ["site=nowhere"], r"steps\[0\]\.site: must be one of .*got 'nowhere' \(from \$\{site\}\)"),
    ("vispruner", ["site=pre_llm", "signal=no_such_signal"], r"steps\[0\]\.filter: unknown signal 'no_such_signal'"),
    ("visionzip", ["site=llm"], r"steps\[0\]\.keep: fico.pick: 'llm' is not one of vision_output, pre_llm"),
    ("fastervlm", ["site=pre_llm", "signal=attention_received", "steps.0.vision_layer=two"],
     r"steps\[0\]\.vision_layer: a vision block index \(an integer, negative from the end\) is needed, got 'two'"),
    ("fastervlm", ["steps.0.vision_layer=3"], r"steps\[0\]\.vision_layer: only the pre_llm site takes it"),
])
def test_bad_values_of_the_cls_free_knobs_name_the_key(name, overrides, message):
    with pytest.raises(fico.RecipeError, match=message):
        recipe = fico.load_recipe(name, overrides)
        fico.adapters.check_recipe(recipe, embedded_qwen.build_config("qwen2.5-vl"))


def test_a_vision_layer_out_of_range_is_refused():
    recipe = fico.load_recipe("fastervlm", ["site=pre_llm", "signal=attention_received", "steps.0.vision_layer=9"])
    with pytest.raises(fico.RecipeError, match=r"vision_layer: 9 is not a vision block of Qwen2-VL whose attention "
                                               r"spans the whole image; those are 0, 1, 2, 3 \(of 4\)"):
        fico.adapters.check_recipe(recipe, embedded_qwen.build_config("qwen2-vl"))
