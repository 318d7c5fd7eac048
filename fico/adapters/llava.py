"""Adapter for Hugging Face ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama LM).

Two sites:

* **vision**: inside each ``CLIPEncoderLayer``, after the attention residual and before
  the MLP (ToMe's slot). The layers are class-swapped to a subclass, so state-dict keys and
  ``isinstance`` checks (which LLaVA's hidden-state capture relies on) are unchanged.
  Proportional attention enters CLIP attention as an additive float mask ``log(size)``.
* **llm**: at the input of a decoder layer during prefill, with signals measured on the
  previous layer's post-RoPE queries/keys (only the rows a component needs; the model keeps
  its SDPA attention). Kept tokens keep their RoPE positions (cos/sin are gathered), the 4D
  mask is gathered in rows and columns, and each decode step gathers the mask columns of
  the shorter per-layer KV cache.

Vision-side reduction changes the number of image features; the wrapped ``forward`` and
``generate`` shrink the processor's placeholder run before the model sees it, so callers
pass the processor's unchanged inputs.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ApplyError, InputError, RecipeError, UnsupportedModelError
from ..plan import Geometry, SitePlan, plan_recipe
from ..recipe import Recipe
from ..run import ReductionRun, StepRecord, run_step
from ..state import TokenState, gather_tokens

SUPPORTED_MODELS = ("transformers.LlavaForConditionalGeneration with a CLIP vision tower and a Llama language model",)
VISION_SIGNALS = {"keys", "cls_attention", "attention", "attention_logits"}
LLM_SIGNALS = {"keys", "last_query_attention", "text_attention", "attention", "attention_logits"}


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

    def planning(self) -> Geometry:
        return Geometry(len(self.vision_layers), self.vision_tokens, self.feature_index, self.drops_cls,
                        len(self.llm_layers))


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
    config = model.config
    vision_cfg = config.vision_config
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    feature_layer = config.vision_feature_layer
    patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    return LlavaGeometry(
        vision_layers=layers,
        llm_layers=model.model.language_model.layers,
        vision_tokens=patches + 1,
        feature_index=(feature_layer if isinstance(feature_layer, int) and feature_layer >= 0
                       else len(layers) + 1 + feature_layer if isinstance(feature_layer, int) else -1),
        drops_cls=config.vision_feature_select_strategy == "default",
        image_token_id=config.image_token_id,
        placeholders_per_image=patches + 1 - (1 if config.vision_feature_select_strategy == "default" else 0),
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
    has_vision = any(s.site == "vision" for s in recipe.steps)
    if has_vision and not isinstance(model.config.vision_feature_layer, int):
        raise RecipeError(f"{recipe.source}: vision steps need a single vision_feature_layer; this model "
                          f"concatenates layers {model.config.vision_feature_layer}")
    plan = plan_recipe(recipe, geo.planning())
    vision_plan, llm_plan, features = plan.vision, plan.llm, plan.features
    for site_plan, provided in ((vision_plan, VISION_SIGNALS), (llm_plan, LLM_SIGNALS)):
        for planned in site_plan.steps.values():
            missing = planned.step.required_signals() - provided
            if missing:
                raise RecipeError(
                    f"{recipe.source}: {planned.step.where}: the {site_plan.site} site cannot give the signal(s) "
                    f"{', '.join(sorted(missing))}; it gives {', '.join(sorted(provided))}"
                )
    run = ReductionRun(model, recipe, {"vision": vision_plan, "llm": llm_plan}, provenance=provenance)
    try:
        VisionSite(run, model, geo, vision_plan, features).attach()
        LLMSite(run, model, geo, llm_plan).attach()
        model._fico_run = run
        run._undo.append(lambda: delattr(model, "_fico_run"))
    except BaseException:
        run.remove()
        raise
    run.active = True
    return run


def _hook(run: ReductionRun, handle) -> None:
    run._undo.append(handle.remove)


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


# --------------------------------------------------------------------------- signals


def _softmax_mean_heads(logits: Tensor) -> Tensor:
    """Head-mean softmax over the last axis; fp32 softmax for half dtypes, as HF's eager does."""
    probs = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
    # A fully masked query row (left padding) attends to nothing, not NaN.
    return torch.nan_to_num(probs, nan=0.0).mean(dim=1)


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
        probs = _softmax_mean_heads(logits)
        out["attention"] = probs
        out["cls_attention"] = probs[:, 0]
    return {name: out[name] for name in names}


def llm_signals(names: set[str], capture: dict, attn: nn.Module, last_row: Tensor,
                text_queries: Tensor) -> dict[str, Tensor]:
    """Signals from the previous decoder layer's captured q/k projections, mask and cos/sin.

    Only the needed query rows are formed: each sample's last row for
    ``last_query_attention``, its text rows (padded to the batch's longest) for
    ``text_attention``, all rows only for the full matrix (``attention``, ``attention_logits``).

    Args:
        last_row: ``(B,)`` index of each sample's last input token.
        text_queries: ``(B, N)`` bool, the text tokens after the first visual token.
    """
    from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

    q_proj, k_proj = capture.get("q"), capture["k"]
    cos, sin = capture["position_embeddings"]
    mask = capture["attention_mask"]
    b, n, _ = k_proj.shape
    head_dim = attn.head_dim
    keys = k_proj.view(b, n, -1, head_dim).transpose(1, 2)
    keys = keys * cos.unsqueeze(1) + rotate_half(keys) * sin.unsqueeze(1)
    out = {}
    if "keys" in names:
        out["keys"] = keys.mean(dim=1)
    if not names - {"keys"}:
        return out
    all_rows = bool(names & {"attention", "attention_logits"})
    if all_rows:
        rows, text_weights = torch.arange(n, device=k_proj.device).expand(b, n), text_queries
    else:  # [text rows, padded ..., last row]
        count = text_queries.sum(1)
        longest = int(count.max()) if "text_attention" in names else 0
        text_rows = torch.sort((~text_queries).to(torch.uint8), dim=1, stable=True).indices[:, :longest]
        valid = torch.arange(longest, device=k_proj.device) < count[:, None]
        rows = torch.cat([text_rows, last_row[:, None]], 1)
        text_weights = torch.cat([valid, valid.new_zeros(b, 1)], 1)
    queries = gather_tokens(q_proj, rows).view(b, rows.shape[1], -1, head_dim).transpose(1, 2)
    cos_q = gather_tokens(cos.expand(b, -1, -1), rows).unsqueeze(1)
    sin_q = gather_tokens(sin.expand(b, -1, -1), rows).unsqueeze(1)
    queries = queries * cos_q + rotate_half(queries) * sin_q
    logits = (queries @ repeat_kv(keys, attn.num_key_value_groups).transpose(-1, -2)) * attn.scaling
    if "attention_logits" in names:
        out["attention_logits"] = logits.mean(dim=1)  # pre-softmax, before the causal mask
    if mask is None:
        allowed = torch.arange(n, device=rows.device)[None, None, :] <= rows[:, :, None]
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    else:
        mask_rows = torch.gather(mask.expand(b, -1, -1, -1), 2,
                                 rows[:, None, :, None].expand(b, mask.shape[1], rows.shape[1], mask.shape[-1]))
        if mask_rows.dtype == torch.bool:
            logits = logits.masked_fill(~mask_rows, float("-inf"))
        else:
            logits = logits + mask_rows
    probs = _softmax_mean_heads(logits)
    if all_rows:
        out["attention"] = probs
        out["last_query_attention"] = torch.gather(probs, 1, last_row[:, None, None].expand(b, 1, n))[:, 0]
    else:
        out["last_query_attention"] = probs[:, -1]
    weights = text_weights.to(probs.dtype)
    out["text_attention"] = (weights[:, :, None] * probs).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
    return {name: out[name] for name in names}


def _projection_hooks(run, attn: nn.Module, needs_q: bool, store) -> None:
    """Forward hooks keeping the k (and q) projection outputs of ``attn`` via ``store``."""
    _hook(run, attn.k_proj.register_forward_hook(lambda m, a, out: store("k", out)))
    if needs_q:
        _hook(run, attn.q_proj.register_forward_hook(lambda m, a, out: store("q", out)))


def _patch_grid(placeholders: int) -> tuple[int, int]:
    side = int(round(placeholders ** 0.5))
    return (side, side) if side * side == placeholders else (1, placeholders)


def _record_provenance(record: StepRecord, before: Tensor, after: Tensor, sources: Tensor) -> None:
    """Store a step's provenance on its record (on the CPU)."""
    gone = ~torch.isin(before, after) if before.shape[0] == 1 else torch.stack(
        [~torch.isin(b, a) for b, a in zip(before, after)])
    record.sources = sources.detach().float().cpu()
    record.positions_in = before.detach().cpu()
    record.positions_out = after.detach().cpu()
    record.discarded = [row[mask].tolist() for row, mask in zip(before.cpu(), gone.cpu())]


# --------------------------------------------------------------------------- vision site


@dataclass
class VisionPass:
    """Token bookkeeping of one vision-tower forward; created per forward, never shared."""

    positions: Tensor | None = None
    candidate: Tensor | None = None
    size: Tensor | None = None
    extras: dict = field(default_factory=dict)
    captured: dict = field(default_factory=dict)
    feature_positions: Tensor | None = None  # positions of the tokens LLaVA takes as features
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
    """CLIP attention computed explicitly (as HF's eager path): output and probabilities (B, H, N, N)."""
    b, n, c = hidden.shape

    def heads(x):
        return x.view(b, n, attn.num_heads, c // attn.num_heads).transpose(1, 2)

    q, k, v = heads(attn.q_proj(hidden)), heads(attn.k_proj(hidden)), heads(attn.v_proj(hidden))
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    if mask is not None:
        logits = logits + mask
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    out = (probs @ v).transpose(1, 2).reshape(b, n, c)
    return attn.out_proj(out), probs


class VisionSite:
    def __init__(self, run: ReductionRun, model, geo: LlavaGeometry, plan: SitePlan, features: int):
        self.run, self.model, self.geo, self.plan = run, model, geo, plan
        self.features = features
        self.tower = model.model.vision_tower
        self.proportional = any(p.step.proportional_attention for p in plan.steps.values())
        self.grid = _patch_grid(geo.vision_tokens - 1)
        self.explicit_attention_layers = {layer for layer, p in plan.steps.items()
                                          if p.remove and "attention" in p.step.required_signals()}
        self.current: VisionPass | None = None
        self.inside_generate = False

    # -- attach
    def attach(self) -> None:
        run = self.run
        for index, layer in enumerate(self.geo.vision_layers):
            original = type(layer)
            layer.__class__ = _reducing_layer_class(original)
            run._undo.append(functools.partial(setattr, layer, "__class__", original))
            _set_instance_attr(run, layer, "_fico_site", self)
            _set_instance_attr(run, layer, "_fico_layer", index)
        for layer_index, planned in self.plan.steps.items():
            names = planned.step.required_signals()
            if planned.remove and names:
                _projection_hooks(run, self.geo.vision_layers[layer_index].self_attn,
                                  bool(names & {"cls_attention", "attention"}), self._store)
        _hook(run, self.tower.register_forward_pre_hook(self._begin_forward))
        _hook(run, self.tower.register_forward_hook(self._end_forward))
        if self.features != self.geo.placeholders_per_image:
            self._wrap_entry_points()

    def _store(self, name: str, value: Tensor) -> None:
        if self.current is not None:
            self.current.captured[name] = value

    def _begin_forward(self, module, args):
        if not getattr(self.run, "_in_llava_forward", False):
            self.run.begin_trace()
        self.current = VisionPass()
        self.run.trace.vision = []

    def _end_forward(self, module, args, output):
        vp, self.current = self.current, None
        if vp is not None:
            positions = vp.feature_positions if vp.feature_positions is not None else vp.positions
            if self.geo.drops_cls:
                positions = positions[:, 1:]
            # the LLM site places each image feature on the patch grid from these
            self.run.image_patches = (positions - 1).clamp_min(-1)
        trace = self.run.trace
        if len(trace.vision) == len(self.geo.vision_layers):
            # hidden_states[i] enters layer i; the last index is the tower's output.
            entering = trace.vision + [self.plan.tokens[-1]]
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
            vp.feature_positions = vp.positions
        return vp

    def reduce(self, layer: int, hidden: Tensor, vp: VisionPass, mask: Tensor | None) -> Tensor:
        planned = self.plan.steps.get(layer)
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
        new, seconds = run_step(planned, state, planned.remove)
        record = StepRecord("vision", layer, hidden.shape[1], new.hidden.shape[1], planned.remove, seconds)
        if vp.sources is not None:
            _record_provenance(record, vp.positions, new.positions, new.sources)
        vp.positions, vp.candidate, vp.size, vp.extras = new.positions, new.candidate, new.size, new.extras
        vp.sources = new.sources
        self.run.trace.steps.append(record)
        return new.hidden

    # -- placeholders
    def _wrap_entry_points(self) -> None:
        model = self.model
        original_forward, original_generate = model.forward, model.generate
        forward_signature = inspect.signature(original_forward)

        def forward(*args, **kwargs):
            bound = forward_signature.bind_partial(*args, **kwargs)
            call = dict(bound.arguments)
            call.update(call.pop("kwargs", {}))
            if not self.inside_generate:
                call = self._shrink_inputs(call)
            return original_forward(**call)

        def generate(inputs=None, **kwargs):
            if inputs is not None:
                kwargs["input_ids"] = inputs
            original_ids = kwargs.get("input_ids")
            call = self._shrink_inputs(dict(kwargs))
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

    def _shrink_inputs(self, call: dict) -> dict:
        ids = call.get("input_ids")
        if call.get("pixel_values") is None or ids is None or ids.shape[1] <= 1:
            return call
        if ids.is_meta:  # no values to find placeholders in: pass ids with the reduced count
            return call
        per_image, keep_per_image = self.geo.placeholders_per_image, self.features
        placeholder = ids == self.geo.image_token_id
        counts = placeholder.sum(1)
        if bool((counts % per_image != 0).any()):
            raise InputError(
                f"fico: each image needs {per_image} placeholder tokens in input_ids (as the processor writes); "
                f"got {counts.tolist()} per sample"
            )
        rank = placeholder.cumsum(1) - 1
        drop = placeholder & (rank % per_image >= keep_per_image)
        dropped = drop.sum(1)
        if bool((dropped != dropped[0]).any()):
            raise InputError("fico: vision-side reduction needs the same number of images in every sample of a batch")
        keep = ~drop
        b = ids.shape[0]
        new = dict(call)
        for key in ("input_ids", "attention_mask", "labels", "token_type_ids"):
            value = call.get(key)
            if value is not None and value.dim() == 2 and value.shape == ids.shape:
                new[key] = value[keep].view(b, -1)
        if call.get("position_ids") is not None:
            raise InputError("fico: explicit position_ids cannot be combined with vision-side reduction; "
                             "leave them to the model")
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


# --------------------------------------------------------------------------- llm site


@dataclass
class LLMPass:
    """Token bookkeeping of one prefill and the decode steps that follow it.

    ``keep`` holds, for each token present, the index of the original token whose RoPE
    position and mask row/column it uses: itself for ordinary tokens, the last visual token
    before it for a token a compressor appended (it is placed right after that token).
    """

    visual: Tensor
    real: Tensor
    last_index: Tensor
    phase: str = "prefill"
    patch: Tensor | None = None  # (B, L0) grid cell of each visual token, -1 elsewhere
    keep: Tensor | None = None
    created: Tensor | None = None  # (B, L) tokens appended by a compressor
    extras: dict = field(default_factory=dict)
    position_embeddings: tuple[Tensor, Tensor] | None = None
    attention_mask: Tensor | None = None
    full_position_embeddings: tuple[Tensor, Tensor] | None = None
    full_attention_mask: Tensor | None = None
    layer_keep: dict = field(default_factory=dict)
    captured: dict = field(default_factory=dict)
    sources: Tensor | None = None  # provenance (B, L, L0), when the run records it


class LLMSite:
    def __init__(self, run: ReductionRun, model, geo: LlavaGeometry, plan: SitePlan):
        self.run, self.model, self.geo, self.plan = run, model, geo, plan
        self.current: LLMPass | None = None
        self.capture_layers = {layer - 1: p for layer, p in plan.steps.items() if p.remove}
        self.grid = _patch_grid(geo.placeholders_per_image)

    def attach(self) -> None:
        run = self.run
        _hook(run, self.model.model.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
        _hook(run, self.model.model.register_forward_hook(self._end_forward))
        for index, layer in enumerate(self.geo.llm_layers):
            _hook(run, layer.register_forward_pre_hook(functools.partial(self._layer_input, index), with_kwargs=True))
        for index, planned in self.capture_layers.items():
            attn = self.geo.llm_layers[index].self_attn
            names = planned.step.required_signals()
            if names:
                store = functools.partial(self._store, index)
                _projection_hooks(run, attn, bool(names - {"keys"}), store)
                _hook(run, attn.register_forward_pre_hook(functools.partial(self._attention_input, index),
                                                          with_kwargs=True))

    # -- forward boundaries
    def _begin_forward(self, module, args, kwargs):
        self.run._in_llava_forward = True
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = cache is None or cache.get_seq_length() == 0
        if not prefill:
            if self.current is not None:
                self.current.phase = "decode"
            return None
        self.run.begin_trace(keep_vision=kwargs.get("mm_encoder_outputs") is not None)
        ids = kwargs.get("input_ids")
        if ids is None:
            if self.plan.steps:
                raise InputError("fico: the llm site finds visual tokens through input_ids; pass input_ids, "
                                 "not inputs_embeds")
            self.current = None
            return None
        mask = kwargs.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        n = ids.shape[1]
        last = n - 1 - torch.flip(real, dims=[1]).to(torch.int8).argmax(1)
        self.current = LLMPass(visual=ids == self.geo.image_token_id, real=real, last_index=last)
        return None

    def _end_forward(self, module, args, output):
        self.run._in_llava_forward = False
        self.run.image_patches = None
        if self.current is not None:
            self.current.captured.clear()

    def _store(self, layer: int, name: str, value: Tensor) -> None:
        lp = self.current
        if lp is not None and lp.phase == "prefill":
            lp.captured.setdefault(layer, {})[name] = value

    def _attention_input(self, layer, module, args, kwargs):
        lp = self.current
        if lp is not None and lp.phase == "prefill":
            slot = lp.captured.setdefault(layer, {})
            slot["position_embeddings"] = kwargs.get("position_embeddings")
            slot["attention_mask"] = kwargs.get("attention_mask")
        return None

    def _patch_cells(self, lp: LLMPass) -> Tensor:
        """Grid cell of every visual token: from the vision site's kept positions if it
        reduced, else the token's rank within its image."""
        visual = lp.visual
        image_patches = getattr(self.run, "image_patches", None)
        patch = torch.full_like(visual, -1, dtype=torch.long)
        if visual.is_meta:
            return patch
        if image_patches is not None and image_patches.numel() == int(visual.sum()):
            return patch.masked_scatter(visual, image_patches.reshape(-1).to(visual.device))
        rank = visual.long().cumsum(1) - 1
        return torch.where(visual, rank % self.geo.placeholders_per_image, patch)

    # -- per layer
    def _layer_input(self, layer: int, module, args, kwargs):
        lp = self.current
        if lp is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if lp.phase == "decode":
            return self._decode_mask(layer, lp, args, kwargs)
        if layer == 0:
            lp.full_position_embeddings = kwargs.get("position_embeddings")
            lp.full_attention_mask = kwargs.get("attention_mask")
            lp.patch = self._patch_cells(lp)
            if self.run.provenance:
                n0 = hidden.shape[1]
                lp.sources = torch.eye(n0, device=hidden.device).expand(hidden.shape[0], n0, n0)
        planned = self.plan.steps.get(layer)
        if planned is not None and planned.remove:
            hidden = self._reduce(layer, planned, lp, hidden)
        self.run.trace.llm.append(hidden.shape[1])
        if lp.keep is None:
            return None
        lp.layer_keep[layer] = lp.keep
        kwargs["attention_mask"] = lp.attention_mask
        kwargs["position_embeddings"] = lp.position_embeddings
        kwargs["position_ids"] = torch.arange(hidden.shape[1], device=hidden.device)[None]
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _reduce(self, layer: int, planned, lp: LLMPass, hidden: Tensor) -> Tensor:
        b, n = hidden.shape[:2]
        keep = lp.keep if lp.keep is not None else torch.arange(n, device=hidden.device).expand(b, n)
        created = lp.created if lp.created is not None else torch.zeros(b, n, dtype=torch.bool, device=keep.device)
        visual, real = gather_tokens(lp.visual, keep), gather_tokens(lp.real, keep)
        candidate = visual & real
        step = planned.step
        if hidden.is_meta:
            available = planned.candidates_in
        else:
            counts = candidate.sum(1)
            if bool((counts != counts[0]).any()):
                raise InputError(f"fico: llm layer {layer}: samples have different numbers of visual tokens "
                                 f"({counts.tolist()}); batch samples with the same number of images")
            available = int(counts[0])
        requested = step.schedule.tokens_to_remove(available, planned.position)
        if requested > available:
            raise RecipeError(f"{self.run.recipe.source}: {step.where}.{step.schedule.kind}: removes {requested} "
                              f"tokens at llm layer {layer}, where only {available} visual tokens are left")
        remove = min(requested, step.filter.max_discard(n, available))
        text = real & ~visual
        first_visual = torch.where(visual, keep, torch.iinfo(keep.dtype).max).min(1, keepdim=True).values
        signals = {}
        names = step.required_signals()
        if names and not hidden.is_meta:
            capture = lp.captured.pop(layer - 1)
            last_row = (keep == lp.last_index[:, None]).to(torch.int8).argmax(1)
            signals = llm_signals(names, capture, self.geo.llm_layers[layer - 1].self_attn, last_row,
                                  text & (keep > first_visual))
        patch = torch.where(created, -1, gather_tokens(lp.patch, keep))
        # Created tokens (appended by a compressor) have no original position of their own.
        state = TokenState(hidden=hidden, positions=torch.where(created, -1, keep), candidate=candidate,
                           visual=visual, text=text, patch=patch, grid=self.grid, signals=signals,
                           extras=lp.extras, sources=lp.sources, site="llm", layer=layer)
        new, seconds = run_step(planned, state, remove)
        keep, hidden, extras, sources = new.positions, new.hidden, new.extras, new.sources
        created = keep < 0
        if step.compressor.appends and remove:
            # Created tokens sit right after the last original visual token present and borrow
            # its RoPE position and mask row/column.
            anchor = torch.where(new.visual & ~created, keep, -1).max(1, keepdim=True).values
            keep = torch.where(created, anchor, keep)
            order = torch.sort(keep * 2 + created.long(), dim=1, stable=True).indices
            keep, hidden, created = (gather_tokens(t, order) for t in (keep, hidden, created))
            extras = {k: gather_tokens(v, order) for k, v in extras.items()}
            sources = None if sources is None else gather_tokens(sources, order)
        record = StepRecord("llm", layer, n, hidden.shape[1], remove, seconds)
        if sources is not None:
            _record_provenance(record, state.positions, torch.where(created, -1, keep), sources)
        lp.keep, lp.created, lp.extras, lp.sources = keep, created, extras, sources
        cos, sin = lp.full_position_embeddings
        lp.position_embeddings = (gather_tokens(cos, keep), gather_tokens(sin, keep))
        lp.attention_mask = _gather_square(lp.full_attention_mask, keep)
        self.run.trace.steps.append(record)
        return hidden

    def _decode_mask(self, layer: int, lp: LLMPass, args, kwargs):
        keep = lp.layer_keep.get(layer)
        mask = kwargs.get("attention_mask")
        if keep is None or mask is None:
            return None  # no mask: one query attends to everything its (shorter) cache holds
        b = keep.shape[0]
        full = lp.real.shape[1]
        new_columns = torch.arange(full, mask.shape[-1], device=keep.device).expand(b, -1)
        columns = torch.cat([keep, new_columns], dim=1)
        mask = mask.expand(b, *mask.shape[1:])
        kwargs["attention_mask"] = torch.gather(
            mask, 3, columns[:, None, None, :].expand(b, mask.shape[1], mask.shape[2], columns.shape[1]))
        return args, kwargs


def _gather_square(mask: Tensor | None, keep: Tensor) -> Tensor | None:
    """Rows and columns ``keep`` of a ``(B, 1, L, L)`` mask; None stays None (plain causal)."""
    if mask is None:
        return None
    b, k = keep.shape
    mask = mask.expand(b, *mask.shape[1:])
    heads = mask.shape[1]
    rows = torch.gather(mask, 2, keep[:, None, :, None].expand(b, heads, k, mask.shape[-1]))
    square = torch.gather(rows, 3, keep[:, None, None, :].expand(b, heads, k, k))
    # Causal in the new order too: a created token shares its anchor's index but comes after it.
    causal = torch.ones(k, k, dtype=torch.bool, device=keep.device).tril()
    if square.dtype == torch.bool:
        return square & causal
    return square.masked_fill(~causal, torch.finfo(square.dtype).min)
