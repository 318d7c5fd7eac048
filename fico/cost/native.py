"""Analytic cost of the native-resolution families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): a packed
vision tower whose token count follows the image's size, a 2 x 2 patch merger, a GQA decoder.

An image of height x width pixels is resized as the Qwen image processor does
(``smart_resize``: each side rounded to a multiple of ``patch x merge`` pixels, the area
brought within ``[min_pixels, max_pixels]``) and cut into ``h x w`` patches of ``patch`` px;
every patch is a token of the tower, every 2 x 2 patches one token of the language model.
Unlike LLaVA's (4.6% of the prefill at 336 px), the tower is 22-59% of Qwen2-VL-7B's
prefill, so ``fico cost`` counts it by default here (convention ``full``), matrix
multiplications only, with 2 FLOPs per multiply-add:

* patch embedding: ``2 N (3 t p^2) C`` for ``N = h w`` patches (a Conv3d over ``t = 2``
  frames);
* each block: ``2 N C (3C) + 2 N C^2`` (fused qkv, output) ``+ 4 C sum_s n_s^2`` (scores and
  weighted sum over each attention segment ``s``: the whole image in full-attention blocks,
  each window of ``window x window`` patches in Qwen2.5-VL's other blocks, smaller at the
  edges) ``+ 2 m N C F`` (an MLP of ``m`` matrices: 2 in Qwen2-VL and Qwen3-VL, SwiGLU's 3
  in Qwen2.5-VL);
* the merger, and each of Qwen3-VL's DeepStack mergers: ``2 (N/4) (4C 4C + 4C D)``;
* the decoder and lm_head as for LLaVA (:mod:`fico.cost.model`), on the merged tokens that
  reach it, with GQA key/value width ``kv_heads x head_dim``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..recipe.plan import Geometry

#: the image every count defaults to: 672 x 672 px gives 576 visual tokens (LLaVA-1.5's count)
DEFAULT_IMAGE = (672, 672)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size the Qwen image processor resizes an image to: each side a multiple of
    ``factor``, the area within ``[min_pixels, max_pixels]``, the aspect ratio kept as well as
    that allows (the processor's own rule, restated)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an image's aspect ratio must be below 200, got {height} x {width}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@dataclass(frozen=True)
class NativeSpec:
    """Architecture numbers of a native-resolution model (a Qwen-VL family)."""

    name: str
    family: str
    patch_size: int
    merge: int
    temporal_patch: int
    vision_layers: int
    vision_hidden: int
    vision_ffn: int
    vision_mlp_matrices: int
    vision_heads: int
    llm_layers: int
    llm_hidden: int
    llm_ffn: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    vocab: int
    tied_embeddings: bool = False
    #: blocks with attention over the whole image; None: every block
    full_attention_blocks: tuple[int, ...] | None = None
    #: side of an attention window in patches (Qwen2.5-VL: 8), in the other blocks
    window: int = 0
    deepstack_mergers: int = 0
    #: the published image processor's pixel range
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384

    #: the token count depends on the image's size (``fico cost --image-size``)
    depends_on_image_size = True
    drops_cls = False
    grid_pinpoints = ()
    default_convention = "full"

    @property
    def kv_width(self) -> int:
        return self.llm_kv_heads * self.llm_head_dim

    def patch_grid(self, image_size=None) -> tuple[int, int]:
        """``(h, w)`` patches of an image of ``image_size`` (height, width; default
        :data:`DEFAULT_IMAGE`)."""
        height, width = image_size or DEFAULT_IMAGE
        h, w = smart_resize(int(height), int(width), self.patch_size * self.merge, self.min_pixels, self.max_pixels)
        return h // self.patch_size, w // self.patch_size

    @property
    def patches(self) -> int:
        """Patches of the default image."""
        h, w = self.patch_grid()
        return h * w

    def image(self, image_size=None) -> tuple[int, int, tuple]:
        """``(tower passes, visual tokens reaching the LLM, grids)`` of one image."""
        h, w = self.patch_grid(image_size)
        rows, cols = h // self.merge, w // self.merge
        return 1, rows * cols, ((rows, cols),)

    def geometry(self, image_size=None) -> Geometry:
        _, tokens, grids = self.image(image_size)
        return Geometry(self.vision_layers, tokens, self.vision_layers, False, self.llm_layers,
                        image_tokens=tokens, image_grids=grids)

    def segments(self, block: int, grid: tuple[int, int]) -> list[int]:
        """Patches in each attention segment of ``block`` for an image of ``grid`` patches."""
        h, w = grid
        if not self.window or self.full_attention_blocks is None or block in self.full_attention_blocks:
            return [h * w]
        side = self.window
        return [min(side, h - i) * min(side, w - j) for i in range(0, h, side) for j in range(0, w, side)]

    def vision_entries(self, counts) -> list[dict]:
        """Per-part FLOPs of the tower and the mergers on one image of ``counts.image_size``
        (nothing in them is reduced), as :meth:`fico.cost.model.ModelSpec.vision_entries`."""
        grid = self.patch_grid(counts.image_size)
        n, c, f = grid[0] * grid[1], self.vision_hidden, self.vision_ffn
        entries = [{"site": "vision", "layer": "patch_embedding", "tokens": n,
                    "flops": 2.0 * n * 3 * self.temporal_patch * self.patch_size ** 2 * c}]
        for block in range(self.vision_layers):
            attention = sum(4.0 * s * s * c for s in self.segments(block, grid))
            flops = 2.0 * n * c * 3 * c + 2.0 * n * c * c + attention + 2.0 * self.vision_mlp_matrices * n * c * f
            entries.append({"site": "vision", "layer": block, "tokens": n, "flops": flops})
        groups, width = n // self.merge ** 2, c * self.merge ** 2
        merger = 2.0 * groups * (width * width + width * self.llm_hidden)
        for index in range(1 + self.deepstack_mergers):
            entries.append({"site": "merger", "layer": index, "tokens": groups, "flops": merger})
        return entries

    def parameters(self) -> dict[str, int]:
        """Parameter counts by part (weights and biases, as the modules hold them; norms as one
        or two vectors)."""
        c, f, d = self.vision_hidden, self.vision_ffn, self.llm_hidden
        block = 3 * c * c + 3 * c + c * c + c + self.vision_mlp_matrices * c * f + 2 * f + 2 * c + 4 * c
        width = c * self.merge ** 2
        merger = width * width + width + width * d + d + 2 * width
        vision = (3 * self.temporal_patch * self.patch_size ** 2 * c + self.vision_layers * block
                  + (1 + self.deepstack_mergers) * merger)
        q = self.llm_heads * self.llm_head_dim
        layer = d * q + q + 2 * (d * self.kv_width + self.kv_width) + q * d + 3 * d * self.llm_ffn + 2 * d
        llm = self.vocab * d + self.llm_layers * layer + d
        head = 0 if self.tied_embeddings else self.vocab * d
        return {"vision": vision, "projector": 0, "llm": llm, "lm_head": head}


NATIVE_SPECS = {
    # Qwen/Qwen2-VL-7B-Instruct: a 32-block ViT (1280 wide, MLP 5120, quick-GELU), Qwen2-7B
    "qwen2-vl-7b": NativeSpec("qwen2-vl-7b", "Qwen2-VL", 14, 2, 2, 32, 1280, 5120, 2, 16,
                              28, 3584, 18944, 28, 4, 128, 152064, min_pixels=3136, max_pixels=12845056),
    # Qwen/Qwen2.5-VL-7B-Instruct: SwiGLU blocks (3420), full attention in 7/15/23/31, 8 x 8-patch
    # windows elsewhere
    "qwen2.5-vl-7b": NativeSpec("qwen2.5-vl-7b", "Qwen2.5-VL", 14, 2, 2, 32, 1280, 3420, 3, 16,
                                28, 3584, 18944, 28, 4, 128, 152064, full_attention_blocks=(7, 15, 23, 31),
                                window=8, min_pixels=3136, max_pixels=12845056),
    # Qwen/Qwen3-VL-8B-Instruct: 16 px patches, 27 blocks (1152 wide, MLP 4304), 3 DeepStack
    # mergers; Qwen3-8B with head_dim 128
    "qwen3-vl-8b": NativeSpec("qwen3-vl-8b", "Qwen3-VL", 16, 2, 2, 27, 1152, 4304, 2, 16,
                              36, 4096, 12288, 32, 8, 128, 151936, deepstack_mergers=3,
                              min_pixels=65536, max_pixels=16777216),
}

#: transformers' config class -> (family, MLP matrices)
_CONFIGS = {"Qwen2VLConfig": ("Qwen2-VL", 2), "Qwen2_5_VLConfig": ("Qwen2.5-VL", 3), "Qwen3VLConfig": ("Qwen3-VL", 2)}


def is_native_config(config) -> bool:
    return type(config).__name__ in _CONFIGS


def pixel_range(image_processor: dict) -> dict[str, int] | None:
    """``min_pixels``/``max_pixels`` of a Qwen image processor's settings (its
    ``preprocessor_config.json``, or ``size``), where they are given."""
    size = image_processor.get("size") or {}
    low = image_processor.get("min_pixels", size.get("shortest_edge"))
    high = image_processor.get("max_pixels", size.get("longest_edge"))
    if isinstance(low, int) and isinstance(high, int):
        return {"min_pixels": low, "max_pixels": high}
    return None


def native_spec_from_config(config, name: str = "config", pixels: dict[str, int] | None = None) -> NativeSpec:
    """A :class:`NativeSpec` from a ``Qwen2VLConfig``, ``Qwen2_5_VLConfig`` or ``Qwen3VLConfig``.
    The pixel range belongs to the image processor, not the model: ``pixels`` (see
    :func:`pixel_range`), else the family's published processor's."""
    family, matrices = _CONFIGS[type(config).__name__]
    vision, text = config.vision_config, config.text_config
    if family == "Qwen2-VL":
        width, ffn = vision.embed_dim, vision.embed_dim * vision.mlp_ratio
    else:
        width, ffn = vision.hidden_size, vision.intermediate_size
    full = tuple(vision.fullatt_block_indexes) if family == "Qwen2.5-VL" else None
    window = vision.window_size // vision.patch_size if family == "Qwen2.5-VL" else 0
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    pixels = pixels or (dict(min_pixels=65536, max_pixels=16777216) if family == "Qwen3-VL" else
                        dict(min_pixels=3136, max_pixels=12845056))
    return NativeSpec(name, family, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size,
                      vision.depth, width, ffn, matrices, vision.num_heads, text.num_hidden_layers, text.hidden_size,
                      text.intermediate_size, text.num_attention_heads,
                      text.num_key_value_heads or text.num_attention_heads, head_dim, text.vocab_size,
                      bool(getattr(config, "tie_word_embeddings", False)), full, window,
                      len(getattr(vision, "deepstack_visual_indexes", ()) or ()), **pixels)
