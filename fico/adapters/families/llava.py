"""LLaVA-1.5: ``transformers.LlavaForConditionalGeneration`` with a CLIP vision tower and a Llama
language model. The only file that names LLaVA-1.5's modules.

Sites, in the order a forward pass meets them:

* **vision**: inside each CLIP layer (:mod:`fico.adapters.towers.clip`).
* **vision_output**: the tokens of ``hidden_states[vision_feature_layer]`` ([CLS] included),
  with the feature layer's attention signals and those of the layer after it (PruMerge).
* **pre_llm**: the projector's outputs, per image, before the language model; instruction
  signals come from the CLIP text tower of the checkpoint the vision tower came from.
* **llm**, **llm_mid**: in the Llama decoder (:mod:`fico.adapters.decoder`), with 1-D RoPE.

When a recipe changes the image features (their number, per image, or their order), the
wrapped ``forward`` and ``generate`` encode the images first (tower, vision_output step,
projector, pre_llm step), then rebuild each image's placeholder run in ``input_ids`` to its
own count and pass the features as ``mm_encoder_outputs``: callers pass the processor's
unchanged inputs, and images of one batch may keep different numbers of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import InputError, RecipeError
from ...hookspecs import hookimpl
from ...recipe import Recipe
from ...recipe.plan import Geometry, RecipePlan
from ...run import ReductionRun
from ...signals import INSTRUCTION_SIGNALS
from ...state import TokenState, gather_tokens
from ..decoder import LLM_SIGNALS, LLMSite
from ..entry import wrap_entry_points
from ..family import ModelFamily
from ..forward import ForwardPasses
from ..placeholders import padding_token_id, rebuild_placeholders
from ..positions import RotaryPositions
from ..steps import run_point_step
from ..towers.clip import (NEXT_LAYER_SIGNALS, VISION_OUTPUT_SIGNALS, VISION_SIGNALS, VisionPass, VisionSite,
                           fullwidth_signals, hidden_states_index, patch_grid, vision_signals)
from ..towers.clip_text import ClipTextTower, companion_clip, instruction_signals, text_tower_for


@dataclass(frozen=True)
class LlavaGeometry:
    """A LLaVA-1.5 model's counts as its sites use them."""

    feature_index: int  # hidden_states index LLaVA feeds to the projector
    drops_cls: bool
    image_token_id: int
    placeholders_per_image: int


class Llava(ModelFamily):
    """LLaVA-1.5 (and checkpoints of its architecture: a CLIP tower, a projector, a Llama)."""

    name = "LLaVA-1.5"
    supported = "transformers.LlavaForConditionalGeneration with a CLIP vision tower and a Llama language model"
    checkpoint_classes = {"llava": "LlavaForConditionalGeneration"}
    site_signals = {"vision": VISION_SIGNALS, "vision_output": VISION_OUTPUT_SIGNALS, "pre_llm": INSTRUCTION_SIGNALS,
                    "llm": LLM_SIGNALS, "llm_mid": LLM_SIGNALS - {"final_normed_hidden"}}
    options = frozenset({"proportional_attention", "cls_feature", "text_encoder"})

    def supports(self, model) -> bool:
        from transformers import LlavaForConditionalGeneration
        from transformers.models.clip.modeling_clip import CLIPVisionModel

        return (isinstance(model, LlavaForConditionalGeneration)
                and isinstance(model.model.vision_tower, CLIPVisionModel)
                and hasattr(model.model.language_model, "layers"))

    def supports_config(self, config) -> bool:
        from transformers import CLIPVisionConfig, LlavaConfig

        return isinstance(config, LlavaConfig) and isinstance(config.vision_config, CLIPVisionConfig)

    def planning_geometry(self, config) -> Geometry:
        vision = config.vision_config
        layers = vision.num_hidden_layers
        feature_layer = config.vision_feature_layer
        feature_index = hidden_states_index(layers, feature_layer) if isinstance(feature_layer, int) else -1
        return Geometry(layers, (vision.image_size // vision.patch_size) ** 2 + 1, feature_index,
                        config.vision_feature_select_strategy == "default", config.get_text_config().num_hidden_layers)

    def geometry(self, config) -> LlavaGeometry:
        counts = self.planning_geometry(config)
        return LlavaGeometry(feature_index=counts.feature_index, drops_cls=counts.drops_cls,
                             image_token_id=config.image_token_id,
                             placeholders_per_image=counts.vision_tokens - (1 if counts.drops_cls else 0))

    def check_recipe(self, recipe: Recipe, config, runs: bool = True) -> RecipePlan:
        """Also: vision-side steps need one feature layer; vision_output signals need the layers
        they come from unreduced there; instruction signals need a text tower (``runs``: stages
        will run, not a shape-only meta-device pass)."""
        vision_side = [s for s in recipe.steps if s.site in ("vision", "vision_output")]
        if vision_side and not isinstance(config.vision_feature_layer, int):
            raise RecipeError(f"{recipe.source}: {vision_side[0].where}: {vision_side[0].site} steps need a single "
                              f"vision_feature_layer; this model concatenates layers {config.vision_feature_layer}")
        plan = super().check_recipe(recipe, config, runs)
        geo = self.planning_geometry(config)
        out = plan.vision_output
        if out is not None:
            names = out.step.required_signals()
            feature_layer = geo.feature_index - 1  # its output is hidden_states[feature_index]
            if names & NEXT_LAYER_SIGNALS and geo.feature_index >= geo.vision_layers:
                raise RecipeError(f"{recipe.source}: {out.step.where}: there is no layer after the feature layer "
                                  f"to read next_* signals from")
            reduced = plan.vision.mid_steps.get(feature_layer)
            if names & VISION_SIGNALS and reduced is not None and reduced.remove:
                raise RecipeError(f"{recipe.source}: {out.step.where}: the vision_output signals come from the "
                                  f"feature layer's attention, which {reduced.step.where} reduces after (vision "
                                  f"layer {feature_layer}); move that step earlier")
        pre = plan.pre_llm
        if runs and pre is not None and pre.step.required_signals() & INSTRUCTION_SIGNALS \
                and pre.step.text_encoder is None and companion_clip(config) is None:
            raise RecipeError(f"{recipe.source}: {pre.step.where}.text_encoder: the signal(s) "
                              f"{', '.join(sorted(pre.step.required_signals() & INSTRUCTION_SIGNALS))} need CLIP's "
                              f"text tower: give the local CLIP checkpoint the vision tower came from (override "
                              f"text_encoder=DIR, e.g. a saved openai/clip-vit-large-patch14-336)")
        return plan

    def attach(self, run: ReductionRun, model, plan: RecipePlan) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv, rotate_half

        geo = self.geometry(model.config)
        text_tower = None  # loaded first: a tower that does not fit fails before the model is touched
        pre = plan.pre_llm
        if pre is not None and pre.step.required_signals() & INSTRUCTION_SIGNALS and model.device.type != "meta":
            text_tower = text_tower_for(run.recipe, pre.step, model.device, model.dtype,
                                        model.config.vision_config.hidden_size, companion_clip(model.config))
        passes = ForwardPasses()
        llava = model.model
        vision = VisionSite(run, llava.vision_tower, plan, geo.feature_index, geo.drops_cls, passes)
        vision.attach()
        LlavaEncoder(run, model, geo, plan, vision, passes, text_tower).attach()
        positions = RotaryPositions(rotate_half, apply_rotary_pos_emb, repeat_kv)
        LLMSite(run, plan.llm, llava, llava.language_model, geo.image_token_id, passes, geo.placeholders_per_image,
                patch_grid(geo.placeholders_per_image), positions).attach()

    def prompt(self, question: str, images: int = 1, processor=None) -> str:
        """The processor's chat template where it has one, else LLaVA-1.5's conversation format
        ``USER: <image>\\n{question} ASSISTANT:`` (one ``<image>\\n`` per image)."""
        templated = self.chat_template_prompt(question, images, processor)
        if templated is not None:
            return templated
        return "USER: " + "<image>\n" * images + f"{question} ASSISTANT:"


class LlavaEncoder:
    """The vision_output and pre_llm sites, and the placeholder rebuild at the entry points.

    Images are encoded before the model's own forward (tower, vision_output step, feature
    selection, projector, pre_llm step), each image's placeholder run in ``input_ids`` is
    rebuilt to its own feature count, and the features reach the model as
    ``mm_encoder_outputs``.
    """

    def __init__(self, run: ReductionRun, model, geo: LlavaGeometry, plan: RecipePlan, vision: VisionSite,
                 passes: ForwardPasses, text_tower: ClipTextTower | None = None):
        self.run, self.model, self.geo, self.plan, self.vision = run, model, geo, plan, vision
        self.passes, self.text_tower = passes, text_tower
        self.needs_instruction = plan.pre_llm is not None and bool(plan.pre_llm.step.required_signals()
                                                                   & INSTRUCTION_SIGNALS)
        self.needed = (plan.vision_output is not None or plan.pre_llm is not None
                       or plan.features != geo.placeholders_per_image)

    def attach(self) -> None:
        if self.needed:
            wrap_entry_points(self.run, self.model, self.prepare)

    # -- the entry point
    def prepare(self, call: dict) -> dict:
        """``call`` with the images encoded and the placeholders matching their features."""
        call = dict(call)
        instruction = call.pop("instruction", None)
        ids, pixels = call.get("input_ids"), call.get("pixel_values")
        if pixels is None or ids is None or ids.shape[1] <= 1 or call.get("mm_encoder_outputs") is not None:
            return call
        if call.get("position_ids") is not None:
            raise InputError("fico: explicit position_ids cannot be combined with vision-side reduction; "
                             "leave them to the model")
        if not ids.is_meta:
            placeholders = (ids == self.geo.image_token_id).sum(1)
            per_image = self.geo.placeholders_per_image
            if bool((placeholders % per_image != 0).any()):
                raise InputError(f"fico: each image needs {per_image} placeholder tokens in input_ids (as the "
                                 f"processor writes); got {placeholders.tolist()} per sample")
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        instructions = self._image_instructions(instruction, ids) if self.needs_instruction else None
        features, patches = self.encode(pixels, instructions)
        new = {k: v for k, v in call.items() if k != "pixel_values"}
        new["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        counts = [f.shape[0] for f in features]
        if not ids.is_meta:
            new = rebuild_placeholders(new, counts, self.geo.image_token_id, self.geo.placeholders_per_image,
                                       padding_token_id(self.model.config))
        self.passes.ensure().image_patches = torch.cat(patches) if patches else None
        self.run.trace.vision_features = counts[0] if len(set(counts)) == 1 else counts
        return new

    def _image_instructions(self, instruction, ids: Tensor) -> list[str] | None:
        """Each image's instruction text, from ``instruction=`` (one text, or one per sample)."""
        if ids.is_meta:  # shape-only runs: no stage reads it
            return None
        where = f"{self.run.recipe.source}: {self.plan.pre_llm.step.where}"
        if instruction is None:
            raise InputError(f"fico: {where} rates the visual tokens by their relevance to the instruction: pass "
                             f"instruction='...' (or one text per sample) to the model's generate() or forward()")
        b = ids.shape[0]
        texts = [instruction] * b if isinstance(instruction, str) else list(instruction)
        if len(texts) != b or not all(isinstance(t, str) for t in texts):
            raise InputError(f"fico: instruction= takes one text or a list of {b} texts (one per sample), got "
                             f"{instruction!r}")
        images = ((ids == self.geo.image_token_id).sum(1) // self.geo.placeholders_per_image).tolist()
        return [text for text, count in zip(texts, images) for _ in range(count)]

    # -- encoding
    def encode(self, pixel_values: Tensor, instructions: list[str] | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: the features reaching the LLM, and each one's patch cell (-1: none);
        ``instructions``: each image's instruction text, for instruction signals."""
        llava = self.model.model
        features, cells, first = [], [], 0
        for tokens, pos in self.select_features(pixel_values):
            projected = llava.multi_modal_projector(tokens)
            patch = torch.where(pos > 0, pos - 1, -1)
            signals, images = {}, tokens.shape[0]
            if self.plan.pre_llm is not None:
                with self.run.work():
                    if instructions is not None and not tokens.is_meta:
                        signals = instruction_signals(self.text_tower, llava.vision_tower.post_layernorm, tokens,
                                                      instructions[first:first + images])
                    for image, image_patch in self._pre_llm(projected, patch, signals):
                        features.append(image)
                        cells.append(image_patch)
            else:
                features += list(projected)
                cells += list(patch)
            first += images
        return features, cells

    def select_features(self, pixel_values: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The tower's feature-layer tokens after the vision_output step and feature selection,
        with their positions in the tower's sequence ([CLS] 0, -1: created): one batch of
        images (tower passes), or one per image where the step's count is the image's own."""
        llava = self.model.model
        out = llava.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        vp = self.vision.last
        hidden = out.hidden_states[self.geo.feature_index]
        b, n = hidden.shape[:2]
        positions = vp.feature_positions if vp is not None and vp.feature_positions is not None else \
            torch.arange(n, device=hidden.device).expand(b, n)
        size = vp.feature_size if vp is not None else None
        sources = vp.feature_sources if vp is not None else None
        images = [(hidden, positions, size, sources)]
        if self.plan.vision_output is not None:
            with self.run.work():
                images = self._vision_output(hidden, positions, size, sources, vp)
        # feature selection: [CLS] leaves unless the step made it a feature
        selected = []
        for tokens, pos, _, _ in images:
            if self.geo.drops_cls and not self.plan.cls_feature:
                keep = pos != 0
                count = int(keep[0].sum()) if not pos.is_meta else tokens.shape[1] - 1
                index = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :count] \
                    if not pos.is_meta else torch.arange(1, tokens.shape[1], device=tokens.device).expand(
                        tokens.shape[0], -1)
                tokens, pos = gather_tokens(tokens, index), gather_tokens(pos, index)
            selected.append((tokens, pos))
        return selected

    def _vision_output(self, hidden: Tensor, positions: Tensor, size: Tensor | None, sources: Tensor | None,
                       vp: VisionPass | None) -> list[tuple]:
        planned = self.plan.vision_output
        names = planned.step.required_signals()
        signals = {}
        if names and not hidden.is_meta:
            capture = vp.output_capture
            feature_layer, next_layer = self.geo.feature_index - 1, self.geo.feature_index
            attn = self.vision.layers[feature_layer].self_attn if feature_layer >= 0 else None
            if names & VISION_SIGNALS:
                signals.update(vision_signals(names & VISION_SIGNALS, capture.get((feature_layer, "q")),
                                              capture[(feature_layer, "k")], attn.num_heads, attn.scale,
                                              capture.get((feature_layer, "mask"))))
            if names - VISION_SIGNALS:
                signals.update(fullwidth_signals(names - VISION_SIGNALS, capture.get((next_layer, "q")),
                                                 capture[(next_layer, "k")]))
        if vp is not None:
            vp.output_capture.clear()
        candidate = positions != 0
        state = TokenState(hidden=hidden, positions=positions, candidate=candidate,
                           visual=torch.ones_like(candidate), text=torch.zeros_like(candidate),
                           patch=torch.where(positions > 0, positions - 1, -1), grid=self.vision.grid, size=size,
                           signals=signals, sources=sources, site="vision_output",
                           layer=self.geo.feature_index - 1)
        return [(s.hidden, s.positions, s.size, s.sources) for s in run_point_step(self.run, planned, state)]

    def _pre_llm(self, features: Tensor, patch: Tensor, signals: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        planned = self.plan.pre_llm
        candidate = patch >= 0
        state = TokenState(hidden=features, positions=patch, candidate=candidate, visual=torch.ones_like(candidate),
                           text=torch.zeros_like(candidate), patch=patch, grid=self.vision.grid, site="pre_llm",
                           layer=0, signals=signals)
        out = []
        for new in run_point_step(self.run, planned, state):
            out += [(tokens, cells) for tokens, cells in zip(new.hidden, torch.where(new.positions >= 0,
                                                                                     new.positions, -1))]
        return out


@hookimpl
def fico_model_families():
    return [Llava]
