"""The wave-2 methods equal straightforward implementations of their official algorithms
(float64, 1e-6): what they hand the language model, in order, and its logits."""

import pytest
import reference_wave2 as ref
import torch

import fico


def handed_features(model, inputs, recipe):
    """The per-image features fico hands the language model, and the logits."""
    seen = {}

    def grab(module, args, kwargs):
        outputs = kwargs.get("mm_encoder_outputs")
        if outputs is not None:
            seen["features"] = list(outputs["image"].pooler_output)

    handle = model.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), fico.apply(model, recipe) as run:
            logits = model(**inputs).logits
    finally:
        handle.remove()
    return seen["features"], logits, run


VISION_CASES = {
    "fastervlm": (["keep=64"], lambda m, p: ref.fastervlm_features(m, p, 64)),
    "hired": (["keep=100"], lambda m, p: ref.fastervlm_features(m, p, 100)),
    "visionzip": (["dominant=54", "contextual=10"], lambda m, p: ref.visionzip_features(m, p, 54, 10)),
    "vispruner": (["keep=64", "important_ratio=0.5"], lambda m, p: ref.vispruner_features(m, p, 64, 0.5)),
    "prumerge": ([], lambda m, p: ref.prumerge_features(m, p, 32)),
    "prumerge_plus": ([], lambda m, p: ref.prumerge_features(m, p, 32, plus=True)),
    "divprune": (["keep=56"], lambda m, p: ref.divprune_features(m, p, 56)),
    "pool": (["kernel=2"], lambda m, p: ref.pool_features(m, p, 2)),
    "random": (["keep=64", "seed=3"], lambda m, p: ref.random_features(m, p, 64, 3)),
}


@pytest.mark.parametrize("name", sorted(VISION_CASES))
def test_vision_side_methods_hand_the_llm_what_the_official_code_does(tiny_model, batch_inputs, name):
    overrides, reference = VISION_CASES[name]
    model = tiny_model()
    inputs = batch_inputs()
    features, _, _ = handed_features(model, inputs, fico.load_recipe(name, overrides))
    with torch.no_grad():
        expected = reference(model, inputs["pixel_values"])
    assert len(features) == len(expected)
    for got, want in zip(features, expected):
        assert got.shape == want.shape, (got.shape, want.shape)
        assert (got - want).abs().max() < 1e-6  # the same tokens in the same order


@pytest.mark.parametrize("name", ["visionzip", "divprune", "prumerge"])
def test_vision_side_logits_equal_the_shorter_prompt(tiny_model, single_inputs, name):
    """What the language model computes equals running it on the reference features."""
    overrides, reference = VISION_CASES[name]
    model = tiny_model()
    inputs = single_inputs()
    _, logits, _ = handed_features(model, inputs, fico.load_recipe(name, overrides))
    with torch.no_grad():
        expected = ref.llm_logits(model, inputs["input_ids"], reference(model, inputs["pixel_values"])[0])
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() < 1e-6


LLM_CASES = {
    "pdrop": (["layers=[1,2,3]", "ratio=0.5"],
              lambda m, ids, px, **kw: ref.pdrop_logits(m, ids, px, [1, 2, 3], 0.5, **kw)),
    "dart": (["k=2", "keep=128"], lambda m, ids, px, **kw: ref.dart_logits(m, ids, px, 2, 128, **kw)),
    "sparsevlm": (["layers=[0,1,2]", "budget=192", "steps.0.correlate={name: density_peaks, fraction: 0.3, noise: 0}"],
                  lambda m, ids, px, **kw: ref.sparsevlm_logits(m, ids, px, [0, 1, 2], [300, 200, 110], **kw)),
    "sparsevlm_v2": (["layers=[0,1,2]", "budget=128", "version=2.0", "steps.0.filter.heads=2"],
                     lambda m, ids, px, **kw: ref.sparsevlm_logits(m, ids, px, [0, 1, 2], [238, 108, 60], "2.0",
                                                                   heads=2, **kw)),
    "fitprune": (["steps.0.remove=[40,30,20,10]"],
                 lambda m, ids, px, **kw: ref.fitprune_logits(m, ids, px, [40, 30, 20, 10], **kw)),
}


def _recipe(name):
    overrides, reference = LLM_CASES[name]
    return fico.load_recipe(name.replace("_v2", ""), overrides), reference


@pytest.mark.parametrize("name", sorted(LLM_CASES))
def test_in_decoder_methods_equal_the_official_algorithm(tiny_model, single_inputs, name):
    model = tiny_model()
    inputs = single_inputs()
    recipe, reference = _recipe(name)
    with torch.no_grad():
        with fico.apply(model, recipe):
            logits = model(**inputs).logits
        expected = reference(model, inputs["input_ids"], inputs["pixel_values"])
    assert logits.shape == expected.shape, (logits.shape, expected.shape)
    assert (logits - expected).abs().max() < 1e-6


def _generate(model, inputs, steps):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("name", sorted(LLM_CASES))
def test_cached_decode_equals_a_recompute_with_the_prefill_selection(tiny_model, single_inputs, name):
    """Each decode step attends to exactly the tokens each layer kept, at the positions that
    layer's frame gives (renumbered or original): a full recompute that makes the same
    choices from the prompt gives the same next-token scores."""
    model = tiny_model()
    inputs = single_inputs()
    recipe, reference = _recipe(name)
    steps = 3
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        with fico.apply(model, recipe):
            sequences, scores = _generate(model, inputs, steps)
        for step in range(steps):
            logits = reference(model, sequences[:, :prompt + step], inputs["pixel_values"], prompt=prompt)
            assert (logits[:, -1] - scores[:, step]).abs().max() < 1e-6, step


ALL_METHODS = {**{k: v[0] for k, v in VISION_CASES.items()}, **{k: v[0] for k, v in LLM_CASES.items()},
               "random_llm": ["site=llm", "layers=[2]", "keep=100"]}


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_a_left_padded_batch_equals_each_sample_alone(tiny_model, batch_inputs, processor, name):
    from fico import embedded

    # float64: in float32 some selections (VisPruner's duplicate rounds) meet near-ties that the
    # batched and the single-image CLIP break differently
    model = tiny_model()
    recipe = fico.load_recipe(name.replace("_v2", "").replace("_llm", ""), ALL_METHODS[name])
    batch = batch_inputs()
    prompts = ["USER: <image> what is the color of the circle ? ASSISTANT:", "USER: <image> how many objects ? ASSISTANT:"]
    with torch.no_grad(), fico.apply(model, recipe):
        tokens, scores = _generate(model, batch, 3)
        for i, (text, seed) in enumerate(zip(prompts, [1, 2])):
            alone = embedded.example_inputs(processor, prompts=[text], seeds=[seed])
            alone["pixel_values"] = alone["pixel_values"].to(torch.float64)
            alone_tokens, alone_scores = _generate(model, alone, 3)
            assert torch.equal(tokens[i, batch["input_ids"].shape[1]:], alone_tokens[0, alone["input_ids"].shape[1]:])
            assert (scores[i] - alone_scores[0]).abs().max() < 1e-6


def test_images_of_one_batch_keep_their_own_counts(tiny_model, processor):
    """PruMerge chooses its count per image (fico: per image, not over the batch): each
    image's placeholder run is rebuilt to its own count, and each sample of the padded batch
    equals the sample alone."""
    from fico import embedded

    model = tiny_model()
    prompts = ["USER: <image> what is the color of the circle ? ASSISTANT:", "USER: <image> how many objects ? ASSISTANT:"]
    seeds = [1, 6]
    batch = embedded.example_inputs(processor, prompts=prompts, seeds=seeds)
    batch["pixel_values"] = batch["pixel_values"].double()
    with torch.no_grad(), fico.apply(model, fico.load_recipe("prumerge")) as run:
        tokens, scores = _generate(model, batch, 3)
        counts = run.trace.vision_features
        assert isinstance(counts, list) and counts[0] != counts[1]
        for i, (text, seed) in enumerate(zip(prompts, seeds)):
            alone = embedded.example_inputs(processor, prompts=[text], seeds=[seed])
            alone["pixel_values"] = alone["pixel_values"].double()
            alone_tokens, alone_scores = _generate(model, alone, 3)
            assert run.trace.vision_features == counts[i]
            assert torch.equal(tokens[i, batch["input_ids"].shape[1]:], alone_tokens[0, alone["input_ids"].shape[1]:])
            assert (scores[i] - alone_scores[0]).abs().max() < 1e-6
    # the caller's prompt comes back unchanged
    assert torch.equal(tokens[:, : batch["input_ids"].shape[1]], batch["input_ids"])


@pytest.mark.parametrize("name", ["visionzip", "prumerge_plus", "divprune", "pool"])
def test_vision_side_generate_cache_equals_recompute(tiny_model, single_inputs, name):
    model = tiny_model()
    inputs = single_inputs()
    recipe = fico.load_recipe(name, VISION_CASES[name][0])
    with torch.no_grad(), fico.apply(model, recipe):
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                                return_dict_in_generate=True)
        recomputed = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                                    return_dict_in_generate=True, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert (torch.stack(cached.scores) - torch.stack(recomputed.scores)).abs().max() < 1e-8


def test_rebuild_placeholders_cuts_each_image_to_its_count():
    from fico.adapters.placeholders import rebuild_placeholders

    image, pad = 9, 0
    ids = torch.tensor([[pad, 1, 9, 9, 9, 9, 2], [1, 9, 9, 9, 9, 3, 2]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    out = rebuild_placeholders({"input_ids": ids, "attention_mask": mask}, [1, 3], image, 4, pad)
    assert out["input_ids"].tolist() == [[pad, pad, pad, 1, 9, 2], [1, 9, 9, 9, 3, 2]]
    assert out["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    # a method may emit more features than patches (PruMerge's extra token when nothing is discarded)
    out = rebuild_placeholders({"input_ids": ids, "attention_mask": mask}, [2, 5], image, 4, pad)
    assert out["input_ids"].tolist() == [[pad, pad, pad, pad, 1, 9, 9, 2], [1, 9, 9, 9, 9, 9, 3, 2]]
    assert out["attention_mask"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [1] * 8]


@pytest.mark.parametrize("name,overrides,match", [
    ("fastervlm", ["keep=600"], r"steps\[0\]\.keep: keeps 600 tokens \(from \$\{keep\}\) at the vision_output site, "
                                r"where only 576 reducible tokens are present"),
    ("divprune", ["keep=577"], r"steps\[0\]\.keep: keeps 577 tokens \(from \$\{keep\}\) at the pre_llm site"),
    ("random", ["site=llm", "layers=[2]", "keep=700"], r"keeps 700 tokens \(from \$\{keep\}\) at llm layer 2"),
    ("visionzip", ["contextual=600"], r"keeps 653 tokens \(from \$\{fico.sum:\$\{dominant\},\$\{contextual\},"
                                      r"\$\{fico.pick:\$\{tables.cls_count\},\$\{site\}\}\}\)"),
    ("visionzip", ["dominant=0"], r"receivers=10 \(VisionZip's contextual tokens\) is more than the 9 candidates"),
    ("dart", ["keep=6"], r"steps\[0\]\.filter: image_pivots \+ text_pivots = 8 is above keep=6"),
    ("dart", ["keep=600"], r"steps\[0\]\.keep: keeps 600 tokens"),
    ("pool", ["kernel=30"], r"steps\[0\]\.filter: kernel=30 is larger than the 24 x 24 grid"),
    ("fitprune", [], r"steps\[0\]\.remove: no count list for a step at 4 layers, as it runs on this model; the "
                     r"recipe has lists for 6 or 32 layers \(from \$\{fico.pick:.*\}\): add a list of 4 counts"),
    ("pdrop", ["layers=[8,16,24]"], r"steps\[0\]\.layers: layer 8 is out of range: the llm site of this model has layers 0..3 "
                  r"\(from \$\{layers\}\); the recipe's schedule was written for a deeper model: override "
                  r"layers=\.\.\. with layers this model has"),
])
def test_bad_values_that_need_the_model(tiny_model, name, overrides, match):
    from test_integration import snapshot

    model = tiny_model(dtype=torch.float32)
    before = snapshot(model)
    with pytest.raises(fico.RecipeError, match=match):
        fico.apply(model, fico.load_recipe(name, overrides))
    assert snapshot(model)[:3] == before[:3]


@pytest.mark.parametrize("name,overrides,match", [
    ("sparsevlm", ["budget=100"], r"steps\[0\]\.keep: fico.pick: 100 is not one of 192, 128, 96, 64$"),
    ("sparsevlm", ["version=3"], r"fico.pick: 3 is not one of 1.5, 2.0"),
    ("fitprune", ["reduction_ratio=75"], r"fico.pick: 75 is not one of 0, 10, 20, 30, 40, 50, 55, 60, 70, 80, 90"),
    ("pool", ["kernel=0"], r"steps\[0\]\.filter: kernel must be >= 1, got 0"),
    ("pdrop", ["ratio=0"], r"steps\[0\]\.keep_geometric: must be in \(0, 1\], got 0 \(from \$\{ratio\}\)"),
    ("pdrop", ["ratio=1.5"], r"keep_geometric: must be in \(0, 1\]"),
    ("random", ["seed=-1"], r"steps\[0\]\.filter: seed must be >= 0, got -1"),
    ("random", ["site=vision_output", "layers=[2]"], r"steps\[0\]\.layers: the vision_output site acts at one point"),
    ("vispruner", ["important_ratio=2"], r"steps\[0\]\.filter: important_ratio must be in \[0, 1\], got 2"),
    ("prumerge", ["neighbors=0"], r"steps\[0\]\.correlate: neighbors must be >= 1, got 0"),
    ("dart", ["budget_mode=closest"], r"budget_mode must be one of official, exact, got 'closest'"),
    ("dart", ["image_pivots=0"], r"image_pivots must be >= 1"),
    ("fastervlm", ["keep=-1"], r"steps\[0\]\.keep: must be a non-negative integer, got -1"),
    ("fastervlm", ["keep=many"], r"steps\[0\]\.keep: must be a number, a list of them \(one per layer\), a share \('33.3%'\), 'filter' "
                                 r"or 'adaptive', got 'many'"),
])
def test_bad_knob_values_name_the_key(name, overrides, match):
    with pytest.raises(fico.RecipeError, match=match):
        fico.load_recipe(name, overrides)


def test_step_options_belong_to_their_sites(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - {site: vision, layers: [0], remove: 2, positions: renumber, filter: bipartite_matching,"
                    " correlate: key_similarity, compress: weighted_average}\n")
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.positions: only the llm and llm_mid site\(s\) take it"):
        fico.load_recipe(path)
    path.write_text("steps:\n  - {site: llm, layers: [2], remove: 2, positions: shuffle, filter: "
                    "{name: attention_rank, signal: last_query_attention}, correlate: none, compress: drop}\n")
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.positions: must be keep or renumber, got 'shuffle'"):
        fico.load_recipe(path)
    path.write_text("steps:\n  - {site: pre_llm, keep: adaptive, filter: random, correlate: none, compress: drop}\n")
    with pytest.raises(fico.RecipeError, match=r"'adaptive' needs a filter that chooses its own count"):
        from fico.cost.model import recipe_cost

        recipe_cost("llava-1.5-7b", fico.load_recipe(path))


def test_a_mid_layer_step_that_reads_attention_rows_forms_the_attention_once(tiny_model, single_inputs,
                                                                              monkeypatch):
    """FitPrune reads most rows of each layer's attention: the layer forms it whole, once, in
    prefill (not SDPA plus a second pass for the rows), and decodes with the model's own attention."""
    from fico.adapters import decoder

    calls = []
    original = decoder.attention_with_probabilities
    monkeypatch.setattr(decoder, "attention_with_probabilities",
                        lambda attn, hidden, *a, **k: calls.append(hidden.shape[1]) or original(attn, hidden, *a, **k))
    model = tiny_model()
    recipe, reference = _recipe("fitprune")
    inputs = single_inputs()
    with torch.no_grad(), fico.apply(model, recipe):
        sequences, scores = _generate(model, inputs, 2)
    n = inputs["input_ids"].shape[1]
    assert calls == [n, n - 40, n - 70, n - 90]  # the prefill only, one per layer, on what each layer sees
    with torch.no_grad():
        expected = reference(model, inputs["input_ids"], inputs["pixel_values"])
    assert (scores[:, 0] - expected[:, -1]).abs().max() < 1e-6


def test_pdrop_stages_follow_the_depth(capsys):
    from fico.commands.cli import main
    from fico.recipe.plan import Geometry, plan_recipe

    recipe = fico.load_recipe("pdrop")
    for depth, expected in ((32, [8, 16, 24]), (6, [1, 3, 4]), (4, [1, 2, 3])):
        assert sorted(plan_recipe(recipe, Geometry(24, 577, 23, True, depth)).llm.steps) == expected
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.layers: 'stages:4' needs at least 4 layers; the llm "
                                               r"site of this model has 3"):
        plan_recipe(recipe, Geometry(24, 577, 23, True, 3))
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.layers: 'stages:S' needs S >= 2 stages, got 'stages:1'"):
        fico.load_recipe("pdrop", ["layers=stages:1"])
    assert main(["run", "pdrop", "--repeats", "1"]) == 0, "the default (toy) model runs PyramidDrop's own partition"
    assert "pdrop" in capsys.readouterr().out


def test_sparsevlm_layers_follow_the_depth(tmp_path):
    """SparseVLM's pruning layers have no rule per depth: the official ones where the model has
    them, the toy's own list on a 6-layer decoder; an override replaces the whole mapping."""
    from fico.recipe.plan import Geometry, plan_recipe

    def inputs_of(recipe, depth):
        return sorted(plan_recipe(recipe, Geometry(24, 577, 23, True, depth)).llm.steps)

    recipe = fico.load_recipe("sparsevlm")
    assert inputs_of(recipe, 32) == [3, 7, 16] and inputs_of(recipe, 28) == [3, 7, 16]
    assert inputs_of(recipe, 6) == [1, 2, 4]
    assert inputs_of(fico.load_recipe("sparsevlm", ["layers=[0,1,2]"]), 6) == [1, 2, 3]
    assert inputs_of(fico.load_recipe("sparsevlm", ["layers.6=[0,2,3]"]), 6) == [1, 3, 4]
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - {site: llm, layers: {6: [1, 2]}, keep: 100, filter: {name: attention_rank, "
                    "signal: last_query_attention}, correlate: none, compress: drop}\n")
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.layers: no layer list for a llm site of 32 layers; "
                                               r"the recipe has lists for 6 layers"):
        plan_recipe(fico.load_recipe(path), Geometry(24, 577, 23, True, 32))
    path.write_text(path.read_text().replace("{6: [1, 2]}", "{6: [1, 7]}"))
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.layers\.6: a site of 6 layers has layers 0\.\.5"):
        fico.load_recipe(path)


def test_pdrop_budget_variants_solve_their_ratio_per_depth(tmp_path):
    """The maintainer's rule (layers [2, 8, 16] and the ratio whose layer-average is the budget)
    carried to the toy's 6 layers with a ratio solved there; 64 cannot be reached on 6 layers
    and the variant says which layer it lacks instead of running something else."""
    from fico.recipe.plan import Geometry, plan_recipe

    def averaged(name, depth):  # the layers it drops at, and visual tokens averaged over the layers' inputs
        plan = plan_recipe(fico.load_recipe(name), Geometry(24, 577, 23, True, depth))
        return sorted(plan.llm.steps), sum(plan.llm.attention) / depth

    for budget, toy_ratio in ((192, 0.47), (128, 0.24)):
        layers, means = averaged(f"budgets/pdrop_{budget}", 32)
        assert layers == [2, 8, 16] and abs(means - budget) < 1
        layers, means = averaged(f"budgets/pdrop_{budget}", 6)
        assert layers == [1, 2, 3] and abs(means - budget) < 1
        assert fico.load_recipe(f"budgets/pdrop_{budget}").steps[0].schedule.value == {"default": pytest.approx(
            {192: 0.56, 128: 0.42}[budget]), 6: toy_ratio}
    with pytest.raises(fico.RecipeError, match=r"layer 8 is out of range: the llm site of this model has layers 0\.\.5"):
        averaged("budgets/pdrop_64", 6)
    # a ratio by depth that lacks the model's depth (and has no default) names the knob to extend
    recipe = fico.load_recipe("pdrop", ["layers=[1,2,3]", "ratio={6: 0.3}"])
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.keep_geometric: no ratio for a llm site of 4 layers; "
                                               r"the recipe has ratios for 6 layers \(from \$\{ratio\}\): add one "
                                               r"for 4 to ratio"):
        plan_recipe(recipe, Geometry(24, 577, 23, True, 4))
    for bad in ("{6: 1.5}", "{six: 0.5}", "{}"):
        with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.keep_geometric: ratios by depth need"):
            fico.load_recipe("pdrop", [f"ratio={bad}"])
