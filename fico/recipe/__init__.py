"""Recipes: YAML files, read with OmegaConf, that compose registered components.

A recipe has method-level knobs at the top, interpolated into its steps::

    name: fastv
    k: 2            # knobs: change them with overrides such as "k=3"
    ratio: 0.5
    steps:
      - site: llm                   # "vision" (CLIP layers) or "llm" (decoder layers)
        layers: ["${k}"]            # 0-based module indices, or "all"
        remove_ratio: ${ratio}      # or remove: N, or keep_ratio: x
        filter: {name: attention_rank, signal: last_query_attention}
        correlate: {name: none}
        compress: {name: drop}

The package reads recipes and knows no model and no cost model: :mod:`.schema` (what a
recipe is), :mod:`.values` (its YAML dialect), :mod:`.reading` (names, files, ``base:``),
:mod:`.overrides` (``key=value`` and the knob checks), :mod:`.build` (steps from the
registry), :mod:`.describe` (what changed), :mod:`.plan` (a recipe against a model's counts).
:func:`fico.load_recipe` adds budget solving on top.

>>> import fico
>>> recipe = fico.load_recipe("fastv", overrides=["k=3"])
>>> recipe.steps[0].layers
[3]
"""

from .reading import RECIPE_DIR, bundled_recipes, read_recipe
from .schema import POINT_SITES, SITES, Recipe, Schedule, Step, python_name, recipe_name

__all__ = ["POINT_SITES", "RECIPE_DIR", "SITES", "Recipe", "Schedule", "Step", "bundled_recipes", "python_name",
           "read_recipe", "recipe_name"]
