"""Errors fico raises on bad input: every message names what to fix."""


class RecipeError(ValueError):
    """A recipe (or an override, or its use on a model) is invalid.

    The message names the recipe source and the offending key, e.g.
    ``recipes/fastv.yaml: steps[0].filter.name: unknown filter 'attn_rank' ...``.
    """


class UnsupportedModelError(TypeError):
    """``fico.apply`` was given a model class that no adapter supports."""


class ApplyError(RuntimeError):
    """``fico.apply`` cannot attach (e.g. the model already has a recipe applied)."""
