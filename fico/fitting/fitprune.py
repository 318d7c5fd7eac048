"""Fitting FitPrune's per-layer schedule on a model, by its authors' procedure.

FitPrune (Ye et al., AAAI 2025) removes visual tokens inside every decoder layer, as many as
a table fitted offline gives each layer for a FLOPs reduction target. Its official
``statistical_analysis.py`` fits the table on calibration samples:

1. **Reference masses.** Per sample s and layer l of the unreduced model, with :math:`A`
   the attention maximised over heads, V the N visual tokens and Q the text after them:
   :math:`W^c_{s,l} = \\frac{1}{|Q|}\\sum_{q \\in Q}\\sum_{j \\in V} A_{qj}` and
   :math:`W^s_{s,l} = \\frac{1}{N}\\sum_{q \\in V}\\sum_{j \\in V} A_{qj}`.
2. **A schedule for a given** :math:`\\alpha`. Layer by layer, each sample discards the
   visual tokens that :class:`fico.filters.cross_self.RetainedAttentionMass` chooses (those
   whose loss keeps :math:`1 - \\alpha` of both masses), until the FLOPs forecast
   (visual tokens only: what has run plus, from this layer on, the tokens present) averaged
   over the samples reaches :math:`(1 - r)` of the unreduced cost. The layer's table entry
   is the samples' total removal there, floor-divided by their number; layers from the
   reaching one on remove nothing.
3. **Bisection** on :math:`\\alpha \\in [0, 1]` down to a width of 0.01: an
   :math:`\\alpha` that reaches the target lowers the upper end, one that does not raises
   the lower end. The table is that of the last :math:`\\alpha` tried, as the official
   script prints it, which misses the target where that :math:`\\alpha` did
   (``reaches_budget``; the shipped tables for ratios 10-40 are such: they reduce 6.4%,
   15.3%, 27.9% and 38.8%, those for 50-90 within 0.5 points below their target);
   ``tried`` holds every step, the smallest reaching :math:`\\alpha`'s table among them.

The FLOPs forecast is the official one, with the model's own widths in place of
LLaMA-7B's constants (4096, 11008): per visual token and layer, q/k/v projections
:math:`D(D_q + 2 D_{kv})`, attention :math:`2 N D_q` (times N tokens), output projection
:math:`D_q D` and MLP :math:`3 D F`. ``count_as`` counts with another model's widths
(``llava-1.5-7b``: the official constants) while the attention comes from the model run.

Each sample runs through the model once per :math:`\\alpha` with a one-step recipe
(``llm_mid`` at every layer, ``keep: adaptive``, the rule above), so the fitting removes
tokens exactly as fico's FitPrune site does.

>>> from fico.fitting.fitprune import FlopsModel
>>> f = FlopsModel(hidden=4096, q_width=4096, kv_width=4096, ffn=11008, layers=32)
>>> f.unreduced(576) == ((576 * 4096 * 4096 * 3 + 576 * 576 * 4096 + 576 * 4096 * 576
...                      + 576 * 4096 * 4096) + 4096 * 11008 * 576 * 3) * 32
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import InputError, RecipeError

#: the bisection stops when the alpha interval is this narrow (the official 0.01 + 1e-6)
ALPHA_WIDTH = 0.01 + 1e-6


@dataclass(frozen=True)
class FlopsModel:
    """FitPrune's forecast of the decoder's visual-token FLOPs (multiply-accumulates)."""

    hidden: int
    q_width: int
    kv_width: int
    ffn: int
    layers: int

    @classmethod
    def of(cls, spec) -> "FlopsModel":
        """From a :func:`fico.cost.model_spec` (LLaVA or Qwen-VL)."""
        head_dim = getattr(spec, "llm_head_dim", None) or spec.llm_hidden // spec.llm_heads
        return cls(spec.llm_hidden, spec.llm_heads * head_dim, spec.kv_width, spec.llm_ffn, spec.llm_layers)

    def attention(self, n: int) -> int:
        """q/k/v projections and the two attention products of ``n`` tokens (the official ``tmp``)."""
        return n * self.hidden * (self.q_width + 2 * self.kv_width) + 2 * n * n * self.q_width

    def after_attention(self, n: int) -> int:
        """The output projection and the MLP of ``n`` tokens."""
        return n * (self.q_width * self.hidden + 3 * self.hidden * self.ffn)

    def layer(self, n: int) -> int:
        return self.attention(n) + self.after_attention(n)

    def unreduced(self, n: int) -> int:
        return self.layer(n) * self.layers

    def rest(self, n: int, layer: int) -> int:
        """``layer``'s output projection and MLP, and every later layer, at ``n`` tokens."""
        return self.after_attention(n) + self.layer(n) * (self.layers - 1 - layer)


@dataclass
class FitPruneFit:
    """A fitted FitPrune table and how it was found."""

    remove: list[int]  # visual tokens removed in each decoder layer
    alpha: float
    reaches_budget: bool
    reduction_ratio: float  # the FLOPs reduction target, a fraction
    samples: int
    visual_tokens: int  # visual tokens of a calibration sample (their mean, if they differ)
    tried: list[dict] = field(default_factory=list)  # each bisection step: alpha, reached, table

    @property
    def after_each_layer(self) -> list[int]:
        """Visual tokens left after each layer's removal."""
        left, out = self.visual_tokens, []
        for count in self.remove:
            left -= count
            out.append(left)
        return out

    @property
    def mean_tokens(self) -> float:
        """Visual tokens averaged over the layers (after each layer's removal), as the official
        tables are summarised (172.6 for ``reduction_ratio`` 70 on LLaVA-1.5-7B)."""
        after = self.after_each_layer
        return sum(after) / len(after)

    def as_dict(self) -> dict:
        return {"remove": self.remove, "alpha": self.alpha, "reaches_budget": self.reaches_budget,
                "reduction_ratio": self.reduction_ratio, "samples": self.samples,
                "visual_tokens": self.visual_tokens, "mean_tokens": round(self.mean_tokens, 2),
                "output_tokens": self.after_each_layer[-1], "tried": self.tried}


def reference_masses(model, inputs: dict[str, torch.Tensor]) -> tuple[list[float], list[float]]:
    """``(W^c, W^s)`` of one sample (a batch of one) in every decoder layer of the unreduced
    model, from its eager attention probabilities (``output_attentions``)."""
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise InputError(f"fico: FitPrune's fitting runs one sample at a time, got a batch of {ids.shape[0]}")
    visual = ids[0] == model.config.image_token_id
    if not bool(visual.any()):
        raise InputError("fico: a calibration sample holds no image token")
    order = torch.arange(ids.shape[1], device=ids.device)
    after = ~visual & (order > order[visual].max())
    if "attention_mask" in inputs:
        after &= inputs["attention_mask"][0].bool()
    # eager throughout (the vision tower is asked for attentions too), each part restored after
    previous = {name: getattr(model.config, name)._attn_implementation for name in model.config.sub_configs}
    previous[""] = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        attentions = model(**inputs, output_attentions=True, logits_to_keep=1).attentions
    finally:
        model.set_attn_implementation(previous)
    cross, self_ = [], []
    for attention in attentions:
        top = attention[0].float().amax(0)  # (L, L): heads maximised
        onto_visual = top[:, visual]
        cross.append(onto_visual[after].sum().item() / max(int(after.sum()), 1))
        self_.append(onto_visual[visual].sum().item() / int(visual.sum()))
    return cross, self_


def rule_recipe(alpha: float, cross_mass: list[float], self_mass: list[float]):
    """The one-step recipe that runs the fitting rule at every decoder layer (one sample)."""
    from omegaconf import OmegaConf

    from ..recipe.build import build_recipe

    config = OmegaConf.create({
        "name": "fitprune_fitting",
        "description": "FitPrune's fitting rule at every decoder layer (fico.fitting.fitprune)",
        "cite": ["ye2025fitprune"],
        "steps": [{"site": "llm_mid", "layers": "all", "keep": "adaptive",
                   "filter": {"name": "retained_attention_mass", "alpha": alpha, "cross_mass": cross_mass,
                              "self_mass": self_mass},
                   "correlate": "none", "compress": "drop"}]})
    return build_recipe(config, Path("fitprune_fitting.yaml"), "fitprune fitting", None)


def removals(model, inputs: dict[str, torch.Tensor], recipe) -> tuple[list[int], list[int]]:
    """``(entering, removed)``: per decoder layer, the visual tokens entering it and those the
    rule removes there, for one sample."""
    import fico

    with fico.apply(model, recipe) as run:
        model(**inputs, logits_to_keep=1)
    trace = run.trace
    removed = [0] * len(trace.visual)
    for record in trace.steps:
        if record.site == "llm_mid":
            removed[record.layer] = record.removed
    return list(trace.visual), removed


def table_for(counts: list[tuple[list[int], list[int]]], flops: FlopsModel, ratio: float
              ) -> tuple[bool, list[int]]:
    """``(reached, table)`` from each sample's ``(entering, removed)`` per layer under the rule
    at every layer: the official stop, at the first layer whose forecast (what ran before
    it, its attention at the tokens entering it, the rest at those tokens) averaged over the
    samples is within ``(1 - ratio)`` of the unreduced cost. A layer's removals do not
    change what entered it, so stopping afterwards gives the counts stopping there would."""
    samples = len(counts)
    budget = sum(flops.unreduced(entering[0]) for entering, _ in counts) / samples * (1 - ratio)
    spent, table = 0, []
    for layer in range(flops.layers):
        spent += sum(flops.attention(entering[layer]) for entering, _ in counts)
        forecast = sum(flops.rest(entering[layer], layer) for entering, _ in counts)
        if (spent + forecast) / samples <= budget:
            return True, table + [0] * (flops.layers - layer)
        table.append(sum(removed[layer] for _, removed in counts) // samples)
        spent += sum(flops.after_attention(entering[layer] - removed[layer]) for entering, removed in counts)
    return False, table


def fit_fitprune(model, samples: list[dict[str, torch.Tensor]], reduction_ratio: float, spec: Any = None,
                 progress: Callable[[str], None] | None = None,
                 masses: list[tuple[list[float], list[float]]] | None = None) -> FitPruneFit:
    """FitPrune's table for ``model`` at the FLOPs reduction ``reduction_ratio`` (a fraction,
    0.7 for the official ``70``), fitted on ``samples`` (processor outputs, one sample each);
    ``spec``: whose widths the FLOPs forecast counts with (default: the model's own, from
    :func:`fico.cost.model_spec`; its depth must be the model's); ``masses``: the samples'
    :func:`reference_masses`, where several ratios are fitted on them."""
    from ..cost.model import model_spec

    if not 0 <= reduction_ratio < 1:
        raise RecipeError(f"fico fit fitprune: the reduction ratio must be in [0, 1), got {reduction_ratio!r}")
    if not samples:
        raise InputError("fico: FitPrune's fitting needs at least one calibration sample")
    flops = FlopsModel.of(model_spec(model if spec is None else spec))
    layers = model.config.get_text_config().num_hidden_layers
    if flops.layers != layers:
        raise RecipeError(f"fico fit fitprune: the FLOPs are counted for {flops.layers} decoder layers; the model "
                          f"has {layers}")
    say = progress or (lambda text: None)
    with torch.inference_mode():
        if masses is None:
            masses = [reference_masses(model, inputs) for inputs in samples]
            say(f"reference masses of {len(samples)} samples")
        low, high, last = 0.0, 1.0, None
        tried = []
        while high - low > ALPHA_WIDTH:
            alpha = (low + high) / 2
            counts = [removals(model, inputs, rule_recipe(alpha, cross, self_))
                      for inputs, (cross, self_) in zip(samples, masses)]
            reached, table = table_for(counts, flops, reduction_ratio)
            tried.append({"alpha": alpha, "reached": reached, "remove": table})
            say(f"alpha {alpha:.4f}: {'reaches' if reached else 'misses'} the target, removes {sum(table)}")
            last = (alpha, reached, table, counts)
            high, low = (alpha, low) if reached else (high, alpha)
    alpha, reached, table, counts = last
    visual = round(sum(entering[0] for entering, _ in counts) / len(counts))
    return FitPruneFit(table, alpha, reached, reduction_ratio, len(samples), visual, tried)

