"""Qwen2.5-VL: ``transformers.Qwen2_5_VLForConditionalGeneration``. The only file that names
Qwen2.5-VL's modules.

Its language-model side is Qwen2-VL's (:mod:`.qwen2_vl`: the pre_llm site with gathered
M-RoPE positions, the decoder sites); its tower differs: SwiGLU blocks, RMSNorm, and window
attention (8 x 8 patches) in every block but ``fullatt_block_indexes`` (7, 15, 23, 31 of 32
in the 7B model), with the tokens in window order inside the tower and restored to raster
order after the merger. So a global attention signal over an image exists only at its
full-attention blocks.
"""

from __future__ import annotations

from ...hookspecs import hookimpl
from .qwen2_vl import Qwen2VL


class Qwen2_5_VL(Qwen2VL):
    """Qwen2.5-VL: Qwen2-VL with a windowed SwiGLU tower."""

    name = "Qwen2.5-VL"
    supported = "transformers.Qwen2_5_VLForConditionalGeneration"
    checkpoint_classes = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
    model_class, config_class, modeling = "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", "qwen2_5_vl"

    def full_attention_blocks(self, vision_config) -> list[int]:
        """Only ``fullatt_block_indexes``: the other blocks attend within 8 x 8-patch windows."""
        return sorted(vision_config.fullatt_block_indexes)

    def window_order(self, model):
        tower = model.model.visual
        window_index = self.modeling_module().get_vision_window_index

        def order(grid_thw):
            return window_index(grid_thw, spatial_merge_size=tower.spatial_merge_size,
                                window_size=tower.window_size, patch_size=tower.patch_size)[0]

        return order


@hookimpl
def fico_model_families():
    return [Qwen2_5_VL]
