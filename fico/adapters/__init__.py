"""Model adapters: everything model-specific lives here, nothing method-specific.

* the core, which knows no family: :mod:`.hooks` (changes to a model and their undo),
  :mod:`.entry` (``forward``/``generate`` wrapped), :mod:`.placeholders`, :mod:`.steps`
  (running and recording a planned step, the point-site runner), :mod:`.attention`
  (attention rows), :mod:`.forward` (what one forward carries from the vision side to the
  decoder), :mod:`.positions` (position strategies), :mod:`.decoder` (the ``llm`` and
  ``llm_mid`` sites) and :mod:`.family` (the family contract, registry and checks);
* vision towers shared by families: :mod:`.towers.clip` (the ``vision`` site, its signals),
  :mod:`.towers.clip_text` (CLIP's text tower for instruction signals);
* one file per family: :mod:`.families.llava`.

:func:`apply` finds the model's family, checks the recipe against it and lets the family
attach the sites.
"""

from __future__ import annotations

from ..errors import ApplyError
from ..recipe import Recipe
from ..recipe.plan import RecipePlan
from ..run import ReductionRun
from .family import ModelFamily, default_families, register_family
from .hooks import set_instance_attr

__all__ = ["ModelFamily", "apply", "check_recipe", "family_of", "family_for_config", "register_family"]


def family_of(model) -> ModelFamily:
    """The family of a loaded model; :class:`fico.UnsupportedModelError` naming the supported ones."""
    return default_families().of_model(model)


def family_for_config(config) -> ModelFamily:
    """The family of a model's config (no weights needed)."""
    return default_families().of_config(config)


def check_recipe(recipe: Recipe, config, runs: bool = True) -> RecipePlan:
    """Every check of ``recipe`` against a model that needs only the model's config: layers in
    range, schedules that fit the token counts, sites, options and signals the family offers,
    and (``runs``: stages will run, not a shape-only meta-device pass) what the stages need
    loaded. Commands run it before loading weights; :func:`apply` runs it before touching the
    model. Returns the plan."""
    return family_for_config(config).check_recipe(recipe, config, runs)


def apply(model, recipe: Recipe, provenance: bool = False) -> ReductionRun:
    """Attach ``recipe`` to ``model``; everything is validated before the model is touched, and a
    failure while attaching undoes what was attached."""
    family = family_of(model)
    if getattr(model, "_fico_run", None) is not None:
        raise ApplyError("this model already has a fico recipe applied; call run.remove() first")
    plan = family.check_recipe(recipe, model.config, runs=model.device.type != "meta")
    run = ReductionRun(model, recipe, plan, provenance=provenance)
    try:
        family.attach(run, model, plan)
        set_instance_attr(run, model, "_fico_run", run)
    except BaseException:
        run.remove()
        raise
    run.active = True
    return run
