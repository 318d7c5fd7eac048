"""CLIP's text tower as an auxiliary model: the instruction in CLIP's joint space (CDPruner).

LLaVA keeps only CLIP's vision tower; methods that rate visual tokens by their relevance to
the instruction (CDPruner) take CLIP's text tower, text projection and visual projection
from the CLIP checkpoint the vision tower came from, given as a local directory (the
step's ``text_encoder``, or the one a checkpoint ships beside its files: ``clip/``, as
fico-toy does; nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import RecipeError


class ClipTextTower(nn.Module):
    """The instruction's CLIP text embeddings and the image side's CLIP projection.

    Runs in float32 (float64 for a float64 model), as the official CDPruner code keeps its
    CLIP text tower and projection in the checkpoint's float32.
    """

    def __init__(self, tokenizer, text_model: nn.Module, text_projection: nn.Linear, visual_projection: nn.Linear,
                 source: str):
        super().__init__()
        self.tokenizer, self.text_model, self.source = tokenizer, text_model, source
        self.text_projection, self.visual_projection = text_projection, visual_projection
        self.segment = text_model.config.max_position_embeddings

    @classmethod
    def load(cls, path: str, device: torch.device, dtype: torch.dtype, key: str) -> "ClipTextTower":
        """From a local CLIP checkpoint ``path`` (``CLIPModel``'s files); ``key`` names the recipe key."""
        from transformers import AutoTokenizer, CLIPModel

        if not (Path(path) / "config.json").is_file():
            raise RecipeError(f"{key}: {path!r} is not a local CLIP checkpoint (no config.json)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            clip = CLIPModel.from_pretrained(path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise RecipeError(f"{key}: cannot load a CLIPModel and its tokenizer from {path!r}: {error}") from None
        # the vision tower itself is the LLaVA model's; CLIP's copy is dropped
        return cls(tokenizer, clip.text_model.eval(), clip.text_projection, clip.visual_projection, path).to(device)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_projection.weight.dtype

    @torch.no_grad()
    def text_embeddings(self, text: str) -> Tensor:
        """``(M, P)`` unit-norm embeddings of ``text``'s token ids in ``M`` consecutive segments of
        the text tower's length (77): tokenised without truncation, zero-padded (ids and mask)
        to a multiple of it, as the official code does."""
        inputs = self.tokenizer(text=[text], return_tensors="pt")
        length = inputs["input_ids"].shape[1]
        segments = (length - 1) // self.segment + 1
        padding = segments * self.segment - length
        device = self.visual_projection.weight.device
        inputs = {k: torch.cat([v, v.new_zeros(v.shape[0], padding)], 1).reshape(-1, self.segment).to(device)
                  for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        # CLIPTextModelWithProjection's text_embeds: the projected state at the end token
        return F.normalize(self.text_projection(self.text_model(**inputs).pooler_output), dim=-1)

    @torch.no_grad()
    def image_embeddings(self, normed_hidden: Tensor) -> Tensor:
        """``(B, N, P)`` unit-norm CLIP image embeddings of vision states already through the
        tower's post-layernorm."""
        return F.normalize(self.visual_projection(normed_hidden.to(self.dtype)), dim=-1)


def instruction_similarity(image: Tensor, text: Tensor) -> Tensor:
    r"""``(N,)`` mean cosine similarity of each unit image embedding ``image`` ``(N, P)`` to the
    instruction's unit segment embeddings ``text`` ``(M, P)``: :math:`\bar s_i = \frac1M \sum_m e^v_i \cdot e^t_m`."""
    return (image @ text.T).mean(-1)


#: where a checkpoint ships the CLIP its vision tower came from (a ``CLIPModel`` directory)
COMPANION_CLIP = "clip"


def companion_clip(config) -> str | None:
    """The CLIP checkpoint shipped beside a model's own files (``COMPANION_CLIP`` in the
    directory ``from_pretrained`` read it from; fico-toy ships one), or None. A step that needs
    a text tower and names none (``text_encoder``) takes it."""
    source = getattr(config, "_name_or_path", "") or ""
    path = Path(source) / COMPANION_CLIP if source else None
    return str(path) if path is not None and (path / "config.json").is_file() else None


def text_tower_for(recipe, step, device: torch.device, model_dtype: torch.dtype, vision_width: int,
                   companion: str | None = None) -> ClipTextTower:
    """The text tower ``step`` names (``text_encoder:``, else the model's ``companion`` CLIP)
    for a vision tower ``vision_width`` wide, loaded once per recipe, device and dtype (float64
    models get a float64 tower, others float32)."""
    key = f"{recipe.source}: {step.where}.text_encoder"
    source = step.text_encoder or companion
    dtype = torch.float64 if model_dtype == torch.float64 else torch.float32
    cache = (source, str(device), dtype)
    if cache not in recipe.auxiliary:
        tower = ClipTextTower.load(source, device, dtype, key)
        if tower.visual_projection.in_features != vision_width:
            raise RecipeError(f"{key}: {source!r} projects {tower.visual_projection.in_features}-wide "
                              f"vision states; this model's vision tower is {vision_width} wide (a different CLIP?)")
        recipe.auxiliary[cache] = tower
    return recipe.auxiliary[cache]


def instruction_signals(tower: ClipTextTower, post_layernorm: nn.Module, tokens: Tensor,
                        instructions: list[str]) -> dict[str, Tensor]:
    """``instruction_similarity`` of the feature-layer states ``tokens`` ``(B, N, C)`` of images
    whose instructions are ``instructions``: CLIP's image side is the vision tower's
    ``post_layernorm`` (which LLaVA itself leaves unused) and CLIP's visual projection."""
    image = tower.image_embeddings(post_layernorm(tokens))
    texts = {text: tower.text_embeddings(text) for text in dict.fromkeys(instructions)}
    return {"instruction_similarity": torch.stack([instruction_similarity(image[i], texts[text])
                                                   for i, text in enumerate(instructions)])}
