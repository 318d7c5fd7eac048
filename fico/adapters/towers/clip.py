"""The CLIP vision tower (``CLIPVisionModel``): the ``vision`` site inside its layers, the signals
its attention gives, and the feature layer's tokens for the ``vision_output`` site.

* **vision**: inside each ``CLIPEncoderLayer``, after the attention residual and before the
  MLP (ToMe's slot). The layers are class-swapped to a subclass, so state-dict keys and
  ``isinstance`` checks (which the model's hidden-state capture relies on) are unchanged.
  Proportional attention enters CLIP attention as an additive float mask ``log(size)``.
* **vision_output** signals: the feature layer's attention, and that of the layer after it
  (PruMerge), captured from their q/k projections while the tower runs under SDPA.

Any family whose vision tower is CLIP's uses this file; it knows no family and no method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..forward import ForwardPasses
from ..hooks import hook, swap_forward
from ..steps import record_provenance
from ..attention import softmax_heads
from ...recipe.plan import RecipePlan
from ...run import ReductionRun, StepRecord, run_step
from ...state import TokenState

#: signals of a CLIP layer's attention (vision site, and the feature layer at vision_output)
VISION_SIGNALS = {"keys", "cls_attention", "attention", "attention_logits"}
#: PruMerge's full-width signals of the layer after the feature layer
NEXT_LAYER_SIGNALS = {"next_cls_attention_fullwidth", "next_keys_fullwidth"}
VISION_OUTPUT_SIGNALS = VISION_SIGNALS | NEXT_LAYER_SIGNALS


def hidden_states_index(num_layers: int, feature_layer: int) -> int:
    """The index into the tower's ``hidden_states`` (``num_layers + 1`` of them: the embeddings,
    then each layer's output) of ``feature_layer`` as configs write it (negative from the end)."""
    return feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer


def patch_grid(patches: int) -> tuple[int, int]:
    """``(rows, cols)`` of a square patch grid (one row where ``patches`` is not a square)."""
    side = int(round(patches ** 0.5))
    return (side, side) if side * side == patches else (1, patches)


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
        with site.run.work():
            hidden_states, vp.captured["probs"] = _explicit_attention(self.self_attn, hidden_states, mask)
    else:
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=mask, **kwargs)
    hidden_states = residual + hidden_states
    with site.run.work():
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
    def __init__(self, run: ReductionRun, tower: nn.Module, plan: RecipePlan, feature_index: int, drops_cls: bool,
                 passes: ForwardPasses):
        self.run, self.tower, self.passes = run, tower, passes
        self.layers = tower.encoder.layers
        self.feature_index, self.drops_cls = feature_index, drops_cls
        self.plan = plan.vision
        self.proportional = any(p.step.proportional_attention for p in self.plan.mid_steps.values())
        config = tower.config
        self.grid = patch_grid((config.image_size // config.patch_size) ** 2)
        self.explicit_attention_layers = {layer for layer, p in self.plan.mid_steps.items()
                                          if p.remove and "attention" in p.step.required_signals()}
        # the layers whose q/k the vision_output step reads: the feature layer, and the next
        self.output_layers: dict[int, bool] = {}  # layer -> needs q
        out = plan.vision_output
        if out is not None:
            names = out.step.required_signals()
            if names & VISION_SIGNALS:
                self.output_layers[feature_index - 1] = bool(names - {"keys"})
            if names & {"next_cls_attention_fullwidth", "next_keys_fullwidth"}:
                self.output_layers[feature_index] = "next_cls_attention_fullwidth" in names
        self.current: VisionPass | None = None
        self.last: VisionPass | None = None

    # -- attach
    def attach(self) -> None:
        run = self.run
        for index, layer in enumerate(self.layers):
            swap_forward(run, layer, _vision_layer_forward, _fico_site=self, _fico_layer=index)
        for layer_index, planned in self.plan.mid_steps.items():
            names = planned.step.required_signals()
            if planned.remove and names:
                attn = self.layers[layer_index].self_attn
                hook(run, attn.k_proj.register_forward_hook(lambda m, a, out: self._store("k", out)))
                if names & {"cls_attention", "attention", "attention_logits"}:
                    hook(run, attn.q_proj.register_forward_hook(lambda m, a, out: self._store("q", out)))
        for layer_index, needs_q in self.output_layers.items():
            attn = self.layers[layer_index].self_attn
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
        if not self.passes.inside_model:
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
            if self.drops_cls:
                positions = positions[:, 1:]
            # the LLM site places each image feature on the patch grid from these
            self.passes.ensure().image_patches = (positions - 1).clamp_min(-1)
        trace = self.run.trace
        if len(trace.vision) == len(self.layers):
            # hidden_states[i] enters layer i; the last index is the tower's output.
            entering = trace.vision + [self.plan.mlp[-1]]
            trace.vision_features = entering[self.feature_index] - (1 if self.drops_cls else 0)

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
        if layer == self.feature_index:
            vp.feature_positions, vp.feature_size, vp.feature_sources = vp.positions, vp.size, vp.sources
        return vp

    def reduce(self, layer: int, hidden: Tensor, vp: VisionPass, mask: Tensor | None) -> Tensor:
        planned = self.plan.mid_steps.get(layer)
        if planned is None or planned.remove == 0:
            return hidden
        attn = self.layers[layer].self_attn
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
            record_provenance(record, vp.positions, new.positions, new.sources, state.token_layout())
        vp.positions, vp.candidate, vp.size, vp.extras = new.positions, new.candidate, new.size, new.extras
        vp.sources = new.sources
        self.run.trace.steps.append(record)
        return new.hidden
