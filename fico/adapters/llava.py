"""Adapter for Hugging Face ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama LM).

Sites, in the order a forward pass meets them:

* **vision**: inside each ``CLIPEncoderLayer``, after the attention residual and before
  the MLP (ToMe's slot). The layers are class-swapped to a subclass, so state-dict keys and
  ``isinstance`` checks (which LLaVA's hidden-state capture relies on) are unchanged.
  Proportional attention enters CLIP attention as an additive float mask ``log(size)``.
* **vision_output**: the tokens of ``hidden_states[vision_feature_layer]`` ([CLS] included),
  with the feature layer's attention signals and those of the layer after it (PruMerge),
  captured from their q/k projections while the tower runs under SDPA.
* **pre_llm**: the projector's outputs, per image, before the language model.
* **llm**, **llm_mid**: in the decoder (:mod:`fico.adapters.decoder`).

When a recipe changes the image features (their number, per image, or their order), the
wrapped ``forward`` and ``generate`` encode the images first (tower, vision_output step,
projector, pre_llm step), then rebuild each image's placeholder run in ``input_ids`` to its
own count and pass the features as ``mm_encoder_outputs``: callers pass the processor's
unchanged inputs, and images of one batch may keep different numbers of tokens.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ApplyError, InputError, RecipeError, UnsupportedModelError
from ..recipe import Recipe
from ..recipe.plan import Geometry, PlannedStep, RecipePlan, plan_recipe
from ..run import ReductionRun, StepRecord, run_step
from ..signals import INSTRUCTION_SIGNALS
from ..state import TokenState, gather_tokens
from .clip_text import ClipTextTower, instruction_similarity
from .decoder import LLM_SIGNALS, LLMSite, hook, record_provenance, softmax_heads

SUPPORTED_MODELS = ("transformers.LlavaForConditionalGeneration with a CLIP vision tower and a Llama language model",)
VISION_SIGNALS = {"keys", "cls_attention", "attention", "attention_logits"}
VISION_OUTPUT_SIGNALS = {"keys", "cls_attention", "attention", "attention_logits", "next_cls_attention_fullwidth",
                         "next_keys_fullwidth"}
SITE_SIGNALS = {"vision": VISION_SIGNALS, "vision_output": VISION_OUTPUT_SIGNALS, "pre_llm": INSTRUCTION_SIGNALS,
                "llm": LLM_SIGNALS, "llm_mid": LLM_SIGNALS - {"final_normed_hidden"}}


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class LlavaGeometry:
    vision_layers: nn.ModuleList
    llm_layers: nn.ModuleList
    vision_tokens: int  # [CLS] + patches
    feature_index: int  # hidden_states index LLaVA feeds to the projector
    drops_cls: bool
    image_token_id: int
    placeholders_per_image: int


def supports(model) -> bool:
    try:
        from transformers import LlavaForConditionalGeneration
        from transformers.models.clip.modeling_clip import CLIPVisionModel
    except ImportError:  # pragma: no cover
        return False
    return (
        isinstance(model, LlavaForConditionalGeneration)
        and isinstance(model.model.vision_tower, CLIPVisionModel)
        and hasattr(model.model.language_model, "layers")
    )


def geometry(model) -> LlavaGeometry:
    """The modules the sites hook, with the counts of :func:`planning_geometry`."""
    counts = planning_geometry(model.config)
    return LlavaGeometry(
        vision_layers=model.model.vision_tower.encoder.layers,
        llm_layers=model.model.language_model.layers,
        vision_tokens=counts.vision_tokens,
        feature_index=counts.feature_index,
        drops_cls=counts.drops_cls,
        image_token_id=model.config.image_token_id,
        placeholders_per_image=counts.vision_tokens - (1 if counts.drops_cls else 0),
    )


# --------------------------------------------------------------------------- attach


def apply(model, recipe: Recipe, provenance: bool = False) -> ReductionRun:
    """Attach ``recipe`` to ``model``; everything is validated before the model is touched."""
    if not supports(model):
        raise UnsupportedModelError(
            f"fico cannot apply recipes to {type(model).__module__}.{type(model).__qualname__}; supported: "
            + "; ".join(SUPPORTED_MODELS)
        )
    if getattr(model, "_fico_run", None) is not None:
        raise ApplyError("this model already has a fico recipe applied; call run.remove() first")
    geo = geometry(model)
    plan = check_recipe(recipe, model.config, runs=model.device.type != "meta")
    text_tower = _text_tower(recipe, plan, model)
    run = ReductionRun(model, recipe, plan, provenance=provenance)
    try:
        vision = VisionSite(run, model, geo, plan)
        vision.attach()
        encoder = VisualEncoder(run, model, geo, plan, vision, text_tower)
        encoder.attach()
        LLMSite(run, plan.llm, model.model, model.model.language_model, geo.image_token_id,
                lambda: getattr(run, "image_patches", None), geo.placeholders_per_image,
                _patch_grid(geo.placeholders_per_image)).attach()
        model._fico_run = run
        run._undo.append(lambda: delattr(model, "_fico_run"))
    except BaseException:
        run.remove()
        raise
    run.active = True
    return run


def planning_geometry(config) -> Geometry:
    """The layer and token counts a plan needs, from a ``LlavaConfig`` alone (no weights)."""
    vision = config.vision_config
    layers = vision.num_hidden_layers
    feature_layer = config.vision_feature_layer
    feature_index = (feature_layer if isinstance(feature_layer, int) and feature_layer >= 0
                     else layers + 1 + feature_layer if isinstance(feature_layer, int) else -1)
    return Geometry(layers, (vision.image_size // vision.patch_size) ** 2 + 1, feature_index,
                    config.vision_feature_select_strategy == "default", config.get_text_config().num_hidden_layers)


def check_recipe(recipe: Recipe, config, runs: bool = True) -> RecipePlan:
    """Every check of ``recipe`` against a model that needs only the model's config: layers in
    range, schedules that fit the token counts, signals the sites give, and (``runs``: stages
    will run, not a shape-only meta-device pass) a text tower where a step reads the
    instruction. Commands run it before loading weights; :func:`apply` runs it before
    touching the model. Returns the plan."""
    vision_side = [s for s in recipe.steps if s.site in ("vision", "vision_output")]
    if vision_side and not isinstance(config.vision_feature_layer, int):
        raise RecipeError(f"{recipe.source}: {vision_side[0].where}: {vision_side[0].site} steps need a single "
                          f"vision_feature_layer; this model concatenates layers {config.vision_feature_layer}")
    geo = planning_geometry(config)
    plan = plan_recipe(recipe, geo)
    _check_signals(recipe, plan, geo)
    pre = plan.pre_llm
    if runs and pre is not None and pre.step.required_signals() & INSTRUCTION_SIGNALS and pre.step.text_encoder is None:
        raise RecipeError(f"{recipe.source}: {pre.step.where}.text_encoder: the signal(s) "
                          f"{', '.join(sorted(pre.step.required_signals() & INSTRUCTION_SIGNALS))} need CLIP's text "
                          f"tower: give the local CLIP checkpoint the vision tower came from (override "
                          f"text_encoder=DIR, e.g. a saved openai/clip-vit-large-patch14-336)")
    return plan


def _check_signals(recipe: Recipe, plan: RecipePlan, geo: Geometry) -> None:
    planned = [*plan.vision.all_steps(), plan.vision_output, plan.pre_llm, *plan.llm.all_steps()]
    for p in planned:
        if p is None:
            continue
        provided = SITE_SIGNALS[p.step.site]
        missing = p.step.required_signals() - provided
        if missing:
            raise RecipeError(f"{recipe.source}: {p.step.where}: the {p.step.site} site cannot give the signal(s) "
                              f"{', '.join(sorted(missing))}; it gives {', '.join(sorted(provided)) or 'none'}")
    out = plan.vision_output
    if out is not None:
        names = out.step.required_signals()
        feature_layer = geo.feature_index - 1  # its output is hidden_states[feature_index]
        if names & {"next_cls_attention_fullwidth", "next_keys_fullwidth"} and geo.feature_index >= geo.vision_layers:
            raise RecipeError(f"{recipe.source}: {out.step.where}: there is no layer after the feature layer to "
                              f"read next_* signals from")
        if names & VISION_SIGNALS and feature_layer in plan.vision.mid_steps and plan.vision.mid_steps[feature_layer].remove:
            raise RecipeError(f"{recipe.source}: {out.step.where}: the vision_output signals come from the feature "
                              f"layer's attention, which {plan.vision.mid_steps[feature_layer].step.where} reduces "
                              f"after (vision layer {feature_layer}); move that step earlier")


def _text_tower(recipe: Recipe, plan: RecipePlan, model) -> ClipTextTower | None:
    """The CLIP text tower the pre_llm step's instruction signals need (None on the meta device,
    where no stage runs); loaded once per recipe, device and dtype."""
    pre = plan.pre_llm
    if pre is None or not pre.step.required_signals() & INSTRUCTION_SIGNALS:
        return None
    if model.device.type == "meta":
        return None
    key = f"{recipe.source}: {pre.step.where}.text_encoder"
    dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    cache = (pre.step.text_encoder, str(model.device), dtype)
    if cache not in recipe.auxiliary:
        tower = ClipTextTower.load(pre.step.text_encoder, model.device, dtype, key)
        width = model.config.vision_config.hidden_size
        if tower.visual_projection.in_features != width:
            raise RecipeError(f"{key}: {pre.step.text_encoder!r} projects {tower.visual_projection.in_features}-wide "
                              f"vision states; this model's vision tower is {width} wide (a different CLIP?)")
        recipe.auxiliary[cache] = tower
    return recipe.auxiliary[cache]


def _set_instance_attr(run: ReductionRun, obj, name: str, value) -> None:
    """Set ``obj.name`` and register its exact restoration."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    object.__setattr__(obj, name, value)

    def undo():
        if had:
            object.__setattr__(obj, name, old)
        else:
            obj.__dict__.pop(name, None)

    run._undo.append(undo)


def _patch_grid(placeholders: int) -> tuple[int, int]:
    side = int(round(placeholders ** 0.5))
    return (side, side) if side * side == placeholders else (1, placeholders)


# --------------------------------------------------------------------------- vision signals


def vision_signals(names: set[str], q: Tensor | None, k: Tensor, num_heads: int, scale: float,
                   bias: Tensor | None) -> dict[str, Tensor]:
    """Signals from one CLIP layer's projected queries/keys ``(B, N, C)``.

    ``bias`` is the additive mask the layer's attention used (proportional attention).
    """
    b, n, c = k.shape
    keys = k.view(b, n, num_heads, c // num_heads).transpose(1, 2)
    out = {}
    if "keys" in names:
        out["keys"] = keys.mean(dim=1)
    if names & {"cls_attention", "attention", "attention_logits"}:
        queries = q.view(b, n, num_heads, c // num_heads).transpose(1, 2)
        if not names & {"attention", "attention_logits"}:
            queries = queries[:, :, :1]  # the [CLS] row is all that is needed
        logits = (queries @ keys.transpose(-1, -2)) * scale
        if "attention_logits" in names:
            out["attention_logits"] = logits.mean(dim=1)
        if bias is not None:
            logits = logits + bias
        probs = softmax_heads(logits)
        out["attention"] = probs
        out["cls_attention"] = probs[:, 0]
    return {name: out[name] for name in names}


def fullwidth_signals(names: set[str], q: Tensor, k: Tensor) -> dict[str, Tensor]:
    """PruMerge's quantities from the next CLIP layer's q/k projections ``(B, N, C)``, one
    C-wide pseudo-head: ``softmax(q k^T / sqrt(C))`` of the [CLS] row, and the keys."""
    out = {}
    if "next_cls_attention_fullwidth" in names:
        logits = (q[:, :1] @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, 1, N)
        out["next_cls_attention_fullwidth"] = softmax_heads(logits[:, None])[:, 0]
    if "next_keys_fullwidth" in names:
        out["next_keys_fullwidth"] = k
    return out


# --------------------------------------------------------------------------- vision site


@dataclass
class VisionPass:
    """Token bookkeeping of one vision-tower forward; created per forward, never shared."""

    positions: Tensor | None = None
    candidate: Tensor | None = None
    size: Tensor | None = None
    extras: dict = field(default_factory=dict)
    captured: dict = field(default_factory=dict)
    #: the tokens LLaVA takes as features (hidden_states[feature_index]): positions, sizes, provenance
    feature_positions: Tensor | None = None
    feature_size: Tensor | None = None
    feature_sources: Tensor | None = None
    #: q/k projections (and the mask) of the feature layer and the next, for vision_output signals
    output_capture: dict = field(default_factory=dict)
    sources: Tensor | None = None  # provenance (B, N, N0), when the run records it


@functools.cache
def _reducing_layer_class(base: type) -> type:
    return type(f"Fico{base.__name__}", (base,), {"forward": _vision_layer_forward, "__module__": __name__})


def _vision_layer_forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
    site: VisionSite = self._fico_site
    layer: int = self._fico_layer
    vp = site.begin_layer(layer, hidden_states)
    mask = attention_mask
    if site.proportional and vp.size is not None:
        bias = vp.size.log().to(hidden_states.dtype)[:, None, None, :, 0]
        mask = bias if mask is None else mask + bias
    if layer in site.output_layers:
        vp.output_capture[(layer, "mask")] = mask
    residual = hidden_states
    hidden_states = self.layer_norm1(hidden_states)
    if layer in site.explicit_attention_layers and not hidden_states.is_meta:
        # The step needs the whole attention matrix: form it once here and share it, rather
        # than running SDPA and recomputing every row.
        hidden_states, vp.captured["probs"] = _explicit_attention(self.self_attn, hidden_states, mask)
    else:
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=mask, **kwargs)
    hidden_states = residual + hidden_states
    hidden_states = site.reduce(layer, hidden_states, vp, mask)
    residual = hidden_states
    hidden_states = self.layer_norm2(hidden_states)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


def _explicit_attention(attn: nn.Module, hidden: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """CLIP attention computed explicitly: output and probabilities (B, H, N, N).

    The softmax runs in float32 for half dtypes (as HF's eager path) and in the model's own
    dtype otherwise, so a float64 model stays float64.
    """
    b, n, c = hidden.shape

    def heads(x):
        return x.view(b, n, attn.num_heads, c // attn.num_heads).transpose(1, 2)

    q, k, v = heads(attn.q_proj(hidden)), heads(attn.k_proj(hidden)), heads(attn.v_proj(hidden))
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    if mask is not None:
        logits = logits + mask
    half = q.dtype in (torch.float16, torch.bfloat16)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32 if half else q.dtype).to(q.dtype)
    out = (probs @ v).transpose(1, 2).reshape(b, n, c)
    return attn.out_proj(out), probs


class VisionSite:
    def __init__(self, run: ReductionRun, model, geo: LlavaGeometry, plan: RecipePlan):
        self.run, self.model, self.geo = run, model, geo
        self.plan = plan.vision
        self.tower = model.model.vision_tower
        self.proportional = any(p.step.proportional_attention for p in self.plan.mid_steps.values())
        self.grid = _patch_grid(geo.vision_tokens - 1)
        self.explicit_attention_layers = {layer for layer, p in self.plan.mid_steps.items()
                                          if p.remove and "attention" in p.step.required_signals()}
        # the layers whose q/k the vision_output step reads: the feature layer, and the next
        self.output_layers: dict[int, bool] = {}  # layer -> needs q
        out = plan.vision_output
        if out is not None:
            names = out.step.required_signals()
            if names & VISION_SIGNALS:
                self.output_layers[geo.feature_index - 1] = bool(names - {"keys"})
            if names & {"next_cls_attention_fullwidth", "next_keys_fullwidth"}:
                self.output_layers[geo.feature_index] = "next_cls_attention_fullwidth" in names
        self.current: VisionPass | None = None
        self.last: VisionPass | None = None

    # -- attach
    def attach(self) -> None:
        run = self.run
        for index, layer in enumerate(self.geo.vision_layers):
            original = type(layer)
            layer.__class__ = _reducing_layer_class(original)
            run._undo.append(functools.partial(setattr, layer, "__class__", original))
            _set_instance_attr(run, layer, "_fico_site", self)
            _set_instance_attr(run, layer, "_fico_layer", index)
        for layer_index, planned in self.plan.mid_steps.items():
            names = planned.step.required_signals()
            if planned.remove and names:
                attn = self.geo.vision_layers[layer_index].self_attn
                hook(run, attn.k_proj.register_forward_hook(lambda m, a, out: self._store("k", out)))
                if names & {"cls_attention", "attention", "attention_logits"}:
                    hook(run, attn.q_proj.register_forward_hook(lambda m, a, out: self._store("q", out)))
        for layer_index, needs_q in self.output_layers.items():
            attn = self.geo.vision_layers[layer_index].self_attn
            hook(run, attn.k_proj.register_forward_hook(
                lambda m, a, out, i=layer_index: self._store_output(i, "k", out)))
            if needs_q:
                hook(run, attn.q_proj.register_forward_hook(
                    lambda m, a, out, i=layer_index: self._store_output(i, "q", out)))
        hook(run, self.tower.register_forward_pre_hook(self._begin_forward))
        hook(run, self.tower.register_forward_hook(self._end_forward))

    def _store(self, name: str, value: Tensor) -> None:
        if self.current is not None:
            self.current.captured[name] = value

    def _store_output(self, layer: int, name: str, value: Tensor) -> None:
        if self.current is not None:
            self.current.output_capture[(layer, name)] = value

    def _begin_forward(self, module, args):
        if not getattr(self.run, "_in_llava_forward", False):
            self.run.begin_trace()
        self.current = VisionPass()
        self.run.trace.vision = []

    def _end_forward(self, module, args, output):
        vp, self.current = self.current, None
        self.last = vp
        if vp is not None:
            if vp.feature_positions is None:  # the feature layer is the tower's output
                vp.feature_positions, vp.feature_size, vp.feature_sources = vp.positions, vp.size, vp.sources
            positions = vp.feature_positions
            if self.geo.drops_cls:
                positions = positions[:, 1:]
            # the LLM site places each image feature on the patch grid from these
            self.run.image_patches = (positions - 1).clamp_min(-1)
        trace = self.run.trace
        if len(trace.vision) == len(self.geo.vision_layers):
            # hidden_states[i] enters layer i; the last index is the tower's output.
            entering = trace.vision + [self.plan.mlp[-1]]
            trace.vision_features = entering[self.geo.feature_index] - (1 if self.geo.drops_cls else 0)

    # -- per layer
    def begin_layer(self, layer: int, hidden: Tensor) -> VisionPass:
        vp = self.current
        if vp is None:  # a layer called outside the tower's forward: bookkeeping for this call only
            vp = self.current = VisionPass()
        if vp.positions is None:
            b, n = hidden.shape[:2]
            vp.positions = torch.arange(n, device=hidden.device).expand(b, n)
            vp.candidate = vp.positions != 0  # [CLS] is protected
            if self.run.provenance:
                vp.sources = torch.eye(n, device=hidden.device).expand(b, n, n)
        self.run.trace.vision.append(hidden.shape[1])
        if layer == self.geo.feature_index:
            vp.feature_positions, vp.feature_size, vp.feature_sources = vp.positions, vp.size, vp.sources
        return vp

    def reduce(self, layer: int, hidden: Tensor, vp: VisionPass, mask: Tensor | None) -> Tensor:
        planned = self.plan.mid_steps.get(layer)
        if planned is None or planned.remove == 0:
            return hidden
        attn = self.geo.vision_layers[layer].self_attn
        names = planned.step.required_signals()
        signals = {}
        if names and not hidden.is_meta:
            probs = vp.captured.get("probs")
            rest = names - {"attention", "cls_attention"} if probs is not None else names
            signals = vision_signals(rest, vp.captured.get("q"), vp.captured["k"], attn.num_heads, attn.scale, mask)
            if probs is not None:
                mean = probs.float().mean(1) if probs.dtype in (torch.float16, torch.bfloat16) else probs.mean(1)
                signals.update({"attention": mean, "cls_attention": mean[:, 0]})
                signals = {name: signals[name] for name in names}
        vp.captured.clear()
        state = TokenState(hidden=hidden, positions=vp.positions, candidate=vp.candidate,
                           visual=torch.ones_like(vp.candidate), text=torch.zeros_like(vp.candidate),
                           patch=torch.where(vp.positions > 0, vp.positions - 1, -1), grid=self.grid,
                           size=vp.size, signals=signals, extras=vp.extras, sources=vp.sources, site="vision",
                           layer=layer)
        new, seconds = run_step(planned, state, planned.remove, self.run.sync_stage_timing)
        record = StepRecord("vision", layer, hidden.shape[1], new.hidden.shape[1], planned.remove, seconds)
        if vp.sources is not None:
            record_provenance(record, vp.positions, new.positions, new.sources)
        vp.positions, vp.candidate, vp.size, vp.extras = new.positions, new.candidate, new.size, new.extras
        vp.sources = new.sources
        self.run.trace.steps.append(record)
        return new.hidden


# --------------------------------------------------------------------------- encoding and placeholders


class VisualEncoder:
    """The vision_output and pre_llm sites, and the placeholder rebuild at the entry points.

    Images are encoded before the model's own forward (tower, vision_output step, feature
    selection, projector, pre_llm step), each image's placeholder run in ``input_ids`` is
    rebuilt to its own feature count, and the features reach the model as
    ``mm_encoder_outputs``.
    """

    def __init__(self, run: ReductionRun, model, geo: LlavaGeometry, plan: RecipePlan, vision: VisionSite,
                 text_tower: ClipTextTower | None = None):
        self.run, self.model, self.geo, self.plan, self.vision = run, model, geo, plan, vision
        self.text_tower = text_tower
        self.needs_instruction = plan.pre_llm is not None and bool(plan.pre_llm.step.required_signals()
                                                                   & INSTRUCTION_SIGNALS)
        self.inside_generate = False
        self.needed = (plan.vision_output is not None or plan.pre_llm is not None
                       or plan.features != geo.placeholders_per_image)

    def attach(self) -> None:
        if not self.needed:
            return
        model = self.model
        original_forward, original_generate = model.forward, model.generate
        forward_signature = inspect.signature(original_forward)

        def forward(*args, **kwargs):
            bound = forward_signature.bind_partial(*args, **kwargs)
            call = dict(bound.arguments)
            call.update(call.pop("kwargs", {}))
            if not self.inside_generate:
                call = self.prepare(call)
            return original_forward(**call)

        def generate(inputs=None, **kwargs):
            if inputs is not None:
                kwargs["input_ids"] = inputs
            original_ids = kwargs.get("input_ids")
            call = self.prepare(dict(kwargs))
            self.inside_generate = True
            try:
                out = original_generate(**call)
            finally:
                self.inside_generate = False
            if original_ids is None or call.get("input_ids") is original_ids:
                return out
            return _restore_prompt(out, original_ids, call["input_ids"].shape[1])

        functools.update_wrapper(forward, original_forward)
        functools.update_wrapper(generate, original_generate)
        _set_instance_attr(self.run, model, "forward", forward)
        _set_instance_attr(self.run, model, "generate", generate)

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
        self.run.image_patches = torch.cat(patches) if patches else None
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
        features, cells, first = [], [], 0
        for tokens, pos in selected:
            projected = llava.multi_modal_projector(tokens)
            patch = torch.where(pos > 0, pos - 1, -1)
            signals = {}
            if instructions is not None and not tokens.is_meta:
                signals = self._instruction_signals(tokens, instructions[first:first + tokens.shape[0]])
            first += tokens.shape[0]
            if self.plan.pre_llm is not None:
                for image, image_patch in self._pre_llm(projected, patch, signals):
                    features.append(image)
                    cells.append(image_patch)
            else:
                features += list(projected)
                cells += list(patch)
        return features, cells

    def _point_step(self, planned: PlannedStep, state: TokenState) -> list[TokenState]:
        """Run a point-site step on ``state``: batched, or image by image for an adaptive count."""
        step = planned.step
        site = step.site
        if planned.remove is not None:
            new, seconds = run_step(planned, state, planned.remove, self.run.sync_stage_timing)
            self._record(site, state, new, planned.remove, seconds)
            return [new]
        results = []
        for index in range(state.hidden.shape[0]):
            one = _select_image(state, index)
            if one.hidden.is_meta:
                raise InputError(f"fico: {step.where} chooses its count from the image; it cannot run on the "
                                 f"meta device")
            keep = step.filter.adaptive_keep(one)
            remove = int(one.candidate.sum()) - keep
            if keep < 0 or remove < 0:
                raise RecipeError(f"{self.run.recipe.source}: {step.where}: the filter {step.filter.name!r} "
                                  f"chose to keep {keep} of {int(one.candidate.sum())} candidates")
            new, seconds = run_step(planned, one, remove, self.run.sync_stage_timing)
            self._record(site, one, new, remove, seconds)
            results.append(new)
        return results

    def _record(self, site: str, state: TokenState, new: TokenState, remove: int, seconds: float) -> None:
        record = StepRecord(site, 0, state.num_tokens, new.num_tokens, remove, seconds)
        if new.sources is not None:
            record_provenance(record, state.positions, new.positions, new.sources)
        self.run.trace.steps.append(record)

    def _vision_output(self, hidden: Tensor, positions: Tensor, size: Tensor | None, sources: Tensor | None,
                       vp: VisionPass | None) -> list[tuple]:
        planned = self.plan.vision_output
        names = planned.step.required_signals()
        signals = {}
        if names and not hidden.is_meta:
            capture = vp.output_capture
            feature_layer, next_layer = self.geo.feature_index - 1, self.geo.feature_index
            attn = self.geo.vision_layers[feature_layer].self_attn if feature_layer >= 0 else None
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
        return [(s.hidden, s.positions, s.size, s.sources) for s in self._point_step(planned, state)]

    def _instruction_signals(self, tokens: Tensor, instructions: list[str]) -> dict[str, Tensor]:
        """``instruction_similarity`` of the feature-layer states ``tokens`` ``(B, N, C)`` of
        images whose instructions are ``instructions``: CLIP's image side is the tower's
        post-layernorm (unused by LLaVA itself) and CLIP's visual projection."""
        tower = self.text_tower
        normed = self.model.model.vision_tower.post_layernorm(tokens)
        image = tower.image_embeddings(normed)
        texts = {text: tower.text_embeddings(text) for text in dict.fromkeys(instructions)}
        return {"instruction_similarity": torch.stack([instruction_similarity(image[i], texts[text])
                                                       for i, text in enumerate(instructions)])}

    def _pre_llm(self, features: Tensor, patch: Tensor, signals: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        planned = self.plan.pre_llm
        candidate = patch >= 0
        state = TokenState(hidden=features, positions=patch, candidate=candidate, visual=torch.ones_like(candidate),
                           text=torch.zeros_like(candidate), patch=patch, grid=self.vision.grid, site="pre_llm",
                           layer=0, signals=signals)
        out = []
        for new in self._point_step(planned, state):
            out += [(tokens, cells) for tokens, cells in zip(new.hidden, torch.where(new.positions >= 0,
                                                                                     new.positions, -1))]
        return out


def padding_token_id(config) -> int:
    """The id written into the slots a rebuilt row gains as padding. Those slots are masked,
    so any id in the vocabulary does; the text config's ``pad_token_id`` (a field every text
    config class declares, possibly None) where set, else 0. The top-level config has no
    ``pad_token_id`` when built as ``LlavaConfig(text_config=...)``, so it is never read."""
    pad = getattr(config.get_text_config(), "pad_token_id", None)
    return pad if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 else 0


def _select_image(state: TokenState, index: int) -> TokenState:
    """Image ``index`` of a batched state, as a batch of one."""
    from dataclasses import replace

    pick = lambda t: None if t is None else t[index:index + 1]
    return replace(state, hidden=pick(state.hidden), positions=pick(state.positions), candidate=pick(state.candidate),
                   visual=pick(state.visual), text=pick(state.text), patch=pick(state.patch),
                   sources=pick(state.sources), size=pick(state.size),
                   signals={k: v[index:index + 1] if torch.is_tensor(v) else v for k, v in state.signals.items()},
                   extras={k: v[index:index + 1] for k, v in state.extras.items()})


def rebuild_placeholders(call: dict, counts: list[int], image_token_id: int, per_image: int, pad_id: int) -> dict:
    """``call`` with image i's run of ``per_image`` placeholders made ``counts[i]`` tokens long
    (cut, or extended at its end where a method emits more features than patches, such as
    PruMerge's extra token when it discards nothing); images in the order the model fills
    them (by sample, then left to right), rows padded back to one length on the side the
    batch was padded (left unless it is right-padded)."""
    ids = call["input_ids"]
    b, length = ids.shape
    placeholder = ids == image_token_id
    image_of = ((placeholder.reshape(-1).long().cumsum(0) - 1).reshape(b, length) // per_image).clamp(0, len(counts) - 1)
    rank = (placeholder.long().cumsum(1) - 1) % per_image
    count = torch.tensor(counts, device=ids.device, dtype=torch.long)[image_of]
    # how many times each position appears in the rebuilt row
    repeats = torch.where(placeholder, (rank < count).long(), 1)
    last = placeholder & (rank == per_image - 1)
    repeats = repeats + torch.where(last, (count - per_image).clamp_min(0), 0)
    if bool((repeats == 1).all()):
        return call
    lengths = repeats.sum(1)
    width = int(lengths.max())
    mask = call.get("attention_mask")
    right = mask is not None and bool((mask[:, -1] == 0).any()) and not bool((mask[:, 0] == 0).any())
    offset = torch.zeros_like(lengths) if right else width - lengths
    sources = [torch.repeat_interleave(torch.arange(length, device=ids.device), repeats[row]) for row in range(b)]
    new = dict(call)
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100), ("token_type_ids", 0)):
        value = call.get(key)
        if value is None or value.dim() != 2 or value.shape != ids.shape:
            continue
        out = value.new_full((b, width), fill)
        for row, source in enumerate(sources):
            start = int(offset[row])
            out[row, start:start + len(source)] = value[row, source]
        new[key] = out
    if mask is None and bool((lengths != width).any()):
        new["attention_mask"] = (torch.arange(width, device=ids.device)[None] >= offset[:, None]) if not right else \
            (torch.arange(width, device=ids.device)[None] < lengths[:, None])
        new["attention_mask"] = new["attention_mask"].long()
    return new


def _restore_prompt(out, original_ids: Tensor, shrunk_length: int):
    """Give generate's output the caller's original prompt, so slicing by its length works."""
    def fix(sequences: Tensor) -> Tensor:
        return torch.cat([original_ids.to(sequences.device), sequences[:, shrunk_length:]], dim=1)

    if isinstance(out, Tensor):
        return fix(out)
    if hasattr(out, "sequences"):
        out.sequences = fix(out.sequences)
    return out
