"""Errors fico raises on bad input: every message names what to fix.

All of them derive from :class:`FicoError`, which the command line prints as one line
(no traceback). Each also derives from the builtin exception a caller would expect
(``ValueError``, ``TypeError``, ...), so ``except ValueError`` keeps working.
"""


class FicoError(Exception):
    """Base of every error fico raises for something the user can fix."""


class RecipeError(FicoError, ValueError):
    """A recipe (or an override, or its use on a model) is invalid.

    The message names the recipe source and the offending key, e.g.
    ``recipes/fastv.yaml: steps[0].filter.name: unknown filter 'attn_rank' ...``.
    """


class UnsupportedModelError(FicoError, TypeError):
    """``fico.apply`` was given a model class that no adapter supports."""


class ApplyError(FicoError, RuntimeError):
    """``fico.apply`` cannot attach (e.g. the model already has a recipe applied)."""


class ModelNotFoundError(FicoError, FileNotFoundError):
    """A model name is neither a built-in model nor a local checkpoint directory."""


class ComponentError(FicoError, RuntimeError):
    """A component returned something that breaks its stage's contract.

    The message names the component, the file it comes from, the step and layer, and what
    was expected (e.g. ``filter 'centroid' (my_filter.py), steps[0] at vision layer 3:
    discarded has shape (1, 30), expected (1, 32)``).
    """


class InputError(FicoError, ValueError):
    """Model inputs a reduced model cannot take (e.g. ``inputs_embeds`` with LLM steps)."""


class ResultsFileError(FicoError, ValueError):
    """A results file (``fico ablate --out``) holds results measured under other conditions."""
