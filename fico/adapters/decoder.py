"""The decoder sites of a causal language model with RoPE and a 4D mask (Llama and kin).

``llm``: at the input of a decoder layer during prefill. Signals come from the previous
layer's post-RoPE queries/keys (``signal_layer: previous``, FastV's slot) or from this
layer's own projections of its input (``signal_layer: current``, PyramidDrop's), and only
the query rows a component needs are formed; the model keeps its SDPA attention.

``llm_mid``: inside a decoder layer, after the attention residual and before the MLP
(FitPrune's slot), with that layer's own attention. The layer's KV cache keeps the tokens
its attention saw; later layers run on the reduced set.

Kept tokens keep their RoPE positions (``positions: keep``: cos/sin are gathered) or are
renumbered contiguously (``positions: renumber``, PyramidDrop's and SparseVLM v1.5's code;
each decode step then uses, in every layer, the position that layer's own frame gives it).
The 4D mask is gathered in rows and columns, and each decode step gathers the mask columns
of the shorter per-layer KV cache. Everything a forward needs across layers lives in one
:class:`LLMPass`, created at each prefill and used by the decode steps that follow it.

The site knows no method: it builds a :class:`fico.TokenState` and runs the planned step.
A family hands it the decoder layers, the language model (final norm, rotary embedding),
the module whose forward starts a pass and its position strategy
(:mod:`fico.adapters.positions`); it imports no model code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import InputError, RecipeError
from ..recipe.plan import PlannedStep, SitePlan, requested_removal
from ..run import ReductionRun, StepRecord, run_step
from ..state import TokenState, gather_tokens
from .attention import masked_logits, reduce_heads, row_bands, softmax_heads
from .forward import ForwardPasses
from .ghosts import GHOST, causal_mask, hide_ghosts, select_sample, step_per_sample
from .hooks import hook, swap_forward
from .positions import RotaryPositions
from .steps import record_provenance

#: signals the decoder sites give (see ``fico.signals``)
LLM_SIGNALS = {"keys", "last_query_attention", "text_attention", "attention", "attention_logits", "attention_rows",
               "key_norms", "rope_gravity", "final_normed_hidden", "input_embeddings"}


class DecoderAttention:
    """One decoder layer's attention, re-formed only for the query rows asked for.

    Args:
        attn: the layer's attention module (``head_dim``, ``scaling``, ``num_key_value_groups``).
        keys: ``(B, N, H_kv * d)`` the k projection of the tokens present.
        queries: rows ``(B, R)`` -> ``(B, R, H * d)`` their q projection.
        position_embeddings: ``(cos, sin)`` ``(B, N, d)`` of the tokens present.
        mask: the layer's 4D mask over the tokens present, or None (plain causal).
        positions: the family's position strategy (how cos/sin rotate a query or key).
        probabilities: the layer's attention reduced over heads (``mean``, ``max``: ``(B, N,
            N)``) when it was formed whole (:func:`attention_with_probabilities`), or None.
    """

    def __init__(self, attn: nn.Module, keys: Tensor, queries: Callable[[Tensor], Tensor],
                 position_embeddings: tuple[Tensor, Tensor], mask: Tensor | None, positions: RotaryPositions,
                 probabilities: dict[str, Tensor] | None = None):
        self.attn, self.mask, self._queries, self.positions = attn, mask, queries, positions
        self.probabilities = probabilities
        self.cos, self.sin = position_embeddings
        b, n, _ = keys.shape
        self.batch, self.tokens = b, n
        heads = keys.view(b, n, -1, attn.head_dim).transpose(1, 2)
        self.keys = positions.rotate(heads, self.cos.unsqueeze(1), self.sin.unsqueeze(1))  # (B, H_kv, N, d)

    def logits(self, rows: Tensor) -> Tensor:
        """``(B, H, R, N)`` scaled pre-softmax logits of query rows ``rows`` (no mask)."""
        b, r = rows.shape
        queries = self._queries(rows).view(b, r, -1, self.attn.head_dim).transpose(1, 2)
        cos = gather_tokens(self.cos.expand(b, -1, -1), rows).unsqueeze(1)
        sin = gather_tokens(self.sin.expand(b, -1, -1), rows).unsqueeze(1)
        queries = self.positions.rotate(queries, cos, sin)
        keys = self.positions.repeat_kv(self.keys, self.attn.num_key_value_groups)
        return (queries @ keys.transpose(-1, -2)) * self.attn.scaling

    def masked(self, logits: Tensor, rows: Tensor) -> Tensor:
        """``logits`` of ``rows`` with the layer's mask (causal, padding) applied."""
        return masked_logits(logits, rows, self.mask)

    def rows(self, rows: Tensor, heads: str = "mean") -> Tensor:
        """``(B, R, N)`` softmax attention of query rows ``rows`` over every key, heads reduced
        by ``heads`` (``mean``, ``max``, ``sum``, or ``all``: ``(B, H, R, N)``): the
        ``attention_rows`` signal. Rows of a layer whose attention was formed whole
        (``probabilities``) are read, not re-formed, except for ``all``."""
        if self.probabilities is not None and heads in ("mean", "max", "sum"):
            kept = self.probabilities["max" if heads == "max" else "mean"]
            picked = gather_tokens(kept, rows)
            if heads == "sum":
                return picked * (self.keys.shape[1] * self.attn.num_key_value_groups)
            return picked
        return softmax_heads(self.masked(self.logits(rows), rows), heads)

    def gravity(self, rows: Tensor) -> Tensor:
        r"""``(B, R, N)`` the RoPE-only logits of all-ones queries and keys,
        :math:`G_{mn} = \frac{2}{\sqrt d} \sum_i \cos((p_m - p_n)\theta_i)` (SparseVLM v2's
        "gravity"): the scaled dot product of the rotated ones vectors."""
        ones = torch.ones_like(self.cos)
        rotated = self.positions.rotate(ones, self.cos, self.sin)  # (B, N, d)
        return (gather_tokens(rotated, rows) @ rotated.transpose(1, 2)) * self.attn.scaling

    def key_norms(self) -> Tensor:
        """``(B, N)`` L1 norm of each token's post-RoPE key, over the query heads' copies
        (DART's pivot score: the keys after ``repeat_kv``, heads concatenated)."""
        return self.keys.abs().sum(dim=(1, 3)) * self.attn.num_key_value_groups


#: the head reductions a layer formed whole keeps of its attention (``sum`` is read as mean x H;
#: a component asking for every head gets its rows re-formed from the captured q/k)
KEPT_REDUCTIONS = ("mean", "max")


def projected(attn: nn.Module, which: str, hidden: Tensor, qk_norm: bool = False) -> Tensor:
    """``(B, N, H d)`` the pre-RoPE queries (``which="q"``) or keys (``"k"``) of ``hidden``, as the
    attention forms them: its ``q_proj``/``k_proj``, then, where queries and keys are
    RMS-normalised per head (``qk_norm``: Qwen3's ``q_norm``/``k_norm``), that norm."""
    out = getattr(attn, f"{which}_proj")(hidden)
    if qk_norm:
        out = getattr(attn, f"{which}_norm")(out.view(*hidden.shape[:-1], -1, attn.head_dim)).flatten(-2)
    return out


def attention_with_probabilities(attn: nn.Module, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor],
                                 mask: Tensor | None, positions: RotaryPositions, cache=None, qk_norm: bool = False,
                                 **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    r"""A Llama attention module's prefill forward, formed explicitly: its output and its
    probabilities :math:`\mathrm{softmax}(QK^\top / \sqrt d + M)` reduced over the heads
    (``{"mean": (B, N, N), "max": (B, N, N)}``, :data:`KEPT_REDUCTIONS`).

    For a mid-layer step that reads most of the layer's attention rows (FitPrune's visual and
    text queries), forming the attention once costs what the fused kernel costs, where
    re-forming the rows next to it would add most of that again. It is formed a band of query
    rows at a time (:func:`row_bands`), so what it adds to memory is the reductions, not the
    ``(B, H, N, N)`` probabilities. The layer's own projections, RoPE and KV-cache update are
    used, so the cache holds what SDPA would have written; the softmax is float32 for half
    dtypes and the model's dtype otherwise; a fully masked row (left padding) attends to nothing.
    """
    b, n, _ = hidden.shape
    shape = (b, n, -1, attn.head_dim)
    queries, keys = (projected(attn, which, hidden, qk_norm).view(shape).transpose(1, 2) for which in "qk")
    values = attn.v_proj(hidden).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    queries, keys = positions.apply_rotary_pos_emb(queries, keys, cos, sin)
    if cache is not None:
        keys, values = cache.update(keys, values, attn.layer_idx, kwargs=kwargs)
    groups = attn.num_key_value_groups
    keys, values = positions.repeat_kv(keys, groups).transpose(-1, -2), positions.repeat_kv(values, groups)
    heads, rows = queries.shape[1], torch.arange(n, device=hidden.device).expand(b, n)
    out, reduced = None, {}
    for band in row_bands(n, b * heads, keys.shape[-1]):
        logits = masked_logits((queries[:, :, band] @ keys) * attn.scaling, rows[:, band], mask)
        probabilities = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                                      -1)
        probabilities = torch.nan_to_num(probabilities, nan=0.0)
        part = probabilities.to(values.dtype) @ values  # (B, H, band, d)
        out = part.new_empty(b, heads, n, part.shape[-1]) if out is None else out
        out[:, :, band] = part
        for how in KEPT_REDUCTIONS:
            whole = reduced.get(how)
            if whole is None:
                whole = reduced[how] = probabilities.new_empty(b, n, probabilities.shape[-1])
            whole[:, band] = reduce_heads(probabilities, how)
    out = out.transpose(1, 2).reshape(b, n, -1)
    return attn.o_proj(out), reduced


def whole_attention_mean(source: DecoderAttention, rows: Tensor, with_logits: bool = False
                         ) -> tuple[Tensor, Tensor | None]:
    """``(B, N, N)`` head-mean softmax attention of every query row (and, ``with_logits``, the
    head-mean pre-softmax logits), formed a band of rows at a time (:func:`row_bands`): the
    full ``(B, H, N, N)`` never exists at once, so the signal's memory is its own ``N x N``
    rather than ``H`` times that."""
    b, n = rows.shape
    heads = source.keys.shape[1] * source.attn.num_key_value_groups
    probs = logits_mean = None
    for band in row_bands(rows.shape[1], b * heads, source.tokens):
        part = rows[:, band]
        logits = source.logits(part)
        if with_logits:
            mean = logits.mean(dim=1)  # pre-softmax, before the causal mask
            logits_mean = mean.new_empty(b, rows.shape[1], n) if logits_mean is None else logits_mean
            logits_mean[:, band] = mean
        band_probs = softmax_heads(source.masked(logits, part))
        probs = band_probs.new_empty(b, rows.shape[1], n) if probs is None else probs
        probs[:, band] = band_probs
    return probs, logits_mean


def attention_signals(names: set[str], source: DecoderAttention, last_row: Tensor,
                      text_queries: Tensor) -> dict:
    """The attention signals of ``names`` from ``source``.

    Only the needed query rows are formed: each sample's last row for
    ``last_query_attention``, its text rows (padded to the batch's longest) for
    ``text_attention``, all rows only for the full matrix (``attention``, ``attention_logits``);
    ``attention_rows`` is a function of the rows a component chooses.

    Args:
        last_row: ``(B,)`` index of each sample's last input token.
        text_queries: ``(B, N)`` bool, the text tokens after the first visual token.
    """
    b, n = source.batch, source.tokens
    device = source.keys.device
    out = {}
    if "keys" in names:
        out["keys"] = source.keys.mean(dim=1)
    if "attention_rows" in names:
        out["attention_rows"] = source.rows
    if "key_norms" in names:
        out["key_norms"] = source.key_norms()
    if "rope_gravity" in names:
        out["rope_gravity"] = source.gravity
    wanted = names & {"attention", "attention_logits", "last_query_attention", "text_attention"}
    if not wanted:
        return out
    all_rows = bool(names & {"attention", "attention_logits"})
    if all_rows:
        rows, text_weights = torch.arange(n, device=device).expand(b, n), text_queries
        probs, logits_mean = whole_attention_mean(source, rows, "attention_logits" in names)
        if logits_mean is not None:
            out["attention_logits"] = logits_mean
    else:  # [text rows, padded ..., last row]
        count = text_queries.sum(1)
        longest = int(count.max()) if "text_attention" in names else 0
        text_rows = torch.sort((~text_queries).to(torch.uint8), dim=1, stable=True).indices[:, :longest]
        valid = torch.arange(longest, device=device) < count[:, None]
        rows = torch.cat([text_rows, last_row[:, None]], 1)
        text_weights = torch.cat([valid, valid.new_zeros(b, 1)], 1)
        probs = softmax_heads(source.masked(source.logits(rows), rows))
    if all_rows:
        out["attention"] = probs
        out["last_query_attention"] = torch.gather(probs, 1, last_row[:, None, None].expand(b, 1, n))[:, 0]
    else:
        out["last_query_attention"] = probs[:, -1]
    weights = text_weights.to(probs.dtype)
    out["text_attention"] = (weights[:, :, None] * probs).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
    return out


@dataclass
class LLMPass:
    """Token bookkeeping of one prefill and the decode steps that follow it.

    ``keep`` holds, for each token present, the index of the original token whose mask row
    and column it uses: itself for ordinary tokens, the last visual token before it for a
    token a compressor appended (it is placed right after that token). ``rope`` is the
    index into the full cos/sin table of each token's RoPE position (``keep`` while every
    step keeps positions; contiguous ranks after a renumbering step).
    """

    visual: Tensor
    real: Tensor
    last_index: Tensor
    phase: str = "prefill"
    patch: Tensor | None = None  # (B, L0) grid cell of each visual token, -1 elsewhere
    layout: Tensor | None = None  # (B, L0, 4) layout of each visual token, where the family gives one
    grids: tuple | None = None  # each part's grid for ``layout``
    protected: Tensor | None = None  # (B, L0) visual tokens no step may touch (NeXT's newlines)
    keep: Tensor | None = None
    rope: Tensor | None = None
    created: Tensor | None = None  # (B, L) tokens appended by a compressor
    extras: dict = field(default_factory=dict)
    position_embeddings: tuple[Tensor, Tensor] | None = None
    attention_mask: Tensor | None = None
    full_position_embeddings: tuple[Tensor, Tensor] | None = None
    full_attention_mask: Tensor | None = None
    input_hidden: Tensor | None = None  # (B, L0, D) the language model's input embeddings
    layer_keep: dict = field(default_factory=dict)  # tokens each layer's KV cache holds
    layer_shift: dict = field(default_factory=dict)  # decode position shift of renumbered layers
    captured: dict = field(default_factory=dict)
    sources: Tensor | None = None  # provenance (B, L, L0), when the run records it
    renumbered: bool = False  # a step renumbered the positions (``rope`` then holds ranks)
    shift: int | Tensor = 0  # positions the current frame is shifted by (renumbering: tokens gone so
    # far; (B, 1) where samples removed different numbers)
    ghost: Tensor | None = None  # (B, L) ghost slots of a ragged batch (fico.adapters.ghosts), or None
    layer_ghost: dict = field(default_factory=dict)  # the ghost slots each layer's KV cache holds
    first_counts: dict = field(default_factory=dict)  # each step's candidates per sample at its first layer
    visual_count: int | None = None  # visual tokens present (first sample), for the trace


def _decoder_layer_forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                           position_ids: Tensor | None = None, cache=None, use_cache: bool | None = False,
                           position_embeddings: tuple[Tensor, Tensor] | None = None, **kwargs) -> Tensor:
    """A Llama decoder layer with an ``llm_mid`` step between its attention and its MLP."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    site, layer = self._fico_site, self._fico_layer
    if site.forms_attention(layer, hidden_states):
        with site.run.work():
            hidden_states, probabilities = attention_with_probabilities(self.self_attn, hidden_states,
                                                                        position_embeddings, attention_mask,
                                                                        site.positions, cache, site.qk_norm)
        site.keep_attention(layer, probabilities, position_embeddings, attention_mask)
    else:
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                          position_ids=position_ids, cache=cache, use_cache=use_cache,
                                          position_embeddings=position_embeddings, **kwargs)
    hidden_states = residual + hidden_states
    hidden_states = site.mid(layer, hidden_states)
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


class LLMSite:
    """Both decoder sites of one applied recipe.

    Args:
        outer: the module whose forward receives ``input_ids``/``attention_mask``/``cache``
            and runs the language model (LLaVA's ``LlavaModel``).
        language_model: the decoder (``layers``, ``norm``, ``rotary_emb``).
        visual_token_id: the placeholder id whose positions hold visual tokens.
        passes: the forward passes of this run; the vision side leaves the grid cell of every
            visual token of the batch (flattened in order) on the pass in flight.
        tokens_per_image, grid: the unreduced visual tokens of one image and their grid.
        positions: the family's position strategy.
        qk_norm: queries and keys are RMS-normalised per head before RoPE (``q_norm``,
            ``k_norm``: Qwen3): signals take them after the norm.
    """

    def __init__(self, run: ReductionRun, plan: SitePlan, outer: nn.Module, language_model: nn.Module,
                 visual_token_id: int, passes: ForwardPasses, tokens_per_image: int, grid: tuple[int, int],
                 positions: RotaryPositions, qk_norm: bool = False):
        self.run, self.plan, self.outer, self.lm = run, plan, outer, language_model
        self.qk_norm = qk_norm
        self.layers = language_model.layers
        self.visual_token_id, self.passes, self.positions = visual_token_id, passes, positions
        self.tokens_per_image, self.grid = tokens_per_image, grid
        self.current: LLMPass | None = None
        # which layers' q/k to capture: the previous layer's for input steps (FastV's slot),
        # the layer's own for mid-layer steps
        self.capture: dict[int, set[str]] = {}
        for layer, planned in plan.steps.items():
            if planned.acts and planned.step.signal_layer == "previous":
                self._need(layer - 1, planned.step.required_signals())
        for layer, planned in plan.mid_steps.items():
            if planned.acts:
                self._need(layer, planned.step.required_signals())
        #: mid-layer steps that read attention rows: their layer forms its attention whole, once
        self.whole_attention = {layer for layer, planned in plan.mid_steps.items()
                                if planned.acts and "attention_rows" in planned.step.required_signals()}

    def _need(self, layer: int, names: set[str]) -> None:
        attention = names - {"final_normed_hidden", "input_embeddings"}
        if attention:
            self.capture.setdefault(layer, set()).update(attention)

    def attach(self) -> None:
        run = self.run
        hook(run, self.outer.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
        hook(run, self.outer.register_forward_hook(self._end_forward))
        for index, layer in enumerate(self.layers):
            hook(run, layer.register_forward_pre_hook(functools.partial(self._layer_input, index), with_kwargs=True))
        for index, names in self.capture.items():
            attn = self.layers[index].self_attn
            store = functools.partial(self._store, index)
            # the modules whose outputs are the pre-RoPE keys and queries
            key, query = (attn.k_norm, attn.q_norm) if self.qk_norm else (attn.k_proj, attn.q_proj)
            hook(run, key.register_forward_hook(lambda m, a, out, store=store: store("k", out.flatten(2))))
            if names - {"keys", "key_norms"}:
                hook(run, query.register_forward_hook(lambda m, a, out, store=store: store("q", out.flatten(2))))
            hook(run, attn.register_forward_pre_hook(functools.partial(self._attention_input, index),
                                                     with_kwargs=True))
        for index in self.plan.mid_steps:
            swap_forward(run, self.layers[index], _decoder_layer_forward, _fico_site=self, _fico_layer=index)

    # -- forward boundaries
    def _begin_forward(self, module, args, kwargs):
        self.passes.ensure().inside_model = True
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = cache is None or cache.get_seq_length() == 0
        if not prefill:
            if self.current is not None:
                self.current.phase = "decode"
            return None
        self.run.begin_trace(keep_vision=kwargs.get("mm_encoder_outputs") is not None)
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            if self.plan.steps or self.plan.mid_steps:
                raise InputError("fico: the llm site finds visual tokens through input_ids; pass input_ids, "
                                 "not inputs_embeds")
            self.current = None
            return None
        mask = kwargs.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        n = ids.shape[1]
        last = n - 1 - torch.flip(real, dims=[1]).to(torch.int8).argmax(1)
        self.current = LLMPass(visual=ids == self.visual_token_id, real=real, last_index=last)
        return None

    def _end_forward(self, module, args, output):
        self.passes.end()
        if self.current is not None:
            self.current.captured.clear()
            self.current.input_hidden = None

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
        """Grid cell of every visual token: from the vision side's kept positions if it
        reduced, else the token's rank within its image."""
        visual = lp.visual
        patches = self.passes.current.image_patches if self.passes.current is not None else None
        patch = torch.full_like(visual, -1, dtype=torch.long)
        if visual.is_meta:
            return patch
        if patches is not None and patches.numel() == int(visual.sum()):
            return patch.masked_scatter(visual, patches.reshape(-1).to(visual.device))
        rank = visual.long().cumsum(1) - 1
        return torch.where(visual, rank % self.tokens_per_image, patch)

    def _place_layout(self, lp: LLMPass) -> None:
        """The family's per-token layout and protected visual tokens, placed on the sequence."""
        current = self.passes.current
        if current is None or current.visual_layout is None or lp.visual.is_meta:
            return
        visual = lp.visual
        if current.visual_layout.shape[0] != int(visual.sum()):
            raise InputError(f"fico: the image features give {current.visual_layout.shape[0]} visual tokens, "
                             f"input_ids holds {int(visual.sum())} placeholders")
        layout = torch.full((*visual.shape, 4), -1, dtype=torch.long, device=visual.device)
        lp.layout = layout.masked_scatter(visual[..., None], current.visual_layout.to(visual.device))
        lp.grids = current.visual_grids
        if current.protected_visual is not None:
            lp.protected = torch.zeros_like(visual).masked_scatter(visual, current.protected_visual.to(visual.device))

    # -- per layer
    def _layer_input(self, layer: int, module, args, kwargs):
        lp = self.current
        if lp is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if lp.phase == "decode":
            return self._decode(layer, lp, args, kwargs)
        if layer == 0:
            lp.full_position_embeddings = kwargs.get("position_embeddings")
            lp.full_attention_mask = kwargs.get("attention_mask")
            lp.patch = self._patch_cells(lp)
            self._place_layout(lp)
            lp.input_hidden = hidden
            if self.run.provenance:
                n0 = hidden.shape[1]
                lp.sources = torch.eye(n0, device=hidden.device).expand(hidden.shape[0], n0, n0)
            lp.visual_count = None if lp.visual.is_meta else int(lp.visual[0].sum())
        planned = self.plan.steps.get(layer)
        if planned is not None and planned.acts:
            with self.run.work():
                hidden = self._reduce(layer, planned, lp, hidden, self._input_source(layer, planned, lp, hidden))
        # what earlier layers captured is read by no later step (an input step reads the layer
        # before it, a mid step its own): let it go, rather than hold every layer's q/k and
        # attention until the forward ends
        for done in [index for index in lp.captured if index < layer]:
            del lp.captured[done]
        self.run.trace.llm.append(hidden.shape[1])
        if lp.ghost is not None:
            self.run.trace.ghosts[layer] = lp.ghost.sum(1).tolist()
        if lp.visual_count is not None:
            self.run.trace.visual.append(lp.visual_count)
        if lp.keep is None:
            return None
        lp.layer_keep[layer] = lp.keep
        if lp.ghost is not None:
            lp.layer_ghost[layer] = lp.ghost
        if isinstance(lp.shift, Tensor) or lp.shift:
            lp.layer_shift[layer] = lp.shift
        kwargs["attention_mask"] = lp.attention_mask
        kwargs["position_embeddings"] = lp.position_embeddings
        kwargs["position_ids"] = torch.arange(hidden.shape[1], device=hidden.device)[None]
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def present_rows(self, mask: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """An addition the model makes over the unreduced sequence, for the tokens present now:
        ``mask`` ``(B, L0)`` bool marks where ``rows`` ``(mask.sum(), D)`` go, in row-major order
        (Qwen3-VL's DeepStack features, added to the visual tokens after its first decoder
        layers). Returns the mask over the tokens present and their rows; tokens a compressor
        created and ghost slots get none. Unchanged while no step has reduced this prefill."""
        lp = self.current
        if lp is None or lp.phase != "prefill" or lp.keep is None:
            return mask, rows
        source = lp.keep.clamp_min(0)
        rank = (mask.reshape(-1).long().cumsum(0) - 1).reshape(mask.shape)
        present = gather_tokens(mask.to(source.device), source) & ~lp.created
        if lp.ghost is not None:
            present &= ~lp.ghost
        return present, rows[gather_tokens(rank.to(source.device), source)[present]]

    def forms_attention(self, layer: int, hidden: Tensor) -> bool:
        """Whether ``layer`` forms its attention whole in this forward (a prefill whose
        mid-layer step reads attention rows)."""
        lp = self.current
        return (layer in self.whole_attention and lp is not None and lp.phase == "prefill"
                and not hidden.is_meta)

    def keep_attention(self, layer: int, probabilities: Tensor, position_embeddings, attention_mask) -> None:
        slot = self.current.captured.setdefault(layer, {})
        slot.update(probabilities=probabilities, position_embeddings=position_embeddings,
                    attention_mask=attention_mask)

    def mid(self, layer: int, hidden: Tensor) -> Tensor:
        """The ``llm_mid`` step of ``layer``, called by the class-swapped decoder layer."""
        lp = self.current
        planned = self.plan.mid_steps.get(layer)
        if lp is None or lp.phase != "prefill" or planned is None or not planned.acts:
            return hidden
        with self.run.work():
            return self._reduce(layer, planned, lp, hidden, self._captured_source(layer, planned, lp))

    # -- signals
    def _captured_source(self, layer: int, planned: PlannedStep, lp: LLMPass) -> DecoderAttention | None:
        """The attention of ``layer`` from its captured projections (it has run)."""
        if not planned.step.required_signals() - {"final_normed_hidden", "input_embeddings"}:
            return None
        capture = lp.captured.get(layer)
        if capture is None or capture.get("k") is None:
            return None
        q = capture.get("q")
        return DecoderAttention(self.layers[layer].self_attn, capture["k"],
                                (lambda rows: gather_tokens(q, rows)) if q is not None else None,
                                capture["position_embeddings"], capture["attention_mask"], self.positions,
                                capture.get("probabilities"))

    def _input_source(self, layer: int, planned: PlannedStep, lp: LLMPass, hidden: Tensor
                      ) -> DecoderAttention | None:
        step = planned.step
        if step.signal_layer == "previous":
            return self._captured_source(layer - 1, planned, lp)
        names = step.required_signals() - {"final_normed_hidden", "input_embeddings"}
        if not names or hidden.is_meta:
            return None
        # PyramidDrop ranks with this layer's own q/k of its (current) input
        module = self.layers[layer]
        attn = module.self_attn
        normed = module.input_layernorm(hidden)
        cos_sin = lp.position_embeddings or lp.full_position_embeddings
        mask = lp.attention_mask if lp.keep is not None else lp.full_attention_mask
        return DecoderAttention(attn, projected(attn, "k", normed, self.qk_norm),
                                lambda rows: projected(attn, "q", gather_tokens(normed, rows), self.qk_norm),
                                cos_sin, mask, self.positions)

    def _signals(self, names: set[str], source: DecoderAttention | None, lp: LLMPass, keep: Tensor,
                 hidden: Tensor, text: Tensor, first_visual: Tensor) -> dict:
        signals = {}
        if source is not None:
            last_row = (keep == lp.last_index[:, None]).to(torch.int8).argmax(1)
            signals = attention_signals(names, source, last_row, text & (keep > first_visual))
        if "final_normed_hidden" in names:
            signals["final_normed_hidden"] = self.lm.norm(hidden)
        if "input_embeddings" in names:
            signals["input_embeddings"] = gather_tokens(lp.input_hidden, keep)
        return {name: signals[name] for name in names}

    # -- the step
    def _reduce(self, layer: int, planned: PlannedStep, lp: LLMPass, hidden: Tensor,
                source: DecoderAttention | None) -> Tensor:
        b, n = hidden.shape[:2]
        keep = lp.keep if lp.keep is not None else torch.arange(n, device=hidden.device).expand(b, n)
        created = lp.created if lp.created is not None else torch.zeros(b, n, dtype=torch.bool, device=keep.device)
        ghost = lp.ghost if lp.ghost is not None else torch.zeros_like(created)
        visual = (gather_tokens(lp.visual, keep) | created) & ~ghost
        real = (gather_tokens(lp.real, keep) | created) & ~ghost
        candidate = visual & real
        if lp.protected is not None:
            candidate &= ~(gather_tokens(lp.protected, keep) & ~created)
        step = planned.step
        available = [planned.candidates_in] * b if hidden.is_meta else candidate.sum(1).tolist()
        # a schedule relative to the step's first layer (PyramidDrop's) counts each sample's own
        firsts = lp.first_counts.setdefault(step.index, available) if not hidden.is_meta else [planned.first] * b
        removals = []
        for count, first in zip(available, firsts) if planned.remove is not None else ():
            # a keep above this sample's count (its images brought fewer tokens than the plan's
            # bound: a smaller LLaVA-NeXT image, an adaptive step before) keeps all of them
            requested = max(requested_removal(step, count, planned.position, first, layers=planned.step_layers,
                                              depth=planned.site_layers), 0)
            if requested > count:
                raise RecipeError(f"{self.run.recipe.source}: {step.where}.{step.schedule.kind}: removes {requested} "
                                  f"tokens at {step.site} layer {layer}, where only {count} visual tokens are left")
            removals.append(step.filter.discard(requested, n, count))
        text = real & ~visual
        first_visual = torch.where(visual, keep, torch.iinfo(keep.dtype).max).min(1, keepdim=True).values
        signals = {}
        names = step.required_signals()
        if names and not hidden.is_meta:
            signals = self._signals(names, source, lp, keep, hidden, text, first_visual)
        patch = torch.where(created, -1, gather_tokens(lp.patch, keep))
        layout = None if lp.layout is None else torch.where(created[..., None], -1, gather_tokens(lp.layout, keep))
        # the RoPE index of each token present travels with it through the step, and so do
        # the ghost flags of a ragged batch
        extras = dict(lp.extras, _fico_rope=lp.rope if lp.rope is not None else keep)
        if lp.ghost is not None:
            extras[GHOST] = ghost.long()
        # Created tokens (appended by a compressor) have no original position of their own.
        state = TokenState(hidden=hidden, positions=torch.where(created, -1, keep), candidate=candidate,
                           visual=visual, text=text, patch=patch, grid=lp.grids[0] if lp.grids else self.grid,
                           signals=signals,
                           extras=extras, sources=lp.sources, site=step.site, layer=layer, layout=layout,
                           grids=lp.grids if layout is not None else None)
        if planned.remove is None:
            removals = self._chosen_removals(planned, state, available)
        appended = any(step.compressor.appended(r) for r in removals)
        if len(set(available)) > 1 or len(set(removals)) > 1:
            # each sample has its own candidates and count: ghost slots pad the shorter outputs
            new, seconds = step_per_sample(planned, state, removals, self.run.sync_stage_timing)
        elif removals[0] == 0 and not hidden.is_meta:  # (a budget above every sample's count)
            new, seconds = state, 0.0
        else:
            new, seconds = run_step(planned, state, removals[0], self.run.sync_stage_timing)
        keep, hidden, extras, sources = new.positions, new.hidden, dict(new.extras), new.sources
        created = keep < 0
        ghost = extras.pop(GHOST) == 1 if GHOST in extras else None
        if appended or ghost is not None:
            if appended:
                # Created tokens sit right after the last original visual token present and
                # borrow its mask row/column (and, while positions are kept, its RoPE position).
                anchor = torch.where(new.visual & ~created, keep, -1).max(1, keepdim=True).values
                keep = torch.where(created, anchor, keep)
            order = torch.sort(keep * 2 + created.long(), dim=1, stable=True).indices
            keep, hidden, created = (gather_tokens(t, order) for t in (keep, hidden, created))
            extras = {k: gather_tokens(v, order) for k, v in extras.items()}
            sources = None if sources is None else gather_tokens(sources, order)
            ghost = None if ghost is None else gather_tokens(ghost, order)
        rope = extras.pop("_fico_rope")
        if appended:
            # a created token borrows its anchor's RoPE index, as it borrows its mask index;
            # indices grow along the sequence, so the anchor's is the largest of the visual tokens'
            present = ~created & gather_tokens(lp.visual, keep.clamp_min(0))
            if ghost is not None:
                present &= ~ghost
            anchor = torch.where(present, rope, -1).amax(1, keepdim=True)
            rope = torch.where(created, anchor, rope)
        record = StepRecord(step.site, layer, n, hidden.shape[1], removals[0], seconds)
        if sources is not None:
            after = torch.where(created, -1, keep)
            if ghost is not None:  # a ghost slot holds a discarded token
                after = torch.where(ghost, -2, after)
            record_provenance(record, state.positions, after, sources, state.token_layout())
        if ghost is not None and not bool(ghost.any()):
            ghost = None
        lp.keep, lp.created, lp.extras, lp.sources, lp.ghost = keep, created, extras, sources, ghost
        if not hidden.is_meta:
            counts = (gather_tokens(lp.visual, keep.clamp_min(0)) | created)
            counts = (counts if ghost is None else counts & ~ghost).sum(1).tolist()
            lp.visual_count = counts[0]
        if step.positions == "renumber":
            # contiguous positions: the i-th token present takes the i-th position of the full
            # table (real tokens are contiguous there, padding before or after them; ghost
            # slots take no position, and each sample's frame is shifted by what it removed)
            rope = torch.arange(hidden.shape[1], device=keep.device).expand(b, -1)
            lp.shift = lp.real.shape[1] - hidden.shape[1]
            if ghost is not None:
                rope = ((~ghost).long().cumsum(1) - 1).clamp_min(0)
                lp.shift = lp.shift + ghost.sum(1, keepdim=True)
            lp.renumbered = True
        lp.rope = rope
        lp.position_embeddings = self.positions.present(lp.full_position_embeddings, rope, lp.renumbered, self.lm,
                                                        hidden, lp.real)
        full_mask = lp.full_attention_mask
        if ghost is not None and full_mask is None:
            full_mask = lp.full_attention_mask = causal_mask(b, lp.real.shape[1], keep.device)
        lp.attention_mask = _gather_square(full_mask, keep)
        if ghost is not None:
            lp.attention_mask = hide_ghosts(lp.attention_mask, ghost)
        self.run.trace.steps.append(record)
        return hidden

    def _chosen_removals(self, planned: PlannedStep, state: TokenState, available: list[int]) -> list[int]:
        """What an adaptive step (``keep: adaptive``) removes from each sample: the filter
        chooses from the sample alone, as it would in a batch of one."""
        step = planned.step
        if state.hidden.is_meta:
            raise InputError(f"fico: {step.where} chooses its count from the data; it cannot run on the meta device")
        removals = []
        for index, count in enumerate(available):
            keep = step.filter.adaptive_keep(select_sample(state, index))
            if not 0 <= keep <= count:
                raise RecipeError(f"{self.run.recipe.source}: {step.where}: the filter {step.filter.name!r} chose to "
                                  f"keep {keep} of {count} candidates at {step.site} layer {planned.layer}")
            removals.append(count - keep)
        return removals

    def _decode(self, layer: int, lp: LLMPass, args, kwargs):
        keep = lp.layer_keep.get(layer)
        if keep is None:
            return None
        changed = False
        shift = lp.layer_shift.get(layer)
        if shift is not None:
            # renumbered layers: the new token's position in that layer's own frame
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                raise InputError("fico: renumbered positions need position_ids in decode steps (generate passes them)")
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs["position_embeddings"] = self.positions.embeddings(self.lm, hidden, position_ids - shift)
            changed = True
        mask = kwargs.get("attention_mask")
        ghost = lp.layer_ghost.get(layer)
        b = keep.shape[0]
        if mask is not None:
            full = lp.real.shape[1]
            new_columns = torch.arange(full, mask.shape[-1], device=keep.device).expand(b, -1)
            columns = torch.cat([keep, new_columns], dim=1)
            mask = mask.expand(b, *mask.shape[1:])
            mask = torch.gather(mask, 3, columns[:, None, None, :].expand(b, mask.shape[1], mask.shape[2],
                                                                          columns.shape[1]))
        elif ghost is not None:
            # the model leaves a decode step's mask implicit; ghost slots need one
            hidden = args[0] if args else kwargs["hidden_states"]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            queries, held = hidden.shape[1], cache.get_seq_length(layer)
            new = torch.ones(queries, queries, dtype=torch.bool, device=keep.device).tril()
            mask = torch.cat([new.new_ones(queries, held), new], 1).expand(b, 1, queries, held + queries)
        if ghost is not None:  # no decode query attends to a ghost slot
            ghost = torch.cat([ghost, ghost.new_zeros(b, mask.shape[-1] - ghost.shape[1])], 1)
            mask = hide_ghosts(mask, ghost, rows=torch.full((b, mask.shape[2]), -1, device=keep.device))
        if mask is not None:
            kwargs["attention_mask"] = mask
            changed = True
        # without a mask, one query attends to everything its (shorter) cache holds
        return (args, kwargs) if changed else None


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
