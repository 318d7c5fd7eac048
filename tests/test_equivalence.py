"""tome, evit and fastv equal straightforward implementations of the originals (float64, 1e-6)."""

import math

import pytest
import torch

import fico
from reference import (assert_same_token_set, evit_hidden_states, fastv_logits, projected_features,
                       tome_hidden_states)


def image_features(model, pixel_values):
    return model.model.get_image_features(pixel_values=pixel_values).pooler_output


@pytest.mark.parametrize("r,layers", [(16, "all"), (40, [0, 2]), (300, [1])])
def test_tome_equals_original(tiny_model, batch_inputs, r, layers):
    model = tiny_model()
    pixels = batch_inputs()["pixel_values"]
    n_layers = len(model.model.vision_tower.encoder.layers)
    chosen = range(n_layers) if layers == "all" else layers
    recipe = fico.load_recipe("tome", overrides=[f"r={r}", f"layers={layers if layers == 'all' else list(layers)}"])
    with torch.no_grad():
        expected = projected_features(model, tome_hidden_states(
            model.model.vision_tower, pixels, [r if i in chosen else 0 for i in range(n_layers)]))
        with fico.apply(model, recipe) as run:
            actual = image_features(model, pixels)
    for got, want in zip(actual, expected):
        assert_same_token_set(got, want)
    assert run.trace.vision_features == expected.shape[1]


def test_tome_without_proportional_attention_differs(tiny_model, single_inputs):
    """Proportional attention is really applied: switching it off changes the features."""
    model = tiny_model()
    pixels = single_inputs()["pixel_values"]
    with torch.no_grad():
        with fico.apply(model, fico.load_recipe("tome", ["r=16"])):
            with_prop = image_features(model, pixels)[0]
        no_prop = fico.load_recipe("tome", ["r=16", "steps.0.proportional_attention=false"])
        with fico.apply(model, no_prop):
            without = image_features(model, pixels)[0]
        expected = projected_features(model, tome_hidden_states(model.model.vision_tower, pixels, [16] * 4,
                                                                prop_attn=False))[0]
    assert_same_token_set(without, expected)
    assert (with_prop - without).abs().max() > 1e-6


@pytest.mark.parametrize("keep_rate,layers,fuse", [(0.7, [0, 2], True), (0.5, [1], False), (0.9, [0, 1, 2], True)])
def test_evit_equals_original(tiny_model, batch_inputs, keep_rate, layers, fuse):
    model = tiny_model()
    pixels = batch_inputs()["pixel_values"]
    recipe = fico.load_recipe("evit", overrides=[f"keep_rate={keep_rate}", f"layers={layers}",
                                                 f"fuse={str(fuse).lower()}"])
    with torch.no_grad():
        expected = projected_features(model, evit_hidden_states(model.model.vision_tower, pixels, keep_rate,
                                                                layers, fuse))
        with fico.apply(model, recipe):
            actual = image_features(model, pixels)
    for got, want in zip(actual, expected):
        assert_same_token_set(got, want)


def test_evit_keep_count_uses_ceil(tiny_model):
    model = tiny_model()
    with fico.apply(model, fico.load_recipe("evit", ["keep_rate=0.3", "layers=[0]"])) as run:
        planned = run.plan.vision.mid_steps[0]
    assert planned.remove == 576 - math.ceil(0.3 * 576)
    assert planned.tokens_out == 577 - planned.remove + 1  # the fused token


@pytest.mark.parametrize("k,ratio", [(2, 0.5), (1, 0.75), (3, 0.25)])
def test_fastv_equals_original_per_sample(tiny_model, batch_inputs, k, ratio):
    model = tiny_model()
    inputs = batch_inputs()
    with torch.no_grad():
        expected, keep = fastv_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                      k, ratio)
        with fico.apply(model, fico.load_recipe("fastv", [f"k={k}", f"ratio={ratio}"])) as run:
            actual = model(**inputs).logits
    assert actual.shape == expected.shape
    real = torch.gather(inputs["attention_mask"].bool(), 1, keep)
    assert (actual - expected)[real].abs().max() < 1e-6
    removed = round(ratio * 576)
    assert run.trace.llm[k - 1] == inputs["input_ids"].shape[1]
    assert run.trace.llm[k] == inputs["input_ids"].shape[1] - removed
    assert run.trace.steps[0].removed == removed


def test_fastv_selection_is_per_sample(tiny_model, batch_inputs):
    """The two samples keep different visual tokens (the original used sample 0's for all)."""
    model = tiny_model()
    inputs = batch_inputs()
    with torch.no_grad():
        _, keep = fastv_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], 2, 0.5)
    image = inputs["input_ids"] == model.config.image_token_id
    first = [int(i) - int(image[0].nonzero()[0]) for i in keep[0] if image[0, i]]
    second = [int(i) - int(image[1].nonzero()[0]) for i in keep[1] if image[1, i]]
    assert first != second
