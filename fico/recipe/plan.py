"""Schedules made concrete: which step runs at which layer, and how many tokens it removes.

Token counts do not depend on data (each sample of a batch discards the same number), so
a recipe is checked against a model's geometry before anything is modified. The one
exception is an ``adaptive`` schedule (PruMerge's outlier count, FitPrune's fitting rule):
the filter chooses the count per image (per sample in the decoder), and the plan records
it as unknown (None) and plans what follows on the count before it (an upper bound).

The sites, in the order a forward pass meets them:

* ``vision``: inside vision-tower layers, after the attention residual, before the MLP;
* ``vision_output``: the tokens leaving the feature layer (LLaVA's ``vision_feature_layer``),
  before the projector;
* ``pre_llm``: the projector's outputs, before the language model;
* ``llm``: at the input of decoder layers (prefill);
* ``llm_mid``: inside decoder layers, after the attention residual, before the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RecipeError
from .schema import Recipe, Step, knobs_in


@dataclass(frozen=True)
class Geometry:
    """What planning needs to know of a model: its layer and token counts, from its config (a
    family's ``planning_geometry``)."""

    vision_layers: int
    vision_tokens: int  # [CLS] + patches
    feature_index: int  # hidden_states index LLaVA feeds to the projector
    drops_cls: bool  # vision_feature_select_strategy == "default"
    llm_layers: int
    #: visual tokens one image gives the language model where a family packs several tower
    #: passes into one image (LLaVA-NeXT's anyres: its largest count); None: the feature layer's
    #: count. The plan counts pre_llm and decoder steps on it; runs count each image's own.
    image_tokens: int | None = None
    #: the grids of that image's parts (the cells; its other tokens, such as newlines, are
    #: visual but never reduced)
    image_grids: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class PlannedStep:
    """A step at one layer (or point): tokens and candidates entering it, and tokens it removes.

    ``position`` is the layer's index within the step's own layer list (per-layer counts);
    ``remove`` is None for an adaptive schedule (the filter decides per image).
    """

    step: Step
    layer: int
    tokens_in: int
    candidates_in: int
    remove: int | None
    position: int = 0
    appended: int = 0
    first: int = 0  # candidates entering the step's first layer (keep_geometric's n0)
    step_layers: int = 1  # how many layers the step runs at (picks a count list by depth)
    site_layers: int | None = None  # how many layers its site has (picks a keep_geometric ratio by depth)

    @property
    def acts(self) -> bool:
        """Whether the step may remove tokens (a count above zero, or the filter's choice)."""
        return self.remove is None or self.remove > 0

    @property
    def tokens_out(self) -> int | None:
        return None if self.remove is None else self.tokens_in - self.remove + self.appended


@dataclass(frozen=True)
class SitePlan:
    """Steps by layer for one layered site and the tokens each layer's parts run on.

    ``steps`` act at the input of a layer (``llm``), ``mid_steps`` after its attention and
    before its MLP (``vision``, ``llm_mid``). ``attention[i]`` is what layer i's attention
    (and, in the LLM, its KV cache) holds; ``mlp[i]`` what its MLP runs on; ``mlp[-1]`` leaves
    the site.
    """

    site: str
    steps: dict[int, PlannedStep]
    mid_steps: dict[int, PlannedStep]
    attention: list[int]
    mlp: list[int]

    def all_steps(self) -> list[PlannedStep]:
        """Every planned step in the order a forward pass runs them."""
        ordered = [(p.layer, 0, p) for p in self.steps.values()] + [(p.layer, 1, p) for p in self.mid_steps.values()]
        return [p for _, _, p in sorted(ordered, key=lambda item: item[:2])]


def equivalent_tokens(at_input: list[int], output: int) -> dict[str, float] | None:
    """Visual tokens averaged over the decoder layers ("equivalent tokens" of progressive
    schedules), from the visual tokens each layer's attention sees and those leaving the last:

    * ``at_input``: the mean of what each layer runs on (PyramidDrop's "average tokens");
    * ``after_reduction``: the mean of what is left after each layer's reductions, a step at
      layer l's input counting for layer l - 1 (SparseVLM's log: pruning "after layer l");
    * ``at_output``: what reaches the last layer's output.
    """
    if not at_input:
        return None
    after = at_input[1:] + [output]
    return {"at_input": sum(at_input) / len(at_input), "after_reduction": sum(after) / len(after),
            "at_output": float(output)}


def stage_starts(stages: int, num_layers: int) -> list[int]:
    r"""The first layer of each of ``stages`` equal stages of ``num_layers`` layers, after the
    first stage: :math:`\lfloor i L / S \rfloor` for :math:`i = 1 .. S-1` (PyramidDrop divides
    the decoder into equal stages; its 32-layer ``layer_list`` [8, 16, 24] is ``stages:4``).

    >>> stage_starts(4, 32), stage_starts(4, 6)
    ([8, 16, 24], [1, 3, 4])
    """
    return [i * num_layers // stages for i in range(1, stages)]


def expand_layers(step: Step, num_layers: int, recipe: Recipe) -> list[int]:
    if isinstance(step.layers, dict):  # layers by the site's depth, or its default
        chosen = step.layers.get(num_layers, step.layers.get("default"))
        if chosen is None:
            knobs = knobs_in(step.layers_source)
            depths = sorted(d for d in step.layers if d != "default")
            raise recipe.error(f"{step.where}.layers", f"no layer list for a {step.site} site of {num_layers} layers; "
                               f"the recipe has lists for {' or '.join(map(str, depths))} layers"
                               + (f" (from {step.layers_source}): override " + " or ".join(f"{k}=..." for k in knobs)
                                  + " with layers this model has" if knobs else ""))
        layers = list(chosen)
    elif step.layers == "all":
        layers = list(range(num_layers))
    elif isinstance(step.layers, str) and step.layers.startswith("stages:"):
        stages = int(step.layers.partition(":")[2])
        if stages > num_layers:
            raise recipe.error(f"{step.where}.layers", f"{step.layers!r} needs at least {stages} layers; the "
                               f"{step.site} site of this model has {num_layers}")
        layers = stage_starts(stages, num_layers)
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
        knobs = knobs_in(step.layers_source)
        hint = (f" (from {step.layers_source}); the recipe's schedule was written for a deeper model: override "
                + " or ".join(f"{k}=..." for k in knobs) + " with layers this model has") if knobs else ""
        raise recipe.error(
            f"{step.where}.layers",
            f"layer {bad[0]} is out of range: the {step.site} site of this model has layers "
            f"0..{num_layers - 1}{hint}",
        )
    return layers


def requested_removal(step: Step, candidates: int, position: int = 0, first: int | None = None,
                      grids: tuple[tuple[int, int], ...] | None = None, layers: int | None = None,
                      depth: int | None = None) -> int | None:
    """What ``step``'s schedule asks to remove of ``candidates`` (None: the filter decides per
    image) at the ``position``-th of its ``layers`` layers; ``grids``: the parts the candidates
    lie on, where an image has several."""
    if step.schedule.kind == "keep" and step.schedule.value == "filter":
        if grids is None:
            return candidates - step.filter.planned_keep(candidates)
        return sum(rows * cols for rows, cols in grids) - step.filter.planned_keep_on(grids)
    return step.schedule.tokens_to_remove(candidates, position, first, layers, depth)


def plan_step(recipe: Recipe, step: Step, layer: int, tokens: int, candidates: int, position: int,
              first_candidates: int, where: str, grids: tuple[tuple[int, int], ...] | None = None,
              protected: int = 0, step_layers: int = 1, site_layers: int | None = None) -> PlannedStep:
    """How many of ``candidates`` the step removes here (a RecipeError if its schedule cannot
    run); ``protected``: visual tokens that stay whatever the step does, which a fixed ``keep``
    counts (:attr:`Schedule.counts_kept`)."""
    key = f"{step.where}.{step.schedule.kind}"
    try:
        if protected and step.schedule.counts_kept:
            requested = requested_removal(step, candidates + protected, position, first_candidates, grids,
                                          step_layers, site_layers)
        else:
            requested = requested_removal(step, candidates, position, first_candidates, grids, step_layers,
                                          site_layers)
    except RecipeError as error:
        raise recipe.error(f"{step.where}.filter", str(error)) from error
    if requested is None:
        if not step.filter.adaptive:
            raise recipe.error(key, f"'adaptive' needs a filter that chooses its own count (such as "
                               f"iqr_outliers); {step.filter.name!r} does not")
        return PlannedStep(step, layer, tokens, candidates, None, position, 0, first_candidates, step_layers,
                           site_layers)
    if requested < 0:
        raise recipe.error(key, f"keeps {candidates - requested} tokens{step.schedule.shown()} at {where}, where "
                           f"only {candidates} reducible tokens are present")
    if requested > candidates:
        raise recipe.error(key, f"removes {requested} tokens{step.schedule.shown()} at {where}, where only "
                           f"{candidates} reducible tokens are left")
    try:
        remove = step.filter.discard(requested, tokens, candidates)
    except RecipeError as error:
        raise recipe.error(f"{step.where}.filter", str(error)) from error
    return PlannedStep(step, layer, tokens, candidates, remove, position, step.compressor.appended(remove),
                       first_candidates, step_layers, site_layers)


def _steps_by_layer(recipe: Recipe, site: str, num_layers: int, first_layer: int
                    ) -> tuple[dict[int, Step], dict[int, int], dict[int, int]]:
    by_layer: dict[int, Step] = {}
    position: dict[int, int] = {}
    step_layers: dict[int, int] = {}  # by layer: how many layers its step runs at
    for step in recipe.steps:
        if step.site != site:
            continue
        layers = expand_layers(step, num_layers, recipe)
        counts = step.schedule.value
        if step.schedule.kind == "keep_geometric" and isinstance(counts, dict):
            if step.schedule.ratio_at(num_layers) is None:
                knobs = knobs_in(step.schedule.source) if step.schedule.source else []
                raise recipe.error(f"{step.where}.keep_geometric",
                                   f"no ratio for a {site} site of {num_layers} layers; the recipe has ratios for "
                                   f"{' or '.join(map(str, sorted(d for d in counts if d != 'default')))} "
                                   f"layers{step.schedule.shown()}: add one for {num_layers}"
                                   + (" to " + ", ".join(knobs) if knobs else ""))
        elif isinstance(counts, dict) and len(layers) not in counts:
            knobs = knobs_in(step.schedule.source) if step.schedule.source else []
            raise recipe.error(f"{step.where}.{step.schedule.kind}",
                               f"no count list for a step at {len(layers)} layers, as it runs on this model; "
                               f"the recipe has lists for {' or '.join(map(str, sorted(counts)))} "
                               f"layers{step.schedule.shown()}: add a list of {len(layers)} counts"
                               + (" (the list is chosen by " + ", ".join(knobs) + ")" if knobs else ""))
        if isinstance(counts, tuple) and len(counts) != len(layers):
            raise recipe.error(f"{step.where}.{step.schedule.kind}", f"a list needs one count per layer of the "
                               f"step ({len(layers)} layers), got {len(counts)}{step.schedule.shown()}"
                               + (f"; the schedule was written for {len(counts)} layers: give "
                                  f"steps.{step.index}.{step.schedule.kind}=[...] {len(layers)} counts for this model"
                                  if step.schedule.source else ""))
        for index, layer in enumerate(layers):
            position[layer] = index
            step_layers[layer] = len(layers)
            if layer in by_layer:
                raise recipe.error(f"{step.where}.layers", f"layer {layer} of the {site} site is already reduced by "
                                   f"{by_layer[layer].where}; one step per layer")
            if layer < first_layer:
                raise recipe.error(f"{step.where}.layers", f"the {site} site cannot reduce at layer {layer}: its "
                                   f"signals come from the previous layer, so the first usable layer is {first_layer}")
            by_layer[layer] = step
    return by_layer, position, step_layers


def plan_layers(recipe: Recipe, site: str, num_layers: int, tokens: int, candidates: int,
                mid_site: str | None = None, input_site: str | None = None, first_layer: int = 0) -> SitePlan:
    """Plan the steps of a layered site.

    Args:
        site: the plan's name (``vision`` or ``llm``).
        mid_site, input_site: the recipe sites whose steps run after a layer's attention and at
            a layer's input (``vision``: mid only; ``llm``: ``llm`` at the input, ``llm_mid`` mid).
        tokens, candidates: tokens (all / reducible) entering layer 0.
        first_layer: the lowest layer an input step may use (1 where signals come from the
            previous layer).
    """
    inputs, input_position, input_layers = (_steps_by_layer(recipe, input_site, num_layers, first_layer)
                                            if input_site else ({}, {}, {}))
    mids, mid_position, mid_layers = _steps_by_layer(recipe, mid_site, num_layers, 0) if mid_site else ({}, {}, {})
    first_seen: dict[int, int] = {}  # candidates entering the first layer of each step (keep_geometric)
    steps, mid_steps, attention, mlp = {}, {}, [], []
    for layer in range(num_layers):
        for table, positions, depths, planned_at, label in ((inputs, input_position, input_layers, steps, "input"),
                                                            (mids, mid_position, mid_layers, mid_steps, "mid")):
            step = table.get(layer)
            if step is not None:
                first = first_seen.setdefault(step.index, candidates)
                where = f"{step.site} layer {layer}"
                planned = plan_step(recipe, step, layer, tokens, candidates, positions[layer], first, where,
                                    step_layers=depths[layer], site_layers=num_layers)
                if planned.remove is None and step.site == "vision":
                    raise recipe.error(f"{step.where}.{step.schedule.kind}", "'adaptive' counts are for the "
                                       "vision_output, pre_llm, llm and llm_mid sites, not the vision site")
                planned_at[layer] = planned
                # an adaptive step (the filter chooses per sample) is planned as removing nothing:
                # the counts after it are upper bounds, and the batch runs ragged
                delta = 0 if planned.remove is None else planned.appended - planned.remove
                tokens += delta
                candidates += delta
            if label == "input":
                attention.append(tokens)
        mlp.append(tokens)
    return SitePlan(site, steps, mid_steps, attention, mlp)


def plan_point(recipe: Recipe, site: str, tokens: int, candidates: int,
               grids: tuple[tuple[int, int], ...] | None = None, protected: int = 0) -> PlannedStep | None:
    steps = [s for s in recipe.steps if s.site == site]
    if len(steps) > 1:
        raise recipe.error(f"{steps[1].where}.site", f"the {site} site takes one step; {steps[0].where} is "
                           f"already there")
    if not steps:
        return None
    return plan_step(recipe, steps[0], 0, tokens, candidates, 0, candidates, f"the {site} site", grids, protected)


@dataclass(frozen=True)
class RecipePlan:
    """Every site planned; ``features`` = image features per image reaching the LLM (None:
    chosen per image by an adaptive step)."""

    vision: SitePlan
    vision_output: PlannedStep | None
    pre_llm: PlannedStep | None
    llm: SitePlan
    features: int | None
    cls_feature: bool = False  # [CLS] is among the features (VisionZip)
    notes: list[str] = field(default_factory=list)
    #: features of one tower pass reaching the projector, where an image takes several passes
    #: (``Geometry.image_tokens``); ``features`` then counts the packed image
    pass_features: int | None = None

    def planned_steps(self) -> list[PlannedStep]:
        """Every planned step, in the order a forward pass runs them."""
        points = [p for p in (self.vision_output, self.pre_llm) if p is not None]
        return [*self.vision.all_steps(), *points, *self.llm.all_steps()]

    def of(self, step: Step) -> list[PlannedStep]:
        """The layers (or point) ``step`` runs at."""
        return [p for p in self.planned_steps() if p.step is step]

    def chosen_by_data(self) -> list[PlannedStep]:
        """The steps whose count the data chooses (an adaptive filter, per image); every other
        count of the plan is fixed by the recipe and the model's counts."""
        return [p for p in self.planned_steps() if p.remove is None]


def plan_recipe(recipe: Recipe, geometry: Geometry) -> RecipePlan:
    """Plan every step of ``recipe`` on a model of ``geometry`` (RecipeError if it cannot run)."""
    vision = plan_layers(recipe, "vision", geometry.vision_layers, geometry.vision_tokens, geometry.vision_tokens - 1,
                         mid_site="vision")
    entering = [geometry.vision_tokens] + vision.mlp  # hidden_states[i] enters layer i
    at_feature = entering[geometry.feature_index]
    vision_output = plan_point(recipe, "vision_output", at_feature, at_feature - 1)
    cls_feature = bool(vision_output is not None and vision_output.step.cls_feature)
    if vision_output is None:
        features = at_feature - (1 if geometry.drops_cls else 0)
    elif vision_output.remove is None:
        features = None
    else:
        features = vision_output.tokens_out - (1 if geometry.drops_cls and not cls_feature else 0)
    pass_features, protected = None, 0
    if geometry.image_grids is not None:  # visual tokens off the grids (newlines) are never reduced
        protected = geometry.image_tokens - sum(rows * cols for rows, cols in geometry.image_grids)
    if geometry.image_tokens is not None:
        per_pass = geometry.vision_tokens - (1 if geometry.drops_cls else 0)  # unreduced
        pass_features = features
        features = geometry.image_tokens if features is None else round(geometry.image_tokens * features / per_pass)
    pre_llm = None
    # the most visual tokens an image can bring to the language model: its count where the
    # plan knows it, else (an adaptive step chooses it per image) its count before that step
    bound = features if features is not None else (
        geometry.image_tokens if geometry.image_tokens is not None else at_feature - (1 if geometry.drops_cls else 0))
    if features is not None:
        pre_llm = plan_point(recipe, "pre_llm", features, features - protected, geometry.image_grids, protected)
        if pre_llm is not None:
            features = pre_llm.tokens_out
            bound = features if features is not None else bound
    elif any(s.site == "pre_llm" for s in recipe.steps):
        step = next(s for s in recipe.steps if s.site == "pre_llm")
        raise recipe.error(f"{step.where}.site", "a pre_llm step cannot follow an adaptive vision_output step "
                           "(its count differs per image)")
    # After an adaptive count the decoder steps are planned on that upper bound (a schedule
    # that cannot run even there is refused now); each sample's steps act on its own count,
    # a keep above it keeping all of it, and the batch runs ragged (fico.adapters.ghosts).
    llm = plan_layers(recipe, "llm", geometry.llm_layers, bound, bound - protected, mid_site="llm_mid",
                      input_site="llm", first_layer=1)
    return RecipePlan(vision, vision_output, pre_llm, llm, features, cls_feature, pass_features=pass_features)
