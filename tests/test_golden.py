"""Behaviour is unchanged: every bundled recipe on the toy and the embedded model gives the
recorded logits, trace and cached generate (``tests/golden.py`` says how they were recorded).

On the platform of the recording every tensor is bitwise equal; on another (other SIMD
kernels or thread count change float64 round-off) traces, refusals and generated tokens are
still equal and the values agree to round-off."""

import functools
import json

import pytest
import torch
from safetensors.torch import load_file

import golden

RECORD = json.loads(golden.RECORD.read_text())
VALUES = load_file(golden.VALUES)
SAME_PLATFORM = RECORD["platform"] == golden.platform_key()


@functools.cache
def _model(name):
    return golden.build(name)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    golden.embedded.save_clip_checkpoint(path, vision_width=64)
    return str(path)


@pytest.fixture(autouse=True)
def fixed_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(golden.THREADS)
    yield
    torch.set_num_threads(before)


def test_the_record_covers_every_bundled_recipe_on_both_models():
    assert sorted(RECORD["cases"]) == sorted(f"{m}/{r}" for m, r in golden.cases())


@pytest.mark.parametrize("key", sorted(RECORD["cases"]))
def test_behaviour_matches_the_golden_record(key, clip_dir):
    model_name, recipe_name = key.split("/", 1)
    model, batch, questions = _model(model_name)
    facts, values = golden.outcome(model, batch, questions, recipe_name, clip_dir)
    expected = RECORD["cases"][key]
    if "error" in expected or "error" in facts:
        assert facts == expected
        return
    assert facts["trace"] == expected["trace"]
    assert facts["generate_trace"] == expected["generate_trace"]
    assert facts["new_tokens"] == expected["new_tokens"]
    assert facts["logits_shape"] == expected["logits_shape"]
    if SAME_PLATFORM:
        assert facts == expected, "bitwise: the logits, sequences or generate logits changed"
    for name, value in values.items():
        torch.testing.assert_close(value, VALUES[f"{key}/{name}"], rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
