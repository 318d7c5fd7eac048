"""LLaVA-NeXT, the second family: the position-aware packer, every site, ragged batches of
images of different sizes, and the conventions every family keeps. Tiny models built from
``LlavaNextConfig`` the way transformers' own tests build one (no top-level pad_token_id, no
generation config)."""

import functools

import pytest
import torch

import fico
from fico import embedded_next
from test_integration import snapshot
from test_ragged import CASES

CROP = 112  # 8 x 8 patches per crop: every structure of 336 px crops at a CI-sized cost
SIZES = [(112, 112), (200, 300)]  # 64 + 8 x (8 + 1) = 136 tokens; 64 + 10 x (16 + 1) = 234
PROMPTS = ["USER: <image>\nwhat is the color of the circle ? ASSISTANT:", "USER: <image>\nhow many objects ? ASSISTANT:"]

# the LLaVA-1.5 test overrides, where a count must fit 64-token crops
NEXT_CASES = {**CASES, "hired": ["keep=40"], "ficoco_vl": ["v.layers=[1]", "v.r=12", "l.k=2", "l.r=30"]}
NEXT_CASES.pop("fastv_fixed")


@functools.cache
def _model(dtype=torch.float64, attn="sdpa", crop=CROP, vision_layers=4, llm_layers=4):
    return embedded_next.build_model(seed=0, dtype=dtype, attn_implementation=attn, crop=crop,
                                     vision_layers=vision_layers, llm_layers=llm_layers)


def model_of(**kwargs):
    model = _model(**kwargs)
    assert getattr(model, "_fico_run", None) is None, "a previous test left a recipe applied"
    return model


@functools.cache
def _processor(crop=CROP):
    return embedded_next.build_processor(crop=crop)


def inputs(samples=(0, 1), dtype=torch.float64, sizes=SIZES, prompts=PROMPTS):
    out = embedded_next.example_inputs(_processor(), prompts=[prompts[i] for i in samples],
                                       sizes=[sizes[i] for i in samples], seeds=[i + 1 for i in samples])
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def _generate(model, batch, steps=3):
    out = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, 1)


def _recipe(name):
    return fico.load_recipe(name.replace("_v2", "").replace("_llm", ""), NEXT_CASES[name])


@pytest.mark.parametrize("crop,sizes", [
    (56, [(56, 56), (100, 150), (150, 100), (40, 170), (170, 40), (112, 112)]),
    (336, [(336, 448), (640, 480), (2000, 500)]),
])
def test_the_packer_is_the_stock_packing_when_nothing_is_removed(crop, sizes):
    """With every token present, the position-aware packer gives the stock features bit for bit,
    and its counts are the processor's (1368, 2352 and 1944 tokens at 336 px)."""
    from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                    image_size_to_num_patches, unpad_image)

    from fico.adapters.families.anyres import pack_image

    model = _model(crop=crop, vision_layers=2, llm_layers=1)
    processor = _processor(crop)
    config, g = model.config, crop // 14
    for size in sizes:
        batch = embedded_next.example_inputs(processor, sizes=[size])
        pixels, image_size = batch["pixel_values"].double(), batch["image_sizes"][0]
        with torch.no_grad():
            stock = model.model.get_image_features(pixels, batch["image_sizes"]).pooler_output[0]
            n = image_size_to_num_patches(image_size, config.image_grid_pinpoints, crop)
            hidden = model.model.vision_tower(pixels[0, :n], output_hidden_states=True).hidden_states[-2]
            crops = model.model.multi_modal_projector(hidden[:, 1:])
            shape = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, crop)
            packed = pack_image(list(crops), [torch.arange(g * g)] * n, shape, g, image_size,
                                model.model.image_newline, unpad_image)
        assert torch.equal(packed.features, stock), size
        assert int((batch["input_ids"] == embedded_next.image_token_id()).sum()) == stock.shape[0]
        rows, cols = packed.grids[1]
        assert int(packed.newline.sum()) == rows and stock.shape[0] == g * g + rows * (cols + 1)


def test_the_packer_places_survivors_by_their_cells():
    """Dropping cells keeps each survivor at its own row and column, every row's newline stays,
    and a created token (no cell) follows the last newline."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    from fico.adapters.families.anyres import pack_image

    g, dim = 2, 3
    crops = [torch.randn(4, dim) for _ in range(5)]  # base + 2 x 2 crops of 2 x 2 cells
    cells = [torch.arange(4), torch.tensor([0, 3]), torch.tensor([1]), torch.tensor([-1, 2]), torch.arange(4)]
    crops[1], crops[2], crops[3] = crops[1][:2], crops[2][:1], crops[3][:2]
    packed = pack_image(crops, cells, (2, 2), g, [4, 4], torch.zeros(dim), unpad_image)
    hires = packed.layout[4:]
    assert packed.grids == ((2, 2), (4, 4))
    assert int(packed.newline.sum()) == 4  # one per row, though row 1 holds only one token
    placed = [tuple(r[2:].tolist()) for r, nl in zip(hires, packed.newline[4:]) if r[0] >= 0]
    assert placed == [(0, 0), (0, 3), (1, 1), (2, 2), (2, 3), (3, 0), (3, 2), (3, 3)]
    assert torch.equal(packed.features[-1], crops[3][0]) and bool((packed.layout[-1] == -1).all())


@pytest.mark.parametrize("name,overrides", [("fastv", ["ratio=0"]), ("random", ["keep=336"]), ("random", ["keep=234"])])
def test_zero_reduction_is_bitwise_identical(name, overrides):
    """A step that removes nothing (``keep`` at least each image's own count) gives the stock
    logits and tokens bit for bit, on a batch of two image sizes."""
    model = model_of(dtype=torch.float32)
    batch = inputs(dtype=torch.float32)
    with torch.no_grad():
        expected = model(**batch).logits
        expected_tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)
        with fico.apply(model, fico.load_recipe(name, overrides)) as run:
            actual = model(**batch).logits
            tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert run.trace.vision_features == [136, 234]
    assert torch.equal(actual, expected)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("name", ["fastv", "tome", "pool"])
def test_remove_restores_the_vanilla_model(name):
    model = model_of(dtype=torch.float32)
    batch = inputs(dtype=torch.float32)
    before = snapshot(model)
    with torch.no_grad():
        expected = model(**batch).logits
        run = fico.apply(model, _recipe(name))
        assert snapshot(model)[:3] != before[:3]
        model(**batch)
        run.remove()
        after = model(**batch).logits
    assert torch.equal(after, expected)
    hooks, classes, attrs, state = snapshot(model)
    assert (hooks, classes, attrs) == before[:3]
    assert all(torch.equal(state[k], before[3][k]) for k in state)


@pytest.mark.parametrize("name", sorted(NEXT_CASES))
def test_each_sample_of_a_batch_of_two_image_sizes_equals_it_alone(name):
    """136 and 234 visual tokens in one left-padded batch: each sample's cached generation
    equals that sample alone, at every site."""
    model = model_of()
    batch = inputs()
    with torch.no_grad(), fico.apply(model, _recipe(name)):
        tokens, scores = _generate(model, batch)
        for i in range(2):
            alone = inputs([i])
            alone_tokens, alone_scores = _generate(model, alone)
            new = alone_tokens[0, alone["input_ids"].shape[1]:]  # may stop early, at </s>
            assert torch.equal(tokens[i, batch["input_ids"].shape[1]:][:len(new)], new)
            assert (scores[i, :len(new)] - alone_scores[0]).abs().max() < 1e-6
    assert torch.equal(tokens[:, :batch["input_ids"].shape[1]], batch["input_ids"])


def test_newlines_are_visual_but_never_reduced():
    """A decoder step discards only cells: each image keeps its newline rows, and pre_llm
    ``keep: K`` counts them."""
    model = model_of()
    batch = inputs()
    seen = {}
    with torch.no_grad(), fico.apply(model, fico.load_recipe("random", ["keep=100"]), provenance=True) as run:
        model(**batch)
        seen["pre_llm"] = run.trace.vision_features
        model(**inputs([1]))
        step = run.trace.steps[-1]
    assert seen["pre_llm"] == 100
    assert step.layout_in is not None and step.grids == ((8, 8), (10, 16))
    kept = set(step.positions_out[0].tolist())
    newline = step.layout_in[0, :, 0] < 0
    assert all(i in kept for i in newline.nonzero()[:, 0].tolist())  # all 10 newlines stay


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_finite(dtype):
    model = model_of(dtype=dtype)
    batch = inputs(dtype=dtype)
    for name in ("fastv", "tome", "ficoco_l", "pool"):
        with torch.no_grad(), fico.apply(model, _recipe(name)):
            logits = model(**batch).logits
            _, scores = _generate(model, batch, 2)
        assert torch.isfinite(logits).all(), name
        assert not torch.isnan(scores).any(), name


def test_a_positional_input_ids_reaches_the_decoder_site():
    """LLaVA-NeXT's entry calls its inner model with input_ids positionally; the decoder site
    still finds the visual tokens (FastV removes half of each image's cells)."""
    model = model_of()
    with torch.no_grad(), fico.apply(model, fico.load_recipe("fastv", ["k=2"])) as run:
        model(**inputs([1]))
    assert run.trace.visual[2] == (234 - 10) // 2 + 10


@pytest.mark.parametrize("size,passes,tokens", [((336, 336), 3, 1176), ((480, 640), 5, 2340), ((640, 480), 5, 2352),
                                                ((1080, 1920), 5, 1948), ((2000, 500), 4, 1944), (None, 5, 2928)])
def test_the_cost_model_counts_crops_base_image_and_newlines(size, passes, tokens):
    """LLaVA-NeXT-7B's visual tokens by image size (the processor's own counts), and the
    vision tower's cost once per pass."""
    from fico.cost.model import TokenCounts, model_spec, prefill_cost, recipe_cost

    spec = model_spec("llava-next-7b")
    assert spec.image(size)[:2] == (passes, tokens)
    report = recipe_cost(spec, None, 60, "full", image_size=size)
    assert report.tokens["features"] == tokens and report.tokens["llm"][0] == tokens + 60
    vision = [e["flops"] for e in report.per_layer if e["site"] == "vision"]
    one_pass = prefill_cost(model_spec("llava-1.5-7b"), TokenCounts.unreduced(model_spec("llava-1.5-7b"), 60), "full")
    assert sum(vision) == pytest.approx(passes * sum(e["flops"] for e in one_pass.per_layer if e["site"] == "vision"))


def test_the_cost_model_reads_a_next_config():
    from fico.cost.model import model_spec

    spec = model_spec(embedded_next.build_config())
    assert spec.grid_pinpoints and spec.image((336, 448))[1] == 1368
    assert model_spec("embedded-next").image((336, 336))[1] == 1176


def test_a_decoder_schedule_counts_cells_and_keep_counts_rows():
    """FastV halves the 2304 cells of a 640 x 480 image (its 36 newlines stay); a pre_llm
    ``keep: 640`` keeps 640 rows, newlines included."""
    from fico.cost.model import recipe_cost

    fastv = recipe_cost("llava-next-7b", fico.load_recipe("fastv"), 60, image_size=(480, 640))
    assert fastv.tokens["llm"][-1] == 60 + 2340 - 1152
    random = recipe_cost("llava-next-7b", fico.load_recipe("random", ["keep=640"]), 60, image_size=(480, 640))
    assert random.tokens["features"] == 640


def test_fico_cost_takes_the_image_size(capsys):
    from fico.commands.cli import main

    assert main(["cost", "llava-next-7b", "--image-size", "640x480"]) == 0
    out = capsys.readouterr().out
    assert "5 CLIP passes" in out and "36 newlines = 2340 visual tokens" in out
    assert main(["cost", "llava-1.5-7b", "--image-size", "640x480"]) != 0
    assert "the option is for models whose count depends on it" in capsys.readouterr().err


def test_fico_run_takes_the_embedded_next_model(capsys):
    from fico.commands.cli import main

    assert main(["run", "fastv", "--model", "embedded-next", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "embedded tiny LLaVA-NeXT-shaped" in out and "image features per image" in out


def test_every_bundled_recipe_runs_on_a_next_model_of_real_depth_or_names_what_it_lacks():
    """All bundled recipes and budget variants, at LLaVA-NeXT's real depth and crop size (24
    CLIP layers, 32 decoder layers, 336 px crops), on a batch of two image sizes (772 and 792
    visual tokens); CDPruner and the [CLS]-free forms alone refuse, naming the signal the family
    lacks."""
    model = _model(dtype=torch.float32, crop=336, vision_layers=24, llm_layers=32)
    processor = _processor(336)
    batch = embedded_next.example_inputs(processor, prompts=PROMPTS, sizes=[(60, 600), (336, 100)], seeds=[1, 2])
    refused = {}
    for name in fico.bundled_recipes():
        recipe = fico.load_recipe(name)
        try:
            with torch.no_grad(), fico.apply(model, recipe) as run:
                logits = model(**batch).logits
        except fico.RecipeError as error:
            refused[name] = str(error)
            continue
        assert torch.isfinite(logits).all(), name
        features = run.trace.vision_features
        if any(s.site in ("vision", "vision_output", "pre_llm") for s in recipe.steps):
            assert all(n < 772 for n in (features if isinstance(features, list) else [features])), name
        else:  # the sequence entering the decoder is the processor's
            assert features == [772, 792] and run.trace.llm[0] == batch["input_ids"].shape[1], name
    assert sorted(refused) == sorted(n for n in fico.bundled_recipes() if "cdpruner" in n or "_cls_free_" in n)
    assert all(("instruction_similarity" in m or "attention_received" in m) and "LLaVA-NeXT" in m
               for m in refused.values())


@pytest.mark.parametrize("name", ["tome", "pool", "visionzip", "random"])
def test_cached_generate_equals_a_recompute_without_cache(name):
    """Vision-side and pre_llm steps decide once per image, so the cached decode equals
    recomputing the whole sequence at every step, on a batch of two image sizes."""
    model = model_of()
    batch = inputs()
    with torch.no_grad(), fico.apply(model, _recipe(name)):
        cached, cached_scores = _generate(model, batch)
        recomputed, recomputed_scores = model.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=False,
                                                       output_scores=True, return_dict_in_generate=True)[:2]
    assert torch.equal(cached, recomputed)
    assert (cached_scores - torch.stack(recomputed_scores, 1)).abs().max() < 1e-9


def test_fico_show_draws_each_part_on_its_own_grid(tmp_path):
    from fico.commands.cli import main
    from fico.commands.show import image_parts, provenance_panels

    model = model_of()
    with torch.no_grad(), fico.apply(model, _recipe("pool"), provenance=True) as run:
        model(**inputs([1]))
    assert image_parts(run.trace) == [0, 1]
    base, high = provenance_panels(run.trace, 0), provenance_panels(run.trace, 1)
    assert base[0]["grid"] == (8, 8) and high[0]["grid"] == (10, 16)
    assert len(base[0]["moves"]) == 64 - 16 and len(high[0]["moves"]) == 160 - 5 * 8  # 2 x 2 windows
    out = tmp_path / "show.png"
    assert main(["show", "pool", "--model", "embedded-next", "--out", str(out)]) == 0 and out.stat().st_size > 0
