"""LLaVA-1.5-, LLaVA-NeXT- and Qwen2.5-VL-shaped models for timing: real layer and token
counts, reduced widths.

CLIP ViT-L/14-336's geometry (24 layers on 577 tokens) and Vicuna-7B's depth (32 decoder
layers on ~640 tokens), at half CLIP's width (512) and a quarter of Vicuna-7B's (1024):
a few seconds per prefill on two CPU cores. Narrower models measure the CPU's small-matrix
inefficiency more than the reduction (see docs/benchmarks.md). Weights are random
(seeded): use it for speed, not for accuracy.

The NeXT-shaped model (``build_shaped_next_model``) is the same towers with
llava-v1.6's anyres pinpoints; its timed image is 672 x 672, the most tokens NeXT gives one
image: five CLIP passes of 576 patch tokens (2880), packed into 576 base + 48 x 48
high-resolution cells + 48 newlines = 2928 visual tokens entering the language model.

The Qwen2.5-VL-shaped model (``build_shaped_qwen2_5_vl``) has Qwen2.5-VL-7B's depths, windowed
tower and M-RoPE decoder; its timed image is 896 x 1120 px: 5120 patches in the tower, 1280
visual tokens entering the language model (Qwen's default cap per image).
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
    return _built_on(device, config, LlavaForConditionalGeneration, dtype, attn_implementation, seed)


def _built_on(device: str, config, model_class, dtype: torch.dtype, attn_implementation: str, seed: int):
    """``model_class(config)`` initialised directly on ``device`` in ``dtype`` (a 7B model is
    never materialised in float32 on the CPU first)."""
    torch.manual_seed(seed)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = model_class(config).eval()
        finally:
            torch.set_default_dtype(previous)
    model.set_attn_implementation(attn_implementation)
    return model


#: llava-v1.6's anyres resolutions (height, width), and the NeXT-shaped model's timed image
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
NEXT_IMAGE_SIZE = (672, 672)


def _towers(vision_width: int, llm_width: int, llm_layers: int, vision_layers: int = 24):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=vision_width,
                              intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
                              num_attention_heads=vision_width // 64, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=llm_width, intermediate_size=int(llm_width * 2.6875),
                       num_hidden_layers=llm_layers, num_attention_heads=llm_width // 64,
                       num_key_value_heads=llm_width // 64, max_position_embeddings=4096,
                       pad_token_id=PAD_TOKEN_ID)
    return vision, text


def _built(config, model_class, dtype: torch.dtype, attn_implementation: str, seed: int):
    torch.manual_seed(seed)
    model = model_class(config).eval().to(dtype)
    model.set_attn_implementation(attn_implementation)
    return model


def build_shaped_model(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", seed: int = 0,
                       vision_width: int = 512, llm_width: int = 1024, llm_layers: int = 32):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision, text = _towers(vision_width, llm_width, llm_layers)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=576, pad_token_id=PAD_TOKEN_ID)
    return _built(config, LlavaForConditionalGeneration, dtype, attn_implementation, seed)


def build_shaped_next_model(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", seed: int = 0,
                            vision_width: int = 512, llm_width: int = 1024, llm_layers: int = 32,
                            vision_layers: int = 24):
    """The shaped model's towers as a ``LlavaNextForConditionalGeneration`` with llava-v1.6's
    anyres pinpoints (LLaVA-NeXT's token counts: up to 2928 visual tokens per image)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    vision, text = _towers(vision_width, llm_width, llm_layers, vision_layers)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=NEXT_PINPOINTS, image_seq_length=576)
    return _built(config, LlavaNextForConditionalGeneration, dtype, attn_implementation, seed)


def build_shaped_next_7b(dtype: torch.dtype = torch.float16, attn_implementation: str = "sdpa", seed: int = 0,
                         device: str = "cpu"):
    """LLaVA-NeXT-7B's real architecture (llava-v1.6-vicuna-7b: CLIP ViT-L/14-336 with anyres,
    Vicuna-7B) with random weights, built directly on ``device`` (about 14 GB in float16)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from ..cost.model import BUILTIN_SPECS, llava_config

    flat = llava_config(BUILTIN_SPECS["llava-1.5-7b"])
    flat.text_config.pad_token_id = PAD_TOKEN_ID
    flat.text_config.vocab_size = 32064
    config = LlavaNextConfig(vision_config=flat.vision_config.to_dict(), text_config=flat.text_config.to_dict(),
                             image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=NEXT_PINPOINTS,
                             image_seq_length=576)
    return _built_on(device, config, LlavaNextForConditionalGeneration, dtype, attn_implementation, seed)


def _prompt(batch: int, prefix_tokens: int, text_tokens: int, image_tokens: int, g: torch.Generator) -> dict:
    prefix = torch.randint(2, 32000, (batch, prefix_tokens), generator=g)
    text = torch.randint(2, 32000, (batch, text_tokens), generator=g)
    image = torch.full((batch, image_tokens), IMAGE_TOKEN_ID)
    ids = torch.cat([prefix, image, text], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def shaped_inputs(batch: int = 1, prefix_tokens: int = 5, text_tokens: int = 59, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> dict:
    """``prefix + 576 image placeholders + text`` (640 tokens by default) and a random image."""
    g = torch.Generator().manual_seed(seed)
    inputs = _prompt(batch, prefix_tokens, text_tokens, 576, g)
    return {**inputs, "pixel_values": torch.randn(batch, 3, 336, 336, generator=g).to(dtype)}


def shaped_next_inputs(model, batch: int = 1, prefix_tokens: int = 5, text_tokens: int = 59, seed: int = 0,
                       dtype: torch.dtype = torch.float32, image_size: tuple[int, int] = NEXT_IMAGE_SIZE) -> dict:
    """What LLaVA-NeXT's processor gives an image of ``image_size`` (random crops): ``prefix +
    its visual placeholders + text`` (2928 placeholders at 672 x 672) and ``pixel_values`` of
    shape (B, passes, 3, 336, 336) with ``image_sizes``."""
    from ..cost.model import spec_from_config

    crop = model.config.vision_config.image_size
    passes, tokens, _ = spec_from_config(model.config).image(image_size)
    g = torch.Generator().manual_seed(seed)
    inputs = _prompt(batch, prefix_tokens, text_tokens, tokens, g)
    return {**inputs, "pixel_values": torch.randn(batch, passes, 3, crop, crop, generator=g).to(dtype),
            "image_sizes": torch.tensor([list(image_size)] * batch)}


#: the Qwen2.5-VL-shaped model's timed image: 896 x 1120 px, 64 x 80 patches, 1280 visual tokens
#: (the most Qwen's default ``max_pixels``, 28 x 28 x 1280, lets one image have)
QWEN_IMAGE_SIZE = (896, 1120)


def build_shaped_qwen2_5_vl(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", seed: int = 0,
                            vision_width: int = 320, llm_width: int = 512, vision_layers: int = 32,
                            llm_layers: int = 28):
    """Qwen2.5-VL-7B's depths and structure (32 tower blocks, full attention in 7/15/23/31 and
    8 x 8-patch windows elsewhere, SwiGLU, the 2 x 2 merger; 28 GQA decoder layers of 128-wide
    heads with M-RoPE sections 16/24/24) at a quarter of its tower's width (1280) and a seventh
    of its decoder's (3584), random weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = llm_width // 128
    text = dict(vocab_size=32064, hidden_size=llm_width, intermediate_size=int(llm_width * 18944 / 3584),
                num_hidden_layers=llm_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=32768, pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    vision = dict(depth=vision_layers, hidden_size=vision_width, intermediate_size=int(vision_width * 3420 / 1280),
                  num_heads=vision_width // 80, out_hidden_size=llm_width, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=(7, 15, 23, 31))
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                              video_token_id=IMAGE_TOKEN_ID + 1, vision_start_token_id=IMAGE_TOKEN_ID + 2,
                              vision_end_token_id=IMAGE_TOKEN_ID + 3)
    return _built(config, Qwen2_5_VLForConditionalGeneration, dtype, attn_implementation, seed)


def shaped_qwen_inputs(model, batch: int = 1, prefix_tokens: int = 5, text_tokens: int = 59, seed: int = 0,
                       dtype: torch.dtype = torch.float32, image_size: tuple[int, int] = QWEN_IMAGE_SIZE) -> dict:
    """What Qwen's processor gives an image of ``image_size`` (random pixels): ``prefix + its
    placeholders + text`` with ``mm_token_type_ids``, and packed ``pixel_values`` with
    ``image_grid_thw``."""
    vision = model.config.vision_config
    patch, merge, frames = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    h, w = image_size[0] // patch, image_size[1] // patch
    if h % merge or w % merge:
        raise ValueError(f"{image_size}: each side must be a multiple of {patch * merge} px")
    g = torch.Generator().manual_seed(seed)
    inputs = _prompt(batch, prefix_tokens, text_tokens, h * w // merge ** 2, g)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE_TOKEN_ID).int()
    pixels = torch.randn(batch * h * w, 3 * frames * patch * patch, generator=g).to(dtype)
    return {**inputs, "pixel_values": pixels, "image_grid_thw": torch.tensor([[1, h, w]] * batch)}


def architecture(model) -> str:
    """The model's depths and widths, e.g. ``CLIP 24 x 512 on 577 tokens, Llama 32 x 1024``
    (``anyres`` where the model is a LLaVA-NeXT)."""
    if hasattr(model.model, "visual"):  # a native-resolution tower (Qwen-VL)
        vision, text = model.config.vision_config, model.config.text_config
        width = getattr(vision, "embed_dim", None) or vision.hidden_size
        return (f"{type(model.model.visual).__name__} {vision.depth} x {width}, 2 x 2 merger, "
                f"{type(model.model.language_model).__name__} {text.num_hidden_layers} x {text.hidden_size}")
    vision, text = model.config.vision_config, model.config.text_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    anyres = " per anyres pass" if getattr(model.config, "image_grid_pinpoints", None) else ""
    return (f"CLIP {vision.num_hidden_layers} x {vision.hidden_size} on {tokens} tokens{anyres}, "
            f"Llama {text.num_hidden_layers} x {text.hidden_size}")
