"""LLaVA-NeXT: ``transformers.LlavaNextForConditionalGeneration`` with a CLIP vision tower and a
Llama-architecture language model. The only file that names LLaVA-NeXT's modules.

LLaVA-NeXT encodes each image as a base crop and the high-resolution crops of its best anyres
resolution, one CLIP pass each, and packs them (:mod:`fico.adapters.families.anyres`): 1176 to
2928 visual tokens per image at 336 px crops, one newline per row of the high-resolution grid.

Sites, in the order a forward pass meets them:

* **vision**: inside each CLIP layer, per crop (every crop has its own [CLS]).
* **vision_output**: per crop, the tokens of ``hidden_states[vision_feature_layer]``.
* **pre_llm**: per image, the packed features (newlines included) before the language model.
* **llm**, **llm_mid**: in the decoder (:mod:`fico.adapters.decoder`), with 1-D RoPE.

Every recipe goes through the wrapped ``forward`` and ``generate``: the images are encoded
first (tower, vision_output step, feature selection, projector, position-aware packing,
pre_llm step), each image's placeholder run is rebuilt to its own count, and the features
reach the model as ``mm_encoder_outputs``. With nothing removed the packing is the stock one
value for value. Each visual token carries its layout (image, part 0 base / 1 high
resolution, row, column); newlines are visual tokens no step discards or merges. A pre_llm
``keep: K`` counts the rows entering the language model per image, newlines included.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import InputError
from ...hookspecs import hookimpl
from ...recipe.plan import Geometry
from ...run import ReductionRun
from ...state import TokenState
from ..decoder import LLM_SIGNALS, LLMSite
from ..forward import ForwardPasses
from ..placeholders import check_placeholder_runs, padding_token_id, rebuild_placeholders
from ..positions import RotaryPositions
from ..steps import image_removal, run_point_step
from ..towers.clip import VISION_OUTPUT_SIGNALS, VISION_SIGNALS, VisionSite, patch_grid
from .anyres import PackedImage, anyres_grids, anyres_tokens, pack_image
from .llava import Llava, LlavaEncoder, LlavaGeometry


class LlavaNext(Llava):
    """LLaVA-NeXT (LLaVA-1.6): anyres crops of a CLIP tower, a projector, a Llama-architecture
    decoder."""

    name = "LLaVA-NeXT"
    supported = ("transformers.LlavaNextForConditionalGeneration with a CLIP vision tower and a "
                 "Llama-architecture language model")
    checkpoint_classes = {"llava_next": "LlavaNextForConditionalGeneration"}
    # instruction signals would need each packed token's CLIP feature: not offered yet
    site_signals = {"vision": VISION_SIGNALS, "vision_output": VISION_OUTPUT_SIGNALS,
                    "pre_llm": set(),
                    "llm": LLM_SIGNALS, "llm_mid": LLM_SIGNALS - {"final_normed_hidden"}}
    # [CLS] as a feature (VisionZip) has no cell: the packer keeps it as a created token
    options = frozenset({"proportional_attention", "cls_feature"})

    def supports(self, model) -> bool:
        from transformers import LlavaNextForConditionalGeneration
        from transformers.models.clip.modeling_clip import CLIPVisionModel

        return (isinstance(model, LlavaNextForConditionalGeneration)
                and isinstance(model.model.vision_tower, CLIPVisionModel)
                and hasattr(model.model.language_model, "layers"))

    def supports_config(self, config) -> bool:
        from transformers import CLIPVisionConfig, LlavaNextConfig

        return isinstance(config, LlavaNextConfig) and isinstance(config.vision_config, CLIPVisionConfig)

    def planning_geometry(self, config) -> Geometry:
        counts = super().planning_geometry(config)
        largest = max(config.image_grid_pinpoints, key=lambda size: stock_count(config, size))
        return Geometry(counts.vision_layers, counts.vision_tokens, counts.feature_index, counts.drops_cls,
                        counts.llm_layers, image_tokens=stock_count(config, largest),
                        image_grids=image_grids(config, largest))

    def attach(self, run: ReductionRun, model, plan) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv, rotate_half

        geo = self.geometry(model.config)
        passes = ForwardPasses()
        inner = model.model
        vision = VisionSite(run, inner.vision_tower, plan, geo.feature_index, geo.drops_cls, passes)
        vision.attach()
        NextEncoder(run, model, geo, plan, vision, passes).attach()
        positions = RotaryPositions(rotate_half, apply_rotary_pos_emb, repeat_kv)
        LLMSite(run, plan.llm, inner, inner.language_model, geo.image_token_id, passes, geo.placeholders_per_image,
                patch_grid(geo.placeholders_per_image), positions).attach()


def image_grids(config, image_size) -> tuple[tuple[int, int], tuple[int, int]]:
    """The base grid and the unpadded high-resolution grid of an image of ``image_size``."""
    vision = config.vision_config
    return anyres_grids(image_size, config.image_grid_pinpoints, vision.image_size, vision.patch_size)[2]


def stock_count(config, image_size) -> int:
    """Visual tokens LLaVA-NeXT gives an image of ``image_size`` (height, width)."""
    return anyres_tokens(image_grids(config, image_size))


class NextEncoder(LlavaEncoder):
    """The vision_output and pre_llm sites of LLaVA-NeXT, the position-aware packing, and the
    placeholder rebuild at the entry points."""

    def __init__(self, run: ReductionRun, model, geo: LlavaGeometry, plan, vision: VisionSite,
                 passes: ForwardPasses):
        super().__init__(run, model, geo, plan, vision, passes)
        self.needed = bool(plan.planned_steps())

    def prepare(self, call: dict) -> dict:
        """``call`` with the images encoded and packed, and the placeholders matching them."""
        call = dict(call)
        call.pop("instruction", None)
        ids, pixels, sizes = call.get("input_ids"), call.get("pixel_values"), call.get("image_sizes")
        if pixels is None or ids is None or ids.shape[1] <= 1 or call.get("mm_encoder_outputs") is not None:
            return call
        if sizes is None:
            raise InputError("fico: LLaVA-NeXT needs image_sizes with pixel_values (its processor gives both)")
        if call.get("position_ids") is not None:
            raise InputError("fico: explicit position_ids cannot be combined with LLaVA-NeXT's image packing; "
                             "leave them to the model")
        if sizes.is_meta or pixels.is_meta:
            raise InputError("fico: LLaVA-NeXT's packing reads each image's size; it cannot run on the meta device")
        config = self.model.config
        sizes = [[int(v) for v in size] for size in sizes.tolist()]
        stock = [stock_count(config, size) for size in sizes]
        check_placeholder_runs(ids, self.geo.image_token_id, stock, "image_sizes, LLaVA-NeXT's anyres")
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        packed = self.encode_images(pixels, sizes)
        new = {k: v for k, v in call.items() if k != "pixel_values"}
        features = [p.features for p in packed]
        new["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        counts = [f.shape[0] for f in features]
        new = rebuild_placeholders(new, counts, self.geo.image_token_id, stock, padding_token_id(config))
        current = self.passes.ensure()
        current.image_patches = torch.cat([p.cells for p in packed])
        current.visual_layout = torch.cat([p.layout for p in packed])
        current.protected_visual = torch.cat([p.newline for p in packed])
        current.visual_grids = tuple(tuple(max(p.grids[part][d] for p in packed) for d in range(2))
                                     for part in range(2))
        self.run.trace.vision_features = counts[0] if len(set(counts)) == 1 else counts
        passes = [anyres_grids(size, config.image_grid_pinpoints, config.vision_config.image_size,
                               config.vision_config.patch_size)[0] for size in sizes]
        self.run.trace.vision_passes = passes[0] if len(set(passes)) == 1 else passes
        return new

    def encode_images(self, pixel_values: Tensor, sizes: list[list[int]]) -> list[PackedImage]:
        """Per image: its features packed as LLaVA-NeXT packs them, after every vision-side step."""
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        config, inner = self.model.config, self.model.model
        crop, patch = config.vision_config.image_size, config.vision_config.patch_size
        layouts = [anyres_grids(size, config.image_grid_pinpoints, crop, patch) for size in sizes]
        passes = [n for n, _, _ in layouts]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, passes)])
        crops, cells = [], []
        for tokens, pos in self.select_features(pixel_values):
            projected = inner.multi_modal_projector(tokens)  # the whole batch of crops, as the model does
            crops += list(projected)
            cells += list(torch.where(pos > 0, pos - 1, -1))
        g = crop // patch
        packed, first = [], 0
        for index, (size, (n, shape, _)) in enumerate(zip(sizes, layouts)):
            image = pack_image(crops[first:first + n], cells[first:first + n], shape, g, size, inner.image_newline,
                               unpad_image, image=index)
            first += n
            if self.plan.pre_llm is not None:
                with self.run.work():
                    image = self._pre_llm_image(image, g)
            packed.append(image)
        return packed

    def _pre_llm_image(self, image: PackedImage, g: int) -> PackedImage:
        """The pre_llm step on one packed image. ``keep: K`` counts its rows, newlines included
        (an image of at most K rows keeps them all); other schedules count its candidates, and
        a filter's own count (``keep: filter``) follows from the image's grids."""
        planned = self.plan.pre_llm
        n = image.features.shape[0]
        candidate = ~image.newline[None]
        remove = image_removal(planned, n, int(candidate.sum()), image.grids)
        positions = torch.arange(n, device=image.features.device)[None]
        state = TokenState(hidden=image.features[None], positions=positions, candidate=candidate,
                           visual=torch.ones_like(candidate), text=torch.zeros_like(candidate),
                           patch=image.cells[None], grid=(g, g), layout=image.layout[None], grids=image.grids,
                           site="pre_llm", layer=0,
                           sources=torch.eye(n, device=positions.device)[None] if self.run.provenance else None)
        [new] = run_point_step(self.run, planned, state, remove)
        kept = new.positions[0]
        created = kept < 0
        source = kept.clamp_min(0)
        return PackedImage(features=new.hidden[0],
                           layout=torch.where(created[:, None], -1, image.layout[source]),
                           newline=image.newline[source] & ~created,
                           cells=torch.where(created, -1, image.cells[source]), grids=image.grids)


@hookimpl
def fico_model_families():
    return [LlavaNext]
