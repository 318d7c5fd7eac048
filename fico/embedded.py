"""The embedded default: a tiny LLaVA-1.5-shaped model built offline.

Same geometry as LLaVA-1.5 where it matters for token reduction (336 px images, 14 px
patches, so 576 image tokens; [CLS]; ``vision_feature_layer=-2``; ``default`` feature
selection; a Llama decoder with GQA), at tiny widths, from a seeded init and an in-code
word-level tokenizer. Nothing is downloaded.

>>> from fico import embedded
>>> model = embedded.build_model()
>>> inputs = embedded.example_inputs(embedded.build_processor())
>>> inputs["input_ids"].shape
torch.Size([1, 587])
"""

from __future__ import annotations

import random

import torch

WORDS = [
    "<unk>", "<s>", "</s>", "<pad>", "<image>", "USER:", "ASSISTANT:", "what", "is", "the", "color", "shape",
    "of", "object", "how", "many", "objects", "are", "there", "in", "image", "?", "red", "green", "blue",
    "yellow", "circle", "square", "triangle", "yes", "no", "left", "right", "top", "bottom", "describe",
    "a", "and", ".", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
]
IMAGE_TOKEN = "<image>"

#: llava-hf/llava-1.5-7b-hf's preprocessor_config.json values.
PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": 336},
}


def build_tokenizer(words: list[str] | None = None):
    """A word-level tokenizer over ``words`` (default: the embedded model's), built in code.

    ``<image>`` is an added special token, so the processor's run of placeholders written
    without spaces splits correctly.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(words or WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", padding_side="left",
                                        extra_special_tokens={"image_token": IMAGE_TOKEN})
    return tokenizer


def build_processor(tokenizer=None):
    """A ``LlavaProcessor`` with LLaVA-1.5's image preprocessing and an in-code tokenizer."""
    import warnings

    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = CLIPImageProcessorPil.from_dict(dict(PREPROCESSOR))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_config(vision_layers: int = 24, llm_layers: int = 32, width: int = 64):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=width, intermediate_size=4 * width,
                              num_hidden_layers=vision_layers, num_attention_heads=4, projection_dim=width)
    text = LlamaConfig(vocab_size=len(WORDS), hidden_size=width, intermediate_size=4 * width,
                       num_hidden_layers=llm_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=WORDS.index(IMAGE_TOKEN),
                       vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
                       pad_token_id=3)


CLIP_WORDS = WORDS + ["<|startoftext|>", "<|endoftext|>"]


def clip_tokenizer(words: list[str]):
    """A word-level tokenizer shaped like CLIP's: ``words`` (with ``<unk>``) then the begin and
    end tokens, which take the two highest ids as in CLIP's vocabulary; every text is wrapped
    in them, and the end token pads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = list(words) + ["<|startoftext|>", "<|endoftext|>"]
    bos, eos = len(vocabulary) - 2, len(vocabulary) - 1
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<|startoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def save_clip_checkpoint(path, vision_width: int = 64, seed: int = 0, projection_dim: int = 32, text_width: int = 32,
                         text_layers: int = 2) -> None:
    """Save a tiny seeded ``CLIPModel`` and a word-level CLIP-style tokenizer to ``path``: the
    local CLIP checkpoint that instruction-conditioned methods (CDPruner's ``text_encoder``)
    take their text tower and projections from. Its vision width matches a model built by
    :func:`build_model` with ``width=vision_width``; like CLIP's, its begin/end tokens have the
    highest ids and text runs in segments of 77 tokens. ``text_width=768, text_layers=12,
    projection_dim=768`` give CLIP-L's text tower shape (for timings).
    """
    from transformers import CLIPConfig, CLIPModel

    tokenizer = clip_tokenizer(WORDS)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    config = CLIPConfig(
        text_config=dict(vocab_size=len(CLIP_WORDS), hidden_size=text_width, intermediate_size=4 * text_width,
                         num_hidden_layers=text_layers, num_attention_heads=max(1, text_width // 64),
                         max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos, projection_dim=projection_dim),
        vision_config=dict(image_size=336, patch_size=14, hidden_size=vision_width, intermediate_size=2 * vision_width,
                           num_hidden_layers=1, num_attention_heads=4, projection_dim=projection_dim),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)


def build_model(seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **config_kwargs):
    """A seeded, randomly initialised tiny ``LlavaForConditionalGeneration`` in eval mode."""
    from transformers import LlavaForConditionalGeneration

    config = build_config(**config_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype)


def example_image(seed: int = 0):
    """A deterministic 336 x 336 picture of a few coloured shapes."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (336, 336), (rng.randrange(200, 256),) * 3)
    draw = ImageDraw.Draw(image)
    colors = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
    for _ in range(rng.randrange(2, 6)):
        x, y, s = rng.randrange(0, 280), rng.randrange(0, 280), rng.randrange(24, 56)
        fill = colors[rng.choice(list(colors))]
        if rng.random() < 0.5:
            draw.ellipse([x, y, x + s, y + s], fill=fill)
        else:
            draw.rectangle([x, y, x + s, y + s], fill=fill)
    return image


def example_inputs(processor, prompts: list[str] | None = None, seeds: list[int] | None = None):
    """Processor outputs for ``prompts`` (one image each), left-padded as for generation."""
    if prompts is None:
        from .adapters.families.llava import Llava

        prompts = [Llava().prompt("what is the color of the circle ?")]
    seeds = seeds or list(range(len(prompts)))
    images = [example_image(s) for s in seeds]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)
