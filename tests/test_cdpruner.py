"""CDPruner: the instruction's CLIP relevance from a local CLIP checkpoint's text tower, a
conditional DPP over the projector outputs; equal to the official algorithm (float64, 1e-6)."""

import pytest
import reference_wave2 as ref
import torch
from test_integration import snapshot
from test_wave2 import _generate

import fico
from fico import embedded

PROMPTS = ["USER: <image> what is the color of the circle ? ASSISTANT:", "USER: <image> how many objects ? ASSISTANT:"]
# the second one runs past CLIP's 77 tokens: two segments
QUESTIONS = ["what is the color of the circle ?", " ".join(["how many red objects are there in the image ?"] * 9)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    embedded.save_clip_checkpoint(path, vision_width=64)
    return str(path)


def cdpruner(clip_dir, *overrides):
    return fico.load_recipe("cdpruner", [f"text_encoder={clip_dir}", *overrides])


def handed(model, inputs, recipe, instruction):
    seen = {}

    def grab(module, args, kwargs):
        if kwargs.get("mm_encoder_outputs") is not None:
            seen["features"] = list(kwargs["mm_encoder_outputs"]["image"].pooler_output)

    handle = model.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), fico.apply(model, recipe):
            logits = model(**inputs, instruction=instruction).logits
    finally:
        handle.remove()
    return seen["features"], logits


@pytest.mark.parametrize("relevance,sign", [("negative", -1.0), ("positive", 1.0)])
def test_cdpruner_hands_the_llm_what_the_official_code_does(tiny_model, batch_inputs, clip_dir, relevance, sign):
    model, inputs = tiny_model(), batch_inputs()
    # 40 of 576: within the rank of the tiny model's 64-wide projector outputs
    features, _ = handed(model, inputs, cdpruner(clip_dir, "keep=40", f"relevance={relevance}"), QUESTIONS)
    with torch.no_grad():
        expected = ref.cdpruner_features(model, inputs["pixel_values"], QUESTIONS, clip_dir, 40, sign)
    assert [f.shape for f in features] == [e.shape for e in expected] == [torch.Size([40, 64])] * 2
    for got, want in zip(features, expected):
        assert (got - want).abs().max() < 1e-6  # the same tokens in the same order
    assert not torch.equal(features[0], ref.cdpruner_features(model, inputs["pixel_values"][:1], QUESTIONS[1:],
                                                              clip_dir, 40, sign)[0]), "the question must matter"


def test_cdpruner_logits_equal_the_shorter_prompt(tiny_model, single_inputs, clip_dir):
    model, inputs = tiny_model(), single_inputs()
    _, logits = handed(model, inputs, cdpruner(clip_dir, "keep=32"), QUESTIONS[0])
    with torch.no_grad():
        features = ref.cdpruner_features(model, inputs["pixel_values"], QUESTIONS[:1], clip_dir, 32)[0]
        expected = ref.llm_logits(model, inputs["input_ids"], features)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() < 1e-6


def test_a_left_padded_batch_equals_each_sample_alone_and_the_cache_a_recompute(tiny_model, batch_inputs, processor,
                                                                                 clip_dir):
    model, batch = tiny_model(), batch_inputs()
    recipe = cdpruner(clip_dir, "keep=48")
    with torch.no_grad(), fico.apply(model, recipe):
        tokens, scores = _generate(model, dict(batch, instruction=QUESTIONS), 3)
        recomputed = model.generate(**batch, instruction=QUESTIONS, max_new_tokens=3, do_sample=False,
                                    use_cache=False)
        assert torch.equal(tokens, recomputed)
        for i, (text, seed) in enumerate(zip(PROMPTS, [1, 2])):
            alone = embedded.example_inputs(processor, prompts=[text], seeds=[seed])
            alone["pixel_values"] = alone["pixel_values"].double()
            alone_tokens, alone_scores = _generate(model, dict(alone, instruction=QUESTIONS[i]), 3)
            assert torch.equal(tokens[i, batch["input_ids"].shape[1]:], alone_tokens[0, alone["input_ids"].shape[1]:])
            assert (scores[i] - alone_scores[0]).abs().max() < 1e-6
    assert torch.equal(tokens[:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_past_the_kernels_rank_every_token_is_still_kept_once(tiny_model, single_inputs, clip_dir):
    """The tiny model's features are 64 wide, so a kernel over 576 of them has rank 64: the
    official update would divide by sqrt(0) there; fico keeps exactly ``keep`` distinct tokens."""
    model, inputs = tiny_model(), single_inputs()
    features, _ = handed(model, inputs, cdpruner(clip_dir, "keep=192"), QUESTIONS[0])
    assert features[0].shape == (192, 64)
    assert torch.unique(features[0], dim=0).shape[0] == 192


def test_the_text_tower_loads_once_per_recipe(tiny_model, single_inputs, clip_dir):
    model, inputs = tiny_model(), single_inputs()
    recipe = cdpruner(clip_dir, "keep=16")
    for _ in range(2):
        handed(model, inputs, recipe, QUESTIONS[0])
    assert len(recipe.auxiliary) == 1


def test_the_cost_of_cdpruner_needs_no_text_tower():
    """Counted as DivPrune at the same budget (the same tokens reach the LLM; CLIP's text tower
    is not counted, as for every auxiliary computation outside the LLaVA model)."""
    from fico.cost.model import recipe_cost

    report = recipe_cost("llava-1.5-7b", fico.load_recipe("budgets/cdpruner_64"))
    assert report.tokens["features"] == 64
    assert report.tflops == recipe_cost("llava-1.5-7b", fico.load_recipe("budgets/divprune_64")).tflops


def test_missing_or_wrong_inputs_are_clear_errors(tiny_model, single_inputs, clip_dir, tmp_path):
    model, inputs = tiny_model(dtype=torch.float32), single_inputs(dtype=torch.float32)
    before = snapshot(model)
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.text_encoder: the signal\(s\) instruction_similarity "
                                               r"need CLIP's text tower.*override text_encoder=DIR"):
        fico.apply(model, fico.load_recipe("cdpruner"))
    narrow = tmp_path / "narrow"
    embedded.save_clip_checkpoint(narrow, vision_width=32)
    with pytest.raises(fico.RecipeError, match=r"text_encoder: .* projects 32-wide vision states; this model's "
                                               r"vision tower is 64 wide"):
        fico.apply(model, cdpruner(str(narrow)))
    assert snapshot(model)[:3] == before[:3]
    with fico.apply(model, cdpruner(clip_dir)):
        with pytest.raises(fico.InputError, match=r"rates the visual tokens by their relevance to the instruction: "
                                                  r"pass instruction="):
            model(**inputs)
        with pytest.raises(fico.InputError, match=r"instruction= takes one text or a list of 1 texts"):
            model(**inputs, instruction=["a", "b"])
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.keep: keeps 600 tokens"):
        fico.apply(model, cdpruner(clip_dir, "keep=600"))


@pytest.mark.parametrize("overrides,match", [
    (["text_encoder=/no/such/clip"], r"steps\[0\]\.text_encoder: a local CLIP checkpoint directory \(with "
                                     r"config.json\) is needed, got '/no/such/clip' \(from \$\{text_encoder\}\)"),
    (["relevance=both"], r"steps\[0\]\.filter: relevance must be negative or positive, got 'both'"),
    (["steps.0.site=llm", "steps.0.layers=[2]"], r"steps\[0\]\.text_encoder: only the pre_llm site takes it"),
])
def test_bad_knob_values_name_the_key(overrides, match):
    with pytest.raises(fico.RecipeError, match=match):
        fico.load_recipe("cdpruner", overrides)


def test_a_checkpoint_s_companion_clip_is_the_default_text_encoder(tmp_path, batch_inputs, clip_dir):
    """A checkpoint that ships its CLIP in clip/ runs CDPruner without text_encoder, exactly as
    with text_encoder naming that CLIP; without one the step is refused, naming the key."""
    import shutil

    from fico.models import check_recipes, load_model

    checkpoint = tmp_path / "llava"
    embedded.build_model(dtype=torch.float64).save_pretrained(checkpoint)
    embedded.build_processor().save_pretrained(checkpoint)
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.text_encoder: the signal\(s\) instruction_similarity"):
        check_recipes([fico.load_recipe("cdpruner")], str(checkpoint))
    shutil.copytree(clip_dir, checkpoint / "clip")
    check_recipes([fico.load_recipe("cdpruner")], str(checkpoint))
    model, _ = load_model(str(checkpoint), "float64")
    inputs = batch_inputs()
    default, _ = handed(model, inputs, fico.load_recipe("cdpruner", ["keep=40"]), QUESTIONS)
    named, _ = handed(model, inputs, cdpruner(clip_dir, "keep=40"), QUESTIONS)
    assert all(torch.equal(a, b) for a, b in zip(default, named))
