"""The stage boundary: what each stage must hand to the next, checked where it is handed.

A component that breaks its contract (a ``Split`` of the wrong shapes, a bare tensor, a
state with fewer positions than tokens) is reported as a :class:`fico.ComponentError`
naming the component, its file, the step and the layer, instead of failing later inside
another component. Shapes and types are checked for every component (no device
synchronisation); index values are checked for components that do not ship with fico.
"""

from __future__ import annotations

import inspect
import sys
import traceback
from pathlib import Path

import torch
from torch import Tensor

from .errors import ComponentError
from .stages import Component, Correlation, Split
from .state import TokenState

_FICO_PACKAGE = str(Path(__file__).resolve().parent)


def origin(component: Component) -> str:
    """The file a component's class is defined in (for messages)."""
    try:
        return inspect.getsourcefile(type(component)) or type(component).__module__
    except TypeError:
        return type(component).__module__


def is_builtin(component: Component) -> bool:
    return origin(component).startswith(_FICO_PACKAGE)


class Boundary:
    """Checks one step's stage outputs; ``where`` says which step at which layer."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, component: Component, message: str) -> ComponentError:
        name = Path(origin(component)).name
        return ComponentError(f"{component.stage} {component.name!r} ({name}), {self.where}: {message}")

    def call(self, component: Component, method, *args):
        """``method(*args)``; an exception inside a third-party component is reported as its own."""
        if is_builtin(component):
            return method(*args)
        try:
            return method(*args)
        except ComponentError:
            raise
        except Exception as error:
            frames = [f for f in traceback.extract_tb(sys.exc_info()[2]) if f.filename == origin(component)]
            at = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
            raise self.fail(component, f"raised {type(error).__name__}{at}: {error}") from error

    def split(self, component: Component, split, state: TokenState, r: int) -> Split:
        if not isinstance(split, Split):
            raise self.fail(component, f"split() must return a fico.Split, got {type(split).__name__}")
        b, n = state.candidate.shape
        expected = {"scores": (b, n), "discarded": (b, r), "preserved": (b, n - r), "targets": (b, n - r)}
        for field, shape in expected.items():
            value = getattr(split, field)
            if not isinstance(value, Tensor):
                raise self.fail(component, f"Split.{field} must be a tensor, got {type(value).__name__}")
            if tuple(value.shape) != shape:
                raise self.fail(component, f"Split.{field} has shape {tuple(value.shape)}, expected {shape} "
                                           f"(batch {b}, {n} tokens, r = {r})")
        for field in ("discarded", "preserved"):
            if getattr(split, field).dtype != torch.long:
                raise self.fail(component, f"Split.{field} must hold int64 token indices, got "
                                           f"{getattr(split, field).dtype}")
        if split.targets.dtype != torch.bool:
            raise self.fail(component, f"Split.targets must be bool, got {split.targets.dtype}")
        for key, value in split.extras.items():
            if not isinstance(value, Tensor) or tuple(value.shape[:2]) != (b, n - r):
                raise self.fail(component, f"Split.extras[{key!r}] must be a ({b}, {n - r}) tensor")
        if not is_builtin(component) and r:
            both = torch.cat([split.discarded, split.preserved], 1)
            if bool(((both < 0) | (both >= n)).any()):
                raise self.fail(component, f"Split indices must lie in 0..{n - 1}")
            if not bool((torch.sort(both, 1).values == torch.arange(n, device=both.device)).all()):
                raise self.fail(component, "discarded and preserved must together list every token once")
            if not bool(torch.gather(state.candidate, 1, split.discarded).all()):
                raise self.fail(component, "discarded a protected token ([CLS], text or padding): give protected "
                                           "tokens the score -inf (fico.selection.mask_scores)")
        return split

    def correlation(self, component: Component, correlation, split: Split) -> Correlation:
        if not isinstance(correlation, Correlation):
            raise self.fail(component, f"correlate() must return a fico.Correlation, got "
                                       f"{type(correlation).__name__}")
        b, r = split.discarded.shape
        t = split.preserved.shape[1]
        for field, shape in (("matrix", (b, r, t)), ("shares", (b, r, t)), ("fused", (b, r))):
            value = getattr(correlation, field)
            if value is not None and (not isinstance(value, Tensor) or tuple(value.shape) != shape):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise self.fail(component, f"Correlation.{field} is {got}, expected a tensor of shape {shape} "
                                           f"(batch, discarded, preserved)")
        return correlation

    def state(self, component: Component, new, state: TokenState, r: int) -> TokenState:
        if not isinstance(new, TokenState):
            raise self.fail(component, f"compress() must return a fico.TokenState, got {type(new).__name__}")
        b, n, d = state.hidden.shape
        appended = component.appended(r)
        count = n - r + appended
        if tuple(new.hidden.shape) != (b, count, d):
            raise self.fail(component, f"the new state's hidden has shape {tuple(new.hidden.shape)}, expected "
                                       f"{(b, count, d)} ({n} tokens - {r} discarded"
                                       + (f" + {appended} appended)" if appended else ")"))
        for field in ("positions", "candidate", "visual", "text", "patch", "size", "sources"):
            value = getattr(new, field)
            if value is not None and tuple(value.shape[:2]) != (b, count):
                raise self.fail(component, f"the new state's {field} has {value.shape[1]} tokens, its hidden "
                                           f"{count}: build it with state.keep(...) / state.append(...)")
        return new
