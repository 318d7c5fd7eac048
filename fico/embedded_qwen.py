"""The embedded Qwen-VL models: tiny ``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration`` and ``Qwen3VLForConditionalGeneration`` built offline.

Each keeps its family's structure where it matters for token reduction: native-resolution
images cut into 14 px patches (16 px for Qwen3-VL) and duplicated into 2 frames, a packed
batch-less vision tower, a 2 x 2 patch merger (one language-model token per 2 x 2 patches,
no [CLS], no newline), window attention in all but the ``fullatt_block_indexes`` blocks of
Qwen2.5-VL, DeepStack features from three vision blocks added after the first three decoder
layers of Qwen3-VL, and 3-row multimodal RoPE (``mrope_section``) in a GQA decoder. Widths
are tiny, the init is seeded and the tokenizer is the embedded model's word-level one with
Qwen's vision tokens added. Nothing is downloaded.

The stock ``Qwen2VLProcessor`` needs torchvision (its video processor); :func:`build_processor`
joins the stock image processor (``Qwen2VLImageProcessorPil``), the tokenizer and a chat
template in :class:`fico.processors.QwenVLProcessor`, which expands each ``<|image_pad|>`` into
the image's run of placeholders with the ``mm_token_type_ids`` the model's M-RoPE reads.

>>> from fico import embedded_qwen
>>> inputs = embedded_qwen.example_inputs("qwen2-vl", sizes=[(112, 168), (112, 112)])
>>> [int(n) for n in (inputs["input_ids"] == embedded_qwen.token_id("<|image_pad|>")).sum(1)]
[24, 16]
"""

from __future__ import annotations

import torch

from .embedded import PREPROCESSOR, WORDS, build_tokenizer, example_image

#: Qwen's special tokens, after the embedded model's words
QWEN_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>",
               "user", "assistant", "system"]
QWEN_WORDS = WORDS + QWEN_TOKENS

#: the three families, by the name ``--model embedded-<name>`` uses
FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


def token_id(token: str) -> int:
    return QWEN_WORDS.index(token)


def patch_size(family: str) -> int:
    return 16 if family == "qwen3-vl" else 14


def _check(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown Qwen-VL family {family!r}; one of {', '.join(FAMILIES)}")


def build_config(family: str = "qwen2.5-vl", vision_layers: int = 4, llm_layers: int = 4, width: int = 64,
                 vision_width: int = 32):
    """A config of ``family`` the way transformers' own tests build one: sub-configs as dicts of
    tiny sizes, no generation config. ``mrope_section`` sums to half the head width (16)."""
    _check(family)
    ids = dict(image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
               vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"))
    heads = 4
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}
    text = dict(vocab_size=len(QWEN_WORDS), hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=llm_layers, num_attention_heads=heads, num_key_value_heads=2,
                max_position_embeddings=4096, rope_parameters=rope, pad_token_id=WORDS.index("<pad>"))
    if family == "qwen2-vl":
        from transformers import Qwen2VLConfig

        vision = dict(depth=vision_layers, embed_dim=vision_width, hidden_size=width, num_heads=heads, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=dict(text, bos_token_id=1, eos_token_id=2), vision_config=vision, **ids)
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLConfig

        # every 8th block full, the rest in 8 x 8-patch windows (Qwen2.5-VL-7B: 7/15/23/31 of 32);
        # every other block in a tower of fewer than 8
        period = 8 if vision_layers >= 8 else 2
        full = tuple(i for i in range(vision_layers) if i % period == period - 1)
        vision = dict(depth=vision_layers, hidden_size=vision_width, intermediate_size=2 * vision_width,
                      num_heads=heads, out_hidden_size=width, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, fullatt_block_indexes=full)
        return Qwen2_5_VLConfig(text_config=dict(text, bos_token_id=1, eos_token_id=2), vision_config=vision, **ids)
    from transformers import Qwen3VLConfig

    # Qwen3VLTextConfig is strict: no bos/eos ids; head_dim must be set (default 128)
    rope = dict(rope, mrope_interleaved=True)
    # three DeepStack taps: Qwen3-VL-8B's 8/16/24 of 27 blocks; 1/2/3 in a tiny tower
    deepstack = (8, 16, 24) if vision_layers >= 25 else tuple(range(1, min(4, vision_layers)))
    vision = dict(depth=vision_layers, hidden_size=vision_width, intermediate_size=2 * vision_width, num_heads=heads,
                  out_hidden_size=width, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=576, deepstack_visual_indexes=deepstack)
    return Qwen3VLConfig(text_config=dict(text, head_dim=width // heads, rope_parameters=rope), vision_config=vision,
                         **ids)


#: (vision blocks, decoder layers) of the checkpoints each family is known by: Qwen2-VL-7B,
#: Qwen2.5-VL-7B, Qwen3-VL-8B
REAL_DEPTHS = {"qwen2-vl": (32, 28), "qwen2.5-vl": (32, 28), "qwen3-vl": (27, 36)}


def real_depth_config(family: str):
    """A config of ``family`` at its 7B/8B checkpoint's depth (tiny widths): what plans and
    support tables are checked on."""
    vision_layers, llm_layers = REAL_DEPTHS[family]
    return build_config(family, vision_layers=vision_layers, llm_layers=llm_layers)


def model_class(family: str):
    _check(family)
    import transformers

    return getattr(transformers, {"qwen2-vl": "Qwen2VLForConditionalGeneration",
                                  "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
                                  "qwen3-vl": "Qwen3VLForConditionalGeneration"}[family])


def build_model(family: str = "qwen2.5-vl", seed: int = 0, dtype: torch.dtype = torch.float32,
                attn_implementation: str = "sdpa", **config_kwargs):
    """A seeded, randomly initialised tiny model of ``family`` in eval mode."""
    config = build_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = model_class(family)(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype)


def build_image_processor(family: str = "qwen2.5-vl", max_pixels: int = 28 * 28 * 1280):
    """The stock ``Qwen2VLImageProcessorPil`` with the family's patch size, Qwen's default pixel
    range (images resized to multiples of two patches, at most ``max_pixels``) and CLIP's
    normalisation."""
    import warnings

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch = patch_size(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                        min_pixels=4 * patch * patch * 4, max_pixels=max_pixels,
                                        image_mean=PREPROCESSOR["image_mean"], image_std=PREPROCESSOR["image_std"])


def build_tokenizer_qwen():
    """The embedded word-level tokenizer over :data:`QWEN_WORDS` (no BOS: Qwen adds none), with
    Qwen's ``<|...|>`` tokens special, so that they split from the words around them."""
    from tokenizers import AddedToken

    tokenizer = build_tokenizer(QWEN_WORDS)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_TOKENS if t.startswith("<|")],
                         special_tokens=True)
    return tokenizer


#: Qwen's chat format (the structure of the published Qwen2-VL template, restated): each
#: message in im_start/im_end with its role, an image as a vision block
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def prompt(question: str, images: int = 1) -> str:
    """Qwen's chat format around ``question``, one vision block per image (the family's own)."""
    from .adapters.families.qwen2_vl import Qwen2VL

    return Qwen2VL().prompt(question, images)


def build_processor(family: str = "qwen2.5-vl"):
    """A :class:`fico.processors.QwenVLProcessor` of the stock image processor, the embedded
    tokenizer and Qwen's chat format (the stock processor needs torchvision)."""
    from .processors import QwenVLProcessor

    return QwenVLProcessor(build_image_processor(family), build_tokenizer_qwen(), CHAT_TEMPLATE)


def example_inputs(family: str = "qwen2.5-vl", sizes: list[tuple[int, int]] | None = None,
                   prompts: list[str] | None = None, seeds: list[int] | None = None, processor=None) -> dict:
    """Model inputs for ``prompts`` with one image each, of ``sizes`` (height, width), left-padded:
    ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values`` (packed patches)
    and ``image_grid_thw``."""
    sizes = sizes or [(336, 448)]
    prompts = prompts or [prompt("what is the color of the circle ?")] * len(sizes)
    seeds = seeds or list(range(len(sizes)))
    images = [example_image(seed).resize((w, h)) for seed, (h, w) in zip(seeds, sizes)]
    return (processor or build_processor(family))(images=images, text=prompts)
