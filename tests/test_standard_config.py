"""Models built from their config classes the way transformers' own tests build them.

transformers' LLaVA tests write ``LlavaConfig(vision_config=..., text_config=..., image_token_id=...)``
with the pad token only in the text config: such a config has no top-level ``pad_token_id``
and the model no generation config of its own. fico must not read what the class does not
guarantee; every bundled recipe runs on such a model, in forward and in cached generate.
"""

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import fico
from fico import embedded

# every bundled recipe at its defaults fits a model with LLaVA-1.5's depths (24 CLIP, 32 decoder layers),
# except LLaVA-NeXT budgets whose per-image keep exceeds LLaVA-1.5's 576 visual tokens
NEXT_ONLY = [n for n in fico.bundled_recipes() if "_next_" in n and fico.load_recipe(n).config.get("keep", 0) > 576]
#: the [CLS]-free forms, for towers without [CLS] (Qwen-VL)
CLS_FREE = [n for n in fico.bundled_recipes() if "_cls_free_" in n]
RECIPES = [n for n in fico.bundled_recipes() if n not in NEXT_ONLY + CLS_FREE]


def standard_config() -> LlavaConfig:
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=24, num_attention_heads=4, projection_dim=32)
    text = LlamaConfig(vocab_size=len(embedded.WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=32,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=embedded.WORDS.index("<image>"),
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


@pytest.fixture(scope="module")
def standard_model():
    config = standard_config()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    assert "pad_token_id" not in config.to_dict(), "the premise: no top-level pad_token_id"
    with pytest.raises(AttributeError):
        config.pad_token_id  # noqa: B018
    return model


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    embedded.save_clip_checkpoint(path, vision_width=32)
    return str(path)


@pytest.fixture(scope="module")
def padded_batch():
    processor = embedded.build_processor()
    return embedded.example_inputs(processor, prompts=["USER: <image> what is the color of the circle ? ASSISTANT:",
                                                       "USER: <image> how many objects ? ASSISTANT:"], seeds=[1, 2])


@pytest.mark.parametrize("name", NEXT_ONLY)
def test_a_next_budget_above_576_tokens_is_refused_naming_its_keep(standard_model, name):
    recipe = fico.load_recipe(name)
    before = [(type(m), len(m._forward_hooks), len(m._forward_pre_hooks)) for m in standard_model.modules()]
    with pytest.raises(fico.RecipeError, match=r"keep: keeps 640 tokens .* only 576 reducible tokens"):
        fico.apply(standard_model, recipe)
    assert [(type(m), len(m._forward_hooks), len(m._forward_pre_hooks)) for m in standard_model.modules()] == before


@pytest.mark.parametrize("name", CLS_FREE)
def test_a_cls_free_form_is_refused_naming_its_signal(standard_model, name):
    with pytest.raises(fico.RecipeError, match=r"cannot give the signal\(s\) attention_received on LLaVA-1.5"):
        fico.apply(standard_model, fico.load_recipe(name))


@pytest.mark.parametrize("name", RECIPES)
def test_every_bundled_recipe_runs_on_a_standard_config(standard_model, padded_batch, clip_dir, name):
    overrides = [f"text_encoder={clip_dir}"] if "cdpruner" in name else []
    recipe = fico.load_recipe(name, overrides)
    instruction = recipe.instruction_inputs(["what is the color of the circle ?", "how many objects ?"])
    with torch.no_grad(), fico.apply(standard_model, recipe) as run:
        logits = standard_model(**padded_batch, **instruction).logits
        out = standard_model.generate(**padded_batch, **instruction, max_new_tokens=2, do_sample=False,
                                      output_logits=True, return_dict_in_generate=True)
    assert torch.isfinite(logits).all()
    assert out.sequences.shape == (2, padded_batch["input_ids"].shape[1] + 2)
    assert torch.equal(out.sequences[:, :padded_batch["input_ids"].shape[1]], padded_batch["input_ids"])
    # the cached decode's first step is the prefill's last position. Row 0 only: it has no
    # padding, and a forward without position_ids numbers a padded row's pads as tokens while
    # generate numbers from the mask (DART's L1 norms of post-RoPE keys see the difference)
    assert torch.allclose(out.logits[0][0], logits[0, -1], atol=1e-4)
    assert run.trace.llm, "the trace records the prefill"
