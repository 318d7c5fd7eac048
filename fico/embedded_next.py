"""The embedded LLaVA-NeXT: a tiny ``LlavaNextForConditionalGeneration`` built offline.

LLaVA-NeXT's geometry (llava-hf/llava-v1.6-vicuna-7b-hf) where it matters for token
reduction: 336 px crops of 14 px patches (576 tokens each, [CLS] first), the anyres grid
pinpoints, the base image plus the crops of the best-fitting resolution, the high-resolution
grid unpadded to the image's aspect ratio with one newline token per row,
``vision_feature_layer=-2`` and ``default`` selection; a Llama decoder with GQA; tiny widths,
a seeded init, and the embedded model's word-level tokenizer. ``crop=56`` gives the same
structure at 4 x 4 patches per crop (for tests: 16-70 visual tokens per image). Nothing is
downloaded.

>>> from fico import embedded_next
>>> processor = embedded_next.build_processor(crop=56)
>>> inputs = embedded_next.example_inputs(processor, sizes=[(56, 56), (100, 150)])
>>> [int(n) for n in (inputs["input_ids"] == embedded_next.image_token_id()).sum(1)]
[36, 70]
"""

from __future__ import annotations

import torch

from .embedded import IMAGE_TOKEN, PREPROCESSOR, WORDS, build_tokenizer, example_image

#: the crop sizes (multiples of the crop) anyres chooses from, in crops: llava-v1.6's
#: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] at 336 px
PINPOINTS = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]


def image_token_id() -> int:
    return WORDS.index(IMAGE_TOKEN)


def pinpoints(crop: int) -> list[list[int]]:
    return [[h * crop, w * crop] for h, w in PINPOINTS]


def build_config(vision_layers: int = 24, llm_layers: int = 32, width: int = 64, crop: int = 336):
    """A ``LlavaNextConfig`` the way transformers' own tests build one (no top-level
    ``pad_token_id``, no generation config)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(image_size=crop, patch_size=14, hidden_size=width, intermediate_size=4 * width,
                              num_hidden_layers=vision_layers, num_attention_heads=4, projection_dim=width)
    text = LlamaConfig(vocab_size=len(WORDS), hidden_size=width, intermediate_size=4 * width,
                       num_hidden_layers=llm_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=8192, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=image_token_id(),
                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                           image_grid_pinpoints=pinpoints(crop), image_seq_length=(crop // 14) ** 2)


def build_model(seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                **config_kwargs):
    """A seeded, randomly initialised tiny ``LlavaNextForConditionalGeneration`` in eval mode."""
    from transformers import LlavaNextForConditionalGeneration

    config = build_config(**config_kwargs)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype)


def build_processor(tokenizer=None, crop: int = 336):
    """A ``LlavaNextProcessor`` with LLaVA-NeXT's image preprocessing (PIL backend) at ``crop``
    px crops and the embedded model's tokenizer."""
    import warnings

    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    settings = dict(PREPROCESSOR, crop_size={"height": crop, "width": crop}, size={"shortest_edge": crop},
                    image_grid_pinpoints=pinpoints(crop), do_pad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = LlavaNextImageProcessorPil.from_dict(settings)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(),
                              patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)


def example_image_of_size(seed: int, size: tuple[int, int]):
    """The embedded model's example picture resized to ``size`` (height, width)."""
    height, width = size
    return example_image(seed).resize((width, height))


def example_inputs(processor, prompts: list[str] | None = None, sizes: list[tuple[int, int]] | None = None,
                   seeds: list[int] | None = None):
    """Processor outputs for ``prompts`` with one image each, of ``sizes`` (height, width),
    left-padded as for generation."""
    sizes = sizes or [(336, 448)]
    prompts = prompts or ["USER: <image>\nwhat is the color of the circle ? ASSISTANT:"] * len(sizes)
    seeds = seeds or list(range(len(sizes)))
    images = [example_image_of_size(seed, size) for seed, size in zip(seeds, sizes)]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)
