"""The public :func:`load_recipe`: a recipe read by :mod:`fico.recipe`, its ``budget_tflops:``
solved by :mod:`fico.cost.budget`. The one module that joins the two, so that reading a
recipe never needs the cost model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cost.budget import solve_budget
from .recipe import Recipe, read_recipe
from .registry import Registry


def load_recipe(recipe: str | Path, overrides: list[str] | str | None = None, registry: Registry | None = None,
                plugins: list[str | Path] | None = None, budget_for: tuple[Any, int] | None = None) -> Recipe:
    """Load a bundled recipe by name, or a YAML file by path, and validate it.

    Args:
        recipe: a bundled name (``"tome"``, ``"evit"``, ``"fastv"``, ...) or a path.
        overrides: ``key=value`` strings in OmegaConf's dotlist syntax, e.g. ``["r=8"]``,
            ``["layers=[0,1]"]``, ``["steps.0.filter.name=attention_rank"]``; or one string
            of them separated by spaces or ``;`` (``"k=3;ratio=0.25"``). ``plugins=[FILE]``
            is the same as ``plugins``.
        registry: components to resolve names against (default: built-ins + entry points).
        plugins: local plugin files (paths relative to the working directory) whose
            components the recipe and the overrides may name, besides the recipe's own
            ``plugins:`` (relative to the recipe file).
        budget_for: ``(model, text_tokens)`` of the model that will run. A ``budget_tflops:`` naming
            another model is then solved on this one for the same fraction of its unreduced
            cost (``recipe.budget`` says so, or that the fraction is out of reach there).

    Raises:
        RecipeError: naming the source and key, for any invalid content.

    >>> load_recipe("fastv", "k=3;ratio=0.25").knobs
    {'k': 3, 'ratio': 0.25}
    """
    def budget(config, source, checked_overrides, build):
        return solve_budget(config, source, checked_overrides, build, target=budget_for)

    return read_recipe(recipe, overrides, registry, plugins, budget=budget)
