"""What a recipe is once read: its :class:`Recipe`, :class:`Step` and :class:`Schedule`, and
the keys a step may carry."""

from __future__ import annotations

import keyword
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import RecipeError
from ..registry import Registry
from ..signals import INSTRUCTION_SIGNALS
from ..stages import Compressor, Correlator, Filter

SITES = ("vision", "vision_output", "pre_llm", "llm", "llm_mid")


POINT_SITES = ("vision_output", "pre_llm")


RESERVED = {"name", "description", "cite", "plugins", "steps", "base", "budget_tflops", "tables"}


STEP_KEYS = {"site", "layers", "remove", "keep", "keep_ratio", "remove_ratio", "keep_geometric", "filter",
             "correlate", "compress", "proportional_attention", "order", "positions", "signal_layer", "cls_feature",
             "text_encoder", "vision_layer"}


SCHEDULE_KEYS = ("remove", "keep", "keep_ratio", "remove_ratio", "keep_geometric")


#: step keys that only some sites take, with their values
SITE_OPTIONS = {
    "order": (POINT_SITES, ("original", "method")),
    "positions": (("llm", "llm_mid"), ("keep", "renumber")),
    "signal_layer": (("llm",), ("previous", "current")),
    "cls_feature": (("vision_output",), (True, False)),
    "proportional_attention": (("vision",), (True, False)),
}


STEP_DEFAULTS = {"order": "original", "positions": "keep", "signal_layer": "previous", "cls_feature": False,
                 "proportional_attention": False}


STAGE_KEYS = {"filter": "filter", "correlate": "correlator", "compress": "compressor"}


@dataclass(frozen=True)
class Schedule:
    """How many candidates one step discards, from the number ``n`` present.

    * ``remove``: a fixed count, or one count per layer of the step, or several such lists
      keyed by how many layers the step runs at (``{32: [...], 6: [...]}``: tables fitted per
      model depth, FitPrune's; the plan takes the one for the model);
    * ``keep``: keep a fixed count (or one per layer, or lists by depth); ``filter``: the filter's own rule
      from the token count (pooling's windows); or ``adaptive``: the filter chooses per
      image (PruMerge's outlier count);
    * ``keep_ratio``: keep ``ceil(keep_ratio * n)`` (EViT);
    * ``remove_ratio``: remove ``round(remove_ratio * n)`` (FastV; Python's round);
    * ``keep_geometric``: at the s-th layer of the step keep ``int(n0 * ratio ** (s + 1))`` of
      the ``n0`` candidates that entered its first layer (PyramidDrop's stages); or ratios keyed
      by the site's depth (``{default: 0.19, 6: 0.335}``, with layers by depth: a budget rule
      solved per depth), the plan taking the one for the model.
    """

    kind: str
    value: float | str | tuple[int, ...] | dict[int, tuple[int, ...]] | dict[int | str, float]
    #: the value as written, when it came from knobs (``${keep}``), for messages
    source: str | None = field(default=None, compare=False)

    def shown(self) -> str:
        """The value for messages, with the knobs it came from."""
        return f" (from {self.source})" if self.source else ""

    @property
    def counts_kept(self) -> bool:
        """A fixed ``keep`` count: it counts every visual token that stays, the protected ones
        too (LLaVA-NeXT's newlines), where the other schedules count candidates."""
        return self.kind == "keep" and self.value not in ("filter", "adaptive")

    def counts_for(self, layers: int) -> tuple[int, ...] | None:
        """The per-layer counts for a step that runs at ``layers`` layers (lists keyed by depth:
        the one of that length, None where there is none); the list itself otherwise."""
        if isinstance(self.value, dict):
            return self.value.get(layers)
        return self.value if isinstance(self.value, tuple) else None

    def ratio_at(self, depth: int | None) -> float | None:
        """A ``keep_geometric`` ratio for a site of ``depth`` layers: the one keyed by that depth,
        else the ``default`` (None where there is neither)."""
        if not isinstance(self.value, dict):
            return self.value
        return self.value.get(depth, self.value.get("default"))

    def tokens_to_remove(self, n: int, position: int = 0, first: int | None = None,
                         layers: int | None = None, depth: int | None = None) -> int | None:
        """Tokens to remove from ``n`` candidates at the ``position``-th of the step's
        ``layers`` layers (``first``: candidates at its first layer) on a site of ``depth``
        layers; None when the filter decides."""
        value = self.value
        if self.kind == "keep_geometric" and isinstance(value, dict):
            value = self.ratio_at(depth)
            if value is None:
                raise ValueError(f"no keep_geometric ratio for a site of {depth} layers (ratios for "
                                 f"{sorted(map(str, self.value))})")
        elif isinstance(value, dict):
            if layers not in value:
                raise ValueError(f"no count list for a step at {layers} layers (lists for {sorted(value)})")
            value = value[layers]
        value = value[position] if isinstance(value, tuple) else value
        if self.kind == "remove":
            return int(value)
        if self.kind == "keep":
            if value == "filter":
                raise ValueError("keep: filter is planned by the filter (fico.recipe.plan.requested_removal)")
            return None if value == "adaptive" else n - int(value)
        if self.kind == "keep_ratio":
            return n - math.ceil(value * n)
        if self.kind == "keep_geometric":
            return n - int((n if first is None else first) * value ** (position + 1))
        return int(round(value * n))


@dataclass
class Step:
    """One reduction step of a recipe, applied at each of ``layers`` of ``site``."""

    index: int
    site: str
    #: indices, "all", "START:STOP", "stages:S", or index lists by the site's depth (and a "default"),
    #: resolved against the model
    layers: list[int] | str | dict[int | str, list[int]]
    schedule: Schedule
    filter: Filter
    correlator: Correlator
    compressor: Compressor
    proportional_attention: bool = False
    #: point sites: ``original`` token order, or the order the method emits (``Split.order``)
    order: str = "original"
    #: llm sites: kept tokens ``keep`` their RoPE positions, or positions are ``renumber``-ed
    positions: str = "keep"
    #: llm site: signals from the ``previous`` layer (FastV) or this layer at its input (PyramidDrop)
    signal_layer: str = "previous"
    #: vision_output site: [CLS] reaches the projector as a feature (VisionZip)
    cls_feature: bool = False
    #: pre_llm site: a local CLIP checkpoint whose text tower gives instruction signals (CDPruner)
    text_encoder: str | None = None
    #: pre_llm site of towers without [CLS]: the vision block whose attention its tower signals
    #: read (negative: from the end); None: the family's default (its last full-attention block)
    vision_layer: int | None = None
    #: the recipe text ``layers`` came from, when it interpolates knobs (for messages)
    layers_source: str | None = field(default=None, compare=False)

    def required_signals(self) -> set[str]:
        return self.filter.required_signals() | self.correlator.required_signals() | self.compressor.required_signals()

    @property
    def where(self) -> str:
        return f"steps[{self.index}]"


@dataclass
class Recipe:
    """A loaded, validated recipe. ``config`` is the resolved OmegaConf tree."""

    name: str
    source: str
    config: DictConfig
    steps: list[Step]
    registry: Registry = field(repr=False)
    description: str = ""
    #: How a ``budget_tflops:`` was met (:class:`fico.cost.budget.BudgetSolution`), or None.
    budget: Any = None
    #: What differs from the recipe the description was written for (overrides or a
    #: ``base:`` recipe's own steps), e.g. ``["steps[0].filter: centroid instead of attention_rank"]``.
    changes: list[str] = field(default_factory=list)
    #: Local plugin files the recipe's registry loaded (its ``plugins:`` and those given).
    plugin_files: list[Path] = field(default_factory=list)
    #: Auxiliary models an adapter loaded for this recipe (CDPruner's CLIP text tower), by
    #: checkpoint, device and dtype, so that applying it batch after batch loads them once.
    auxiliary: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def needs_instruction(self) -> bool:
        """Whether a step reads the instruction text (pass ``instruction=`` to the reduced model)."""
        return any(step.required_signals() & INSTRUCTION_SIGNALS for step in self.steps)

    def instruction_inputs(self, texts: str | list[str]) -> dict:
        """The keyword arguments that hand the model this recipe is applied to its instruction
        texts (one per sample): ``{"instruction": texts}`` where a step reads them, else none
        (a model without such a recipe takes no ``instruction`` argument)."""
        return {"instruction": texts} if self.needs_instruction else {}

    @property
    def knobs(self) -> dict[str, Any]:
        return {k: OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v
                for k, v in self.config.items() if k not in RESERVED}

    def error(self, key: str, message: str) -> RecipeError:
        return RecipeError(f"{self.source}: {key}: {message}")


def knobs_in(source: str | None) -> list[str]:
    """The top-level knobs an interpolation reads: ``${fico.pick:${tables.keep},${budget}}`` -> ``['budget']``."""
    names = re.findall(r"\$\{([A-Za-z_][\w.]*)\}", source or "")
    return list(dict.fromkeys(n for n in names if "." not in n and n != "tables"))


def python_name(key: str) -> str:
    """A recipe parameter's keyword-argument name (``lambda`` -> ``lambda_``)."""
    return f"{key}_" if keyword.iskeyword(key) else key


def recipe_name(name: str) -> str:
    """A keyword argument's name as recipes spell it (``lambda_`` -> ``lambda``)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name
