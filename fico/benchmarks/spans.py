"""Probes of fico's work: what a benchmark hands :attr:`fico.ReductionRun.work_probe`."""

from __future__ import annotations

import contextlib
from typing import ContextManager


class SpanProbe:
    """Measures each outermost span of fico's work (:meth:`fico.ReductionRun.work`); a span
    inside another counts as part of it. Subclasses say how one span is measured."""

    def __init__(self):
        self._depth = 0

    def measure(self) -> ContextManager:
        raise NotImplementedError

    @contextlib.contextmanager
    def __call__(self):
        if self._depth:
            yield
            return
        self._depth += 1
        try:
            with self.measure():
                yield
        finally:
            self._depth -= 1
