"""Changes an adapter makes to a model, each registered with its exact undo on the run
(:meth:`fico.ReductionRun.on_remove`), so that ``run.remove()`` gives back the vanilla model."""

from __future__ import annotations

import functools
from typing import Callable

from ..run import ReductionRun


def hook(run: ReductionRun, handle) -> None:
    """Keep a torch hook ``handle`` until the run is removed."""
    run.on_remove(handle.remove)


def set_instance_attr(run: ReductionRun, obj, name: str, value) -> None:
    """Set ``obj.name`` (bypassing ``nn.Module.__setattr__``) and register its exact restoration."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    object.__setattr__(obj, name, value)

    def undo():
        if had:
            object.__setattr__(obj, name, old)
        else:
            obj.__dict__.pop(name, None)

    run.on_remove(undo)


@functools.cache
def forward_subclass(base: type, forward: Callable) -> type:
    """``base`` with its ``forward`` replaced: a module swapped to it keeps its state-dict keys
    and passes the ``isinstance`` checks the model relies on."""
    return type(f"Fico{base.__name__}", (base,), {"forward": forward, "__module__": forward.__module__})


def swap_forward(run: ReductionRun, module, forward: Callable, **attributes) -> None:
    """Give ``module`` the ``forward`` of :func:`forward_subclass` and the instance ``attributes``
    it reads (its site, its layer index), all undone with the run."""
    original = type(module)
    module.__class__ = forward_subclass(original, forward)
    run.on_remove(functools.partial(setattr, module, "__class__", original))
    for name, value in attributes.items():
        set_instance_attr(run, module, name, value)
