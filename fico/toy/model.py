"""The fico-toy architecture, tokenizer and processor, and loading the shipped weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelNotFoundError
from .data import GRID, VOCAB

WEIGHTS = Path(__file__).resolve().parent / "weights"


def build_tokenizer():
    from ..embedded import build_tokenizer as word_level

    return word_level(VOCAB)


def build_processor():
    from ..embedded import build_processor as llava_processor

    return llava_processor(build_tokenizer())


def build_config():
    """LLaVA-1.5's geometry (336 px, 14 px patches, 24 CLIP layers, feature layer -2) at
    tiny widths, with a 6-layer Llama so every bundled recipe's default layers exist."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=64, intermediate_size=256,
                              num_hidden_layers=24, num_attention_heads=4, projection_dim=64)
    text = LlamaConfig(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=384, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=VOCAB.index("<pad>"), bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=VOCAB.index("<image>"),
                       vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
                       pad_token_id=VOCAB.index("<pad>"), tie_word_embeddings=False)


def load(path: str | Path | None = None, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """The trained toy model and its processor (from ``path``, default: the shipped weights)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path or WEIGHTS)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"no trained fico-toy weights in {path}: train them with `python -m fico.toy.train`, "
                          "or use --model embedded / --model shaped")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                          local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(path, local_files_only=True)


GRID_SIDE = GRID
