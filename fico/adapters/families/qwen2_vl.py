"""Qwen2-VL: ``transformers.Qwen2VLForConditionalGeneration``. The only file that names
Qwen2-VL's modules; Qwen2.5-VL and Qwen3-VL (:mod:`.qwen2_5_vl`, :mod:`.qwen3_vl`) differ from
it in their towers and, for Qwen3-VL, the DeepStack features.

A Qwen-VL image is resized to a multiple of 28 px (32 px for Qwen3-VL), cut into 14 px
patches, and each 2 x 2 patches become one language-model token through the patch merger:
``t h w / 4`` visual tokens on the image's own ``h/2 x w/2`` grid, no [CLS], no newline. The
decoder places them with multimodal RoPE: three position rows (time, height, width) that
``get_rope_index`` derives from the unreduced prompt and each image's grid.

Sites, in the order a forward pass meets them:

* **pre_llm**: per image, the merged tokens before the language model. The images are
  encoded first, each image's run of placeholders is rebuilt to the tokens it keeps, and the
  model gets explicit 4-row ``position_ids``: the text row contiguous, the three M-RoPE rows
  of the unreduced prompt gathered at the kept tokens (so every kept token keeps its 3-D
  position), and ``rope_deltas`` set for a decode loop that leaves positions to the model.
* **llm**, **llm_mid**: in the decoder (:mod:`fico.adapters.decoder`); its rotary embedding
  folds the three rows into per-token cos/sin, so gathering them keeps each token's 3-D
  position, and decode steps continue the original numbering.

There is no site inside the vision tower: it packs every image into one batch-less
sequence (``cu_seqlens``) and the merger joins each 4 consecutive rows, so a token removed
inside it would silently join patches of different 2 x 2 groups; recipes with vision or
vision_output steps are refused with a :class:`fico.RecipeError` that says so.

Each visual token carries its layout (image, part 0, row, column on its image's merged grid).
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from ...errors import InputError, RecipeError
from ...hookspecs import hookimpl
from ...recipe import Recipe
from ...recipe.plan import Geometry, RecipePlan
from ...run import ReductionRun
from ...state import TokenState
from ..decoder import LLM_SIGNALS, LLMSite
from ..entry import wrap_entry_points
from ..family import ModelFamily
from ..forward import ForwardPasses
from ..hooks import hook
from ..placeholders import check_placeholder_runs, padding_token_id, rebuild_kept_placeholders
from ..positions import MultimodalRotaryPositions
from ..steps import image_removal, run_point_step
from ..towers.packed_vit import PACKED_VIT_SIGNALS, PackedTowerSignals

#: visual tokens the plan counts an image as: Qwen's default ``max_pixels`` (28 x 28 x 1280 px)
#: gives at most 1280 merged tokens. Runs count each image's own (a keep above it keeps all).
PLANNED_IMAGE_TOKENS = 1280
PLANNED_GRID = (32, 40)
#: signals the vision side of these towers cannot give: there is no [CLS] token
CLS_SIGNALS = {"cls_attention", "next_cls_attention_fullwidth", "next_keys_fullwidth"}


class Qwen2VL(ModelFamily):
    """Qwen2-VL: a native-resolution ViT with a 2 x 2 patch merger and a Qwen2 decoder with
    multimodal RoPE."""

    name = "Qwen2-VL"
    supported = "transformers.Qwen2VLForConditionalGeneration"
    checkpoint_classes = {"qwen2_vl": "Qwen2VLForConditionalGeneration"}
    site_signals = {"pre_llm": PACKED_VIT_SIGNALS, "llm": LLM_SIGNALS,
                    "llm_mid": LLM_SIGNALS - {"final_normed_hidden"}}
    options = frozenset({"vision_layer"})
    #: transformers' names: the model and config classes, the modeling module
    model_class, config_class, modeling = "Qwen2VLForConditionalGeneration", "Qwen2VLConfig", "qwen2_vl"
    #: queries and keys RMS-normalised per head before RoPE (Qwen3)
    qk_norm = False

    def supports(self, model) -> bool:
        import transformers

        return type(model) is getattr(transformers, self.model_class)

    def supports_config(self, config) -> bool:
        import transformers

        return type(config) is getattr(transformers, self.config_class)

    def planning_geometry(self, config) -> Geometry:
        depth = config.vision_config.depth
        return Geometry(depth, PLANNED_IMAGE_TOKENS, depth, False, config.get_text_config().num_hidden_layers,
                        image_tokens=PLANNED_IMAGE_TOKENS, image_grids=(PLANNED_GRID,))

    def check_recipe(self, recipe: Recipe, config, runs: bool = True) -> RecipePlan:
        """Also: no step inside the vision tower (see the module's docstring)."""
        for step in recipe.steps:
            if step.site in ("vision", "vision_output"):
                lacking = sorted(step.required_signals() & CLS_SIGNALS)
                cls = f"; nor has its tower a [CLS] token for the signal(s) {', '.join(lacking)}" if lacking else ""
                raise RecipeError(
                    f"{recipe.source}: {step.where}.site: {self.name} has no {step.site} site: its vision tower "
                    f"packs every image into one sequence and its patch merger joins each 4 consecutive patches "
                    f"(a 2 x 2 group), so a token removed inside the tower would silently join patches of "
                    f"different groups{cls}. Reduce at pre_llm (one token per 2 x 2 patches) or in the decoder "
                    f"(llm, llm_mid)")
        plan = super().check_recipe(recipe, config, runs)
        if plan.pre_llm is not None and plan.pre_llm.step.required_signals() & PACKED_VIT_SIGNALS:
            self.signal_block(config, plan.pre_llm.step, recipe.source)
        return plan

    def full_attention_blocks(self, vision_config) -> list[int]:
        """The vision blocks whose attention spans each whole image."""
        return list(range(vision_config.depth))

    def signal_block(self, config, step, source: str = "") -> int:
        """The vision block a pre_llm step's tower signals read: its ``vision_layer`` (checked
        to be a block with full attention), else the last full-attention block."""
        full = self.full_attention_blocks(config.vision_config)
        depth = config.vision_config.depth
        if step.vision_layer is None:
            return full[-1]
        block = step.vision_layer + depth if step.vision_layer < 0 else step.vision_layer
        if block not in full:
            raise RecipeError(f"{source}: {step.where}.vision_layer: {step.vision_layer} is not a vision block of "
                              f"{self.name} whose attention spans the whole image; those are "
                              f"{', '.join(map(str, full))} (of {depth})")
        return block

    def modeling_module(self):
        return importlib.import_module(f"transformers.models.{self.modeling}.modeling_{self.modeling}")

    def attach(self, run: ReductionRun, model, plan: RecipePlan) -> None:
        modeling = self.modeling_module()
        passes = ForwardPasses()
        inner = model.model
        encoder = self.encoder(run, model, plan, passes)
        encoder.attach()
        positions = MultimodalRotaryPositions(modeling.rotate_half, modeling.apply_rotary_pos_emb, modeling.repeat_kv)
        site = LLMSite(run, plan.llm, inner, inner.language_model, model.config.image_token_id, passes,
                       PLANNED_IMAGE_TOKENS, PLANNED_GRID, positions, self.qk_norm)
        site.attach()
        self.attach_decoder_extras(run, model, site)

    def encoder(self, run: ReductionRun, model, plan: RecipePlan, passes: ForwardPasses) -> "QwenEncoder":
        return QwenEncoder(run, model, plan, passes, self.tower_signals(model, plan))

    def tower_signals(self, model, plan: RecipePlan) -> PackedTowerSignals | None:
        """The capture of the pre_llm step's tower signals, where it reads any."""
        pre = plan.pre_llm
        names = pre.step.required_signals() & PACKED_VIT_SIGNALS if pre is not None else set()
        if not names:
            return None
        return PackedTowerSignals(model.model.visual, self.signal_block(model.config, pre.step),
                                  self.modeling_module().apply_rotary_pos_emb_vision, names, self.window_order(model))

    def window_order(self, model):
        """``grid_thw -> window_index`` where the tower runs its blocks in window order."""
        return None

    def attach_decoder_extras(self, run: ReductionRun, model, site: LLMSite) -> None:
        """What the family's decoder adds beyond the shared site (Qwen3-VL: DeepStack)."""

    def offline_processor(self, directory):
        """The image processor, tokenizer and chat template of the checkpoint, joined by
        :class:`fico.processors.QwenVLProcessor` (the stock processor needs torchvision)."""
        from ...processors import QwenVLProcessor

        return QwenVLProcessor.from_pretrained(directory)

    def continuation_position_ids(self, model, start: int, steps: int, device) -> Tensor:
        """4-row positions: the text row ``start, start + 1, ...``, and each M-RoPE row the same
        shifted by the model's ``rope_deltas`` (set by the prefill; by fico where a pre_llm
        step shortened it), as ``generate`` continues them."""
        text = torch.arange(start, start + steps, device=device)[None]
        deltas = model.model.rope_deltas
        rows = text + (deltas.to(device) if deltas is not None else 0)
        return torch.cat([text[None], rows[None].expand(3, -1, -1)])

    def prompt(self, question: str, images: int = 1, processor=None) -> str:
        """The processor's chat template where it has one, else Qwen's chat format with one
        vision block per image."""
        templated = self.chat_template_prompt(question, images, processor)
        if templated is not None:
            return templated
        image = "<|vision_start|><|image_pad|><|vision_end|>" * images
        return f"<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"


def image_layouts(grid_thw: Tensor, merge: int, first_image: int = 0) -> list[tuple[Tensor, tuple[int, int]]]:
    """Per image of ``grid_thw`` ``(I, 3)`` (its patch grid, time x height x width): the layout
    (:mod:`fico.layout`) of its ``t h w / merge^2`` merged tokens in the order the merger emits
    them (frame, then row-major on the ``h/merge x w/merge`` grid), and that grid."""
    out = []
    for index, (t, h, w) in enumerate(grid_thw.tolist()):
        rows, cols = h // merge, w // merge
        cell = torch.arange(t * rows * cols, device=grid_thw.device) % (rows * cols)
        layout = torch.stack([torch.full_like(cell, first_image + index), torch.zeros_like(cell), cell // cols,
                              cell % cols], -1)
        out.append((layout, (rows, cols)))
    return out


class QwenEncoder:
    """The pre_llm site of the Qwen-VL families, and the layout of every visual token for the
    decoder sites."""

    def __init__(self, run: ReductionRun, model, plan: RecipePlan, passes: ForwardPasses,
                 tower_signals: PackedTowerSignals | None = None):
        self.run, self.model, self.plan, self.passes = run, model, plan, passes
        self.tower_signals = tower_signals
        config = model.config
        self.image_token_id = config.image_token_id
        self.merge = config.vision_config.spatial_merge_size

    def attach(self) -> None:
        if not self.plan.planned_steps():
            return
        # registered before the decoder site's hooks: the layout is on the pass when it begins
        hook(self.run, self.model.model.register_forward_pre_hook(self._place_layout, with_kwargs=True))
        if self.plan.pre_llm is not None:
            wrap_entry_points(self.run, self.model, self.prepare)
        if self.tower_signals is not None:
            self.tower_signals.attach(self.run)

    def _place_layout(self, module, args, kwargs):
        """The layout of the unreduced images, for decoder steps (a prefill with its images)."""
        ids, grid = kwargs.get("input_ids"), kwargs.get("image_grid_thw")
        current = self.passes.current
        if ids is None or grid is None or ids.is_meta or (current is not None and current.visual_layout is not None):
            return None
        layouts = image_layouts(grid, self.merge)
        if int((ids == self.image_token_id).sum()) != sum(layout.shape[0] for layout, _ in layouts):
            return None  # a decode step: no placeholders
        self._set_layout(layouts)
        return None

    def _set_layout(self, layouts: list[tuple[Tensor, tuple[int, int]]]) -> None:
        current = self.passes.ensure()
        layout = torch.cat([layout for layout, _ in layouts])
        current.visual_layout = layout
        current.visual_grids = (tuple(max(grid[d] for _, grid in layouts) for d in range(2)),)
        rows, cols = layout[:, 2], layout[:, 3]
        widths = torch.cat([torch.full_like(lay[:, 0], grid[1]) for lay, grid in layouts])
        current.image_patches = torch.where(rows >= 0, rows * widths + cols, -1)

    # -- the pre_llm site, at the entry points
    def prepare(self, call: dict) -> dict:
        """``call`` with the images encoded and reduced, the placeholders matching them and the
        kept tokens' M-RoPE positions."""
        call = dict(call)
        call.pop("instruction", None)
        ids, pixels = call.get("input_ids"), call.get("pixel_values")
        if pixels is None or ids is None or ids.shape[1] <= 1 or call.get("mm_encoder_outputs") is not None:
            return call
        grid, types = call.get("image_grid_thw"), call.get("mm_token_type_ids")
        if grid is None or types is None:
            raise InputError("fico: Qwen-VL needs image_grid_thw and mm_token_type_ids with pixel_values (its "
                             "processor gives all three)")
        if call.get("position_ids") is not None:
            raise InputError("fico: explicit position_ids cannot be combined with a pre_llm step on Qwen-VL: fico "
                             "gathers the M-RoPE positions of the tokens it keeps; leave them to fico")
        if call.get("pixel_values_videos") is not None:
            raise InputError("fico: a pre_llm step on Qwen-VL reduces images; videos (pixel_values_videos) are not "
                             "supported yet: use a decoder-site recipe, or images")
        if ids.is_meta or pixels.is_meta:
            raise InputError("fico: Qwen-VL's pre_llm site reads each image's grid; it cannot run on the meta device")
        runs = (grid.prod(-1) // self.merge ** 2).tolist()
        check_placeholder_runs(ids, self.image_token_id, runs, "image_grid_thw")
        encoded = self.encode(pixels, grid)  # the tower signals' capture is timed as fico's work
        signals = self.tower_signals.take() if self.tower_signals is not None else [{} for _ in runs]
        layouts = image_layouts(grid, self.merge)
        kept, reduced, carried, new_layouts = [], [], [], []
        with self.run.work():
            for index, ((layout, cells), features) in enumerate(zip(layouts, encoded.features)):
                ranks, tokens, moved = self._pre_llm_image(features, layout, cells, encoded.carried(index),
                                                           signals[index])
                kept.append(ranks)
                reduced.append(tokens)
                carried.append(moved)
                new_layouts.append((torch.where((ranks >= 0)[:, None], layout[ranks.clamp_min(0)], -1), cells))
        # a created token takes its anchor's rank (the last kept token of its image)
        anchored = [torch.where(r >= 0, r, r.max().clamp_min(0)) if r.numel() else r for r in kept]
        mask = call.get("attention_mask")
        positions, deltas = self.model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid,
                                                            attention_mask=mask)
        new = {k: v for k, v in call.items() if k not in ("pixel_values", "image_grid_thw")}
        new, sources = rebuild_kept_placeholders(new, anchored, self.image_token_id, runs,
                                                 padding_token_id(self.model.config))
        new["mm_encoder_outputs"] = {"image": encoded.output(reduced, carried)}
        new["position_ids"] = self._positions(positions, sources, new.get("attention_mask"))
        # a decode loop that leaves positions to the model continues from rope_deltas
        # (max position + 1 - length): each sample is shorter by what it removed
        before = (mask.sum(1) if mask is not None else torch.full_like(deltas[:, 0], ids.shape[1]))
        after = (sources >= 0).sum(1)
        self.model.model.rope_deltas = deltas + (before - after)[:, None].to(deltas)
        self._set_layout([(layout, cells) for layout, cells in new_layouts])
        counts = [r.shape[0] for r in kept]
        self.run.trace.vision_features = counts[0] if len(set(counts)) == 1 else counts
        return new

    @staticmethod
    def _positions(positions: Tensor, sources: Tensor, mask: Tensor | None) -> Tensor:
        """``(4, B, L')``: the contiguous text row (as ``generate`` writes it) and the unreduced
        prompt's three M-RoPE rows ``positions`` ``(3, B, L)`` at each new position's source."""
        b, width = sources.shape
        rows = torch.gather(positions, 2, sources.clamp_min(0)[None].expand(3, b, width))
        rows = rows.masked_fill((sources < 0)[None], 0)
        if mask is None:
            text = torch.arange(width, device=sources.device).expand(b, width)
        else:
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return torch.cat([text[None].to(rows), rows])

    def encode(self, pixel_values: Tensor, grid: Tensor) -> "EncodedImages":
        """The merged tokens of every image (the family's ``get_image_features``)."""
        out = self.model.model.get_image_features(pixel_values, grid, return_dict=True)
        return EncodedImages(list(out.pooler_output))

    def _pre_llm_image(self, features: Tensor, layout: Tensor, grid: tuple[int, int], carried: Tensor | None,
                       signals: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """The pre_llm step on one image: the rank of each token it keeps (-1: created), the
        tokens, and the ``carried`` values moved as the tokens were."""
        planned = self.plan.pre_llm
        n = features.shape[0]
        candidate = torch.ones(1, n, dtype=torch.bool, device=features.device)
        remove = image_removal(planned, n, n, (grid,))
        positions = torch.arange(n, device=features.device)[None]
        local = layout.clone()
        local[:, 0] = 0
        state = TokenState(hidden=features[None], positions=positions, candidate=candidate,
                           visual=torch.ones_like(candidate), text=torch.zeros_like(candidate),
                           patch=(local[:, 2] * grid[1] + local[:, 3])[None], grid=grid, layout=local[None],
                           grids=(grid,), site="pre_llm", layer=0, carried=None if carried is None else carried[None],
                           signals={name: value[None] for name, value in signals.items()},
                           sources=torch.eye(n, device=features.device)[None] if self.run.provenance else None)
        [new] = run_point_step(self.run, planned, state, remove)
        return new.positions[0], new.hidden[0], None if new.carried is None else new.carried[0]


class EncodedImages:
    """The merged tokens of a batch's images, per image (and, for Qwen3-VL, the DeepStack
    features that travel with them)."""

    def __init__(self, features: list[Tensor]):
        self.features = features

    def carried(self, index: int) -> Tensor | None:
        """``(N, C)`` per-token values of image ``index`` that a step moves as it moves its tokens
        (:attr:`fico.TokenState.carried`), or None."""
        return None

    def output(self, reduced: list[Tensor], carried: list[Tensor | None]):
        """What the model takes as ``mm_encoder_outputs["image"]``."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=reduced)


@hookimpl
def fico_model_families():
    return [Qwen2VL]
