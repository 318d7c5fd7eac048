"""The cost model: FLOPs of a recipe on a model (:mod:`.model`), the counting conventions
(:mod:`.conventions`) and budget-driven schedules (:mod:`.budget`).

It sits above the recipes (it plans them against a model's counts) and below the commands.
Its names load on first use, so that ``fico.cost.conventions`` (the command line's choices)
does not load torch.
"""

from __future__ import annotations

import importlib


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    value = getattr(importlib.import_module(".model", __name__), name)
    globals()[name] = value
    return value
