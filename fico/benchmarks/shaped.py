"""A LLaVA-1.5-shaped model for timing: real layer and token counts, reduced widths.

CLIP ViT-L/14-336's geometry (24 layers on 577 tokens) and Vicuna-7B's depth (32 decoder
layers on ~640 tokens), at half CLIP's width (512) and a quarter of Vicuna-7B's (1024):
a few seconds per prefill on two CPU cores. Narrower models measure the CPU's small-matrix
inefficiency more than the reduction (see docs/benchmarks.md). Weights are random
(seeded): use it for speed, not for accuracy.
"""

from __future__ import annotations

import torch

IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001


def build_shaped_7b(dtype: torch.dtype = torch.float16, attn_implementation: str = "sdpa", seed: int = 0,
                    device: str = "cpu"):
    """LLaVA-1.5-7B's real architecture (CLIP ViT-L/14-336, Vicuna-7B widths and depths) with
    random weights, built directly on ``device`` (about 14 GB in float16: for a GPU)."""
    from transformers import LlavaForConditionalGeneration

    from ..cost.model import BUILTIN_SPECS, llava_config

    config = llava_config(BUILTIN_SPECS["llava-1.5-7b"])
    config.image_token_id, config.pad_token_id = IMAGE_TOKEN_ID, PAD_TOKEN_ID
    config.text_config.pad_token_id = PAD_TOKEN_ID
    config.text_config.vocab_size = 32064
    torch.manual_seed(seed)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LlavaForConditionalGeneration(config).eval()
        finally:
            torch.set_default_dtype(previous)
    model.set_attn_implementation(attn_implementation)
    return model


def build_shaped_model(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", seed: int = 0,
                       vision_width: int = 512, llm_width: int = 1024, llm_layers: int = 32):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=vision_width,
                              intermediate_size=4 * vision_width, num_hidden_layers=24,
                              num_attention_heads=vision_width // 64, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=llm_width, intermediate_size=int(llm_width * 2.6875),
                       num_hidden_layers=llm_layers, num_attention_heads=llm_width // 64,
                       num_key_value_heads=llm_width // 64, max_position_embeddings=4096,
                       pad_token_id=PAD_TOKEN_ID)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=576, pad_token_id=PAD_TOKEN_ID)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval().to(dtype)
    model.set_attn_implementation(attn_implementation)
    return model


def shaped_inputs(batch: int = 1, prefix_tokens: int = 5, text_tokens: int = 59, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> dict:
    """``prefix + 576 image placeholders + text`` (640 tokens by default) and a random image."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(2, 32000, (batch, prefix_tokens), generator=g)
    text = torch.randint(2, 32000, (batch, text_tokens), generator=g)
    image = torch.full((batch, 576), IMAGE_TOKEN_ID)
    ids = torch.cat([prefix, image, text], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, 336, 336, generator=g).to(dtype),
    }


def architecture(model) -> str:
    """The model's depths and widths, e.g. ``CLIP 24 x 512 on 577 tokens, Llama 32 x 1024``."""
    vision, text = model.config.vision_config, model.config.text_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    return (f"CLIP {vision.num_hidden_layers} x {vision.hidden_size} on {tokens} tokens, "
            f"Llama {text.num_hidden_layers} x {text.hidden_size}")
