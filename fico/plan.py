"""Schedules made concrete: which step runs at which layer, and how many tokens it removes.

Token counts do not depend on data (each sample of a batch discards the same number), so
a recipe is checked against a model's geometry before anything is modified.
"""

from __future__ import annotations

from dataclasses import dataclass

from .recipe import Recipe, Step


@dataclass(frozen=True)
class Geometry:
    """What planning needs to know of a LLaVA model (from its config or its modules)."""

    vision_layers: int
    vision_tokens: int  # [CLS] + patches
    feature_index: int  # hidden_states index LLaVA feeds to the projector
    drops_cls: bool  # vision_feature_select_strategy == "default"
    llm_layers: int


@dataclass(frozen=True)
class PlannedStep:
    """A step at one layer: tokens and candidates entering it, and tokens it removes.

    ``position`` is the layer's index within the step's own layer list (for per-layer
    ``remove`` lists).
    """

    step: Step
    layer: int
    tokens_in: int
    candidates_in: int
    remove: int
    position: int = 0

    @property
    def tokens_out(self) -> int:
        return self.tokens_in - self.remove + (self.step.compressor.appends if self.remove else 0)


@dataclass(frozen=True)
class SitePlan:
    """Steps by layer for one site, and tokens entering each layer (plus the output count)."""

    site: str
    steps: dict[int, PlannedStep]
    tokens: list[int]

    def tokens_after(self, layer: int) -> int:
        """Tokens leaving layer ``layer`` (entering ``layer + 1``)."""
        return self.tokens[layer + 1]


def expand_layers(step: Step, num_layers: int, recipe: Recipe) -> list[int]:
    if step.layers == "all":
        layers = list(range(num_layers))
    elif isinstance(step.layers, str):  # "START:STOP", STOP exclusive and optional
        start, _, stop = step.layers.partition(":")
        layers = list(range(int(start), int(stop) if stop else num_layers))
        if not layers:
            raise recipe.error(f"{step.where}.layers", f"{step.layers!r} selects no layer of the {step.site} site "
                               f"(layers 0..{num_layers - 1})")
    else:
        layers = list(step.layers)
    bad = [layer for layer in layers if layer >= num_layers]
    if bad:
        raise recipe.error(
            f"{step.where}.layers",
            f"layer {bad[0]} is out of range: the {step.site} site of this model has layers 0..{num_layers - 1}",
        )
    return layers


def plan_site(recipe: Recipe, site: str, num_layers: int, tokens: int, candidates: int,
              first_layer: int = 0) -> SitePlan:
    """Plan ``recipe``'s steps on ``site`` for a model with ``num_layers`` layers there.

    Args:
        tokens, candidates: tokens (all / reducible) entering layer 0.
        first_layer: the lowest layer a step may use (1 where signals come from the
            previous layer).
    """
    by_layer: dict[int, Step] = {}
    position: dict[int, int] = {}
    for step in recipe.steps:
        if step.site != site:
            continue
        layers = expand_layers(step, num_layers, recipe)
        counts = step.schedule.value
        if isinstance(counts, tuple) and len(counts) != len(layers):
            raise recipe.error(f"{step.where}.remove", f"a list needs one count per layer of the step "
                               f"({len(layers)} layers), got {len(counts)}")
        for index, layer in enumerate(layers):
            position[layer] = index
            if layer in by_layer:
                raise recipe.error(f"{step.where}.layers", f"layer {layer} of the {site} site is already reduced by "
                                   f"{by_layer[layer].where}; one step per layer")
            if layer < first_layer:
                raise recipe.error(f"{step.where}.layers", f"the {site} site cannot reduce at layer {layer}: its "
                                   f"signals come from the previous layer, so the first usable layer is {first_layer}")
            by_layer[layer] = step
    planned: dict[int, PlannedStep] = {}
    counts = [tokens]
    for layer in range(num_layers):
        step = by_layer.get(layer)
        if step is not None:
            requested = step.schedule.tokens_to_remove(candidates, position[layer])
            if requested > candidates:
                raise recipe.error(
                    f"{step.where}.{step.schedule.kind}",
                    f"removes {requested} tokens at {site} layer {layer}, where only {candidates} reducible tokens are left",
                )
            remove = min(requested, step.filter.max_discard(tokens, candidates))
            planned[layer] = PlannedStep(step, layer, tokens, candidates, remove, position[layer])
            added = step.compressor.appends if remove else 0
            tokens += added - remove
            candidates += added - remove
        counts.append(tokens)
    return SitePlan(site, planned, counts)


@dataclass(frozen=True)
class RecipePlan:
    """Both sites planned; ``features`` = image features per image reaching the LLM."""

    vision: SitePlan
    llm: SitePlan
    features: int


def plan_recipe(recipe: Recipe, geometry: Geometry) -> RecipePlan:
    """Plan every step of ``recipe`` on a model of ``geometry`` (RecipeError if it cannot run)."""
    vision = plan_site(recipe, "vision", geometry.vision_layers, geometry.vision_tokens, geometry.vision_tokens - 1)
    features = vision.tokens[geometry.feature_index] - (1 if geometry.drops_cls else 0)
    llm = plan_site(recipe, "llm", geometry.llm_layers, features, features, first_layer=1)
    return RecipePlan(vision, llm, features)
