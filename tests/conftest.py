import functools

import pytest
import torch

from fico import embedded


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """Rich wraps at the terminal's width (80 when piped, as in CI); tests read content, not layout."""
    monkeypatch.setenv("COLUMNS", "200")


@functools.cache
def _model(dtype, attn, vision_layers, llm_layers):
    return embedded.build_model(seed=0, dtype=dtype, attn_implementation=attn,
                                vision_layers=vision_layers, llm_layers=llm_layers)


@pytest.fixture(scope="session")
def processor():
    return embedded.build_processor()


@pytest.fixture
def tiny_model():
    """Factory of small seeded LLaVA models (shared per configuration; tests must leave them vanilla)."""
    def make(dtype=torch.float64, attn="sdpa", vision_layers=4, llm_layers=4):
        model = _model(dtype, attn, vision_layers, llm_layers)
        assert getattr(model, "_fico_run", None) is None, "a previous test left a recipe applied"
        return model
    return make


@pytest.fixture
def batch_inputs(processor):
    """Two left-padded prompts of different lengths, one image each."""
    def make(dtype=torch.float64):
        inputs = embedded.example_inputs(processor, prompts=[
            "USER: <image> what is the color of the circle ? ASSISTANT:",
            "USER: <image> how many objects ? ASSISTANT:",
        ], seeds=[1, 2])
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs
    return make


@pytest.fixture
def single_inputs(processor):
    def make(dtype=torch.float64, seed=0):
        inputs = embedded.example_inputs(processor, seeds=[seed])
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs
    return make
