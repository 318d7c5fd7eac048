"""Qwen3-VL: ``transformers.Qwen3VLForConditionalGeneration``. The only file that names
Qwen3-VL's modules.

Its sites are Qwen2-VL's (:mod:`.qwen2_vl`) with what Qwen3-VL adds:

* **DeepStack**: the vision blocks of ``deepstack_visual_indexes`` feed extra mergers, and
  level i of their features is added to the visual tokens after decoder layer i, through a
  mask over the unreduced sequence. A decoder step before the last injection (a step at the
  input of layer k <= 2, or inside one) would make that mask and those rows the wrong
  length; the injections are re-indexed to the tokens present (the kept visual tokens get
  their own rows; created tokens and ghost slots get none). A pre_llm step moves each
  level's features exactly as it moves the merged tokens (they travel with them through the
  compressor, :attr:`fico.TokenState.carried`), so a drop keeps the same rows of every
  level and a merge averages them alike.
* **q/k norms**: queries and keys are RMS-normalised per head before RoPE; decoder signals
  take them after the norm.
* 16 px patches (32 px per visual token), full attention in every vision block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...hookspecs import hookimpl
from ...run import ReductionRun
from ..decoder import LLMSite
from ..hooks import set_instance_attr
from .qwen2_vl import EncodedImages, Qwen2VL, QwenEncoder


class Qwen3VL(Qwen2VL):
    """Qwen3-VL: a ViT with DeepStack mergers and a Qwen3 decoder (q/k norms, interleaved M-RoPE)."""

    name = "Qwen3-VL"
    supported = "transformers.Qwen3VLForConditionalGeneration"
    checkpoint_classes = {"qwen3_vl": "Qwen3VLForConditionalGeneration"}
    model_class, config_class, modeling = "Qwen3VLForConditionalGeneration", "Qwen3VLConfig", "qwen3_vl"
    qk_norm = True

    def encoder(self, run, model, plan, passes) -> QwenEncoder:
        return DeepStackEncoder(run, model, plan, passes, self.tower_signals(model, plan))

    def attach_decoder_extras(self, run: ReductionRun, model, site: LLMSite) -> None:
        """The DeepStack injections re-indexed to the tokens present (:meth:`LLMSite.present_rows`)."""
        language_model = model.model.language_model
        original = language_model._deepstack_process

        def _deepstack_process(hidden_states: Tensor, visual_pos_masks: Tensor, visual_embeds: Tensor) -> Tensor:
            mask, rows = site.present_rows(visual_pos_masks.to(hidden_states.device), visual_embeds)
            return original(hidden_states, mask, rows)

        if site.plan.steps or site.plan.mid_steps:
            set_instance_attr(run, language_model, "_deepstack_process", _deepstack_process)


class DeepStackEncoder(QwenEncoder):
    def encode(self, pixel_values: Tensor, grid: Tensor) -> EncodedImages:
        out = self.model.model.get_image_features(pixel_values, grid, return_dict=True)
        return DeepStackImages(list(out.pooler_output), [list(level) for level in out.deepstack_features])


class DeepStackImages(EncodedImages):
    """Merged tokens with their DeepStack features, one list per level, per image."""

    def __init__(self, features: list[Tensor], levels: list[list[Tensor]]):
        super().__init__(features)
        self.levels = levels

    def carried(self, index: int) -> Tensor:
        return torch.cat([level[index] for level in self.levels], -1)

    def output(self, reduced: list[Tensor], carried: list[Tensor]):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        widths = [level[0].shape[-1] for level in self.levels]
        per_image = [c.split(widths, -1) for c in carried]
        levels = [[image[level] for image in per_image] for level in range(len(self.levels))]
        return BaseModelOutputWithDeepstackFeatures(pooler_output=reduced, deepstack_features=levels)


@hookimpl
def fico_model_families():
    return [Qwen3VL]
