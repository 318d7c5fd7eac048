"""fico: training-free token reduction for LLaVA-style MLLMs as filter -> correlate -> compress.

>>> import fico
>>> recipe = fico.load_recipe("tome", overrides=["r=4"])
>>> [type(c).__name__ for c in (recipe.steps[0].filter, recipe.steps[0].correlator, recipe.steps[0].compressor)]
['BipartiteMatching', 'KeySimilarity', 'WeightedAverage']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (ApplyError, ComponentError, FicoError, InputError, ModelNotFoundError, RecipeError,
                      ResultsFileError, UnsupportedModelError)

__version__ = "0.1.0"

# The rest of the public API loads on first use (PEP 562): it imports torch, and the command
# line must answer --help or a usage error without paying for that.
_LAZY = {
    "hookimpl": "hookspecs", "hookspec": "hookspecs",
    "Recipe": "recipe", "Schedule": "recipe", "Step": "recipe", "bundled_recipes": "recipe", "load_recipe": "loading",
    "Registry": "registry", "default_registry": "registry",
    "ReductionRun": "run", "StepRecord": "run", "Trace": "run",
    "Compressor": "stages", "Correlation": "stages", "Correlator": "stages", "Filter": "stages", "Split": "stages",
    "TokenState": "state",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from . import embedded
    from .hookspecs import hookimpl, hookspec
    from .loading import load_recipe
    from .recipe import Recipe, Schedule, Step, bundled_recipes
    from .registry import Registry, default_registry
    from .run import ReductionRun, StepRecord, Trace
    from .stages import Compressor, Correlation, Correlator, Filter, Split
    from .state import TokenState


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name == "embedded":
        value = importlib.import_module(".embedded", __name__)
    else:
        raise AttributeError(f"module 'fico' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY, "embedded"])


def apply(model, recipe: "Recipe | str", provenance: bool = False) -> "ReductionRun":
    """Attach ``recipe`` to ``model`` and return the :class:`ReductionRun`.

    Use it as a context manager, or call ``run.remove()``; afterwards the model is exactly
    the vanilla model. On any error the model is left untouched.

    Args:
        model: a model of a supported family (``fico.adapters``), e.g. a
            ``transformers.LlavaForConditionalGeneration`` (CLIP + Llama).
        recipe: a loaded recipe, or a bundled name / path to load with no overrides.
        provenance: record, at every step, which original tokens each surviving token
            absorbed and with what weight (``run.trace.steps[i].sources``).
    """
    from . import adapters
    from .loading import load_recipe
    from .recipe import Recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return adapters.apply(model, recipe, provenance=provenance)


__all__ = [
    "ApplyError", "ComponentError", "FicoError", "InputError", "ModelNotFoundError", "ResultsFileError", "Compressor", "Correlation", "Correlator", "Filter", "Recipe", "RecipeError", "ReductionRun",
    "Registry", "Schedule", "Split", "Step", "StepRecord", "TokenState", "Trace", "UnsupportedModelError",
    "apply", "bundled_recipes", "default_registry", "embedded", "hookimpl", "hookspec", "load_recipe",
]
