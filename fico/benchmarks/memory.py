"""Peak memory of a prefill, and the most memory fico's own work adds (CUDA allocator statistics).

A reduced prefill's peak can sit below the unreduced one even where a step forms a large
signal (an attention matrix over every token), because the step runs early, while the KV
cache is still short. So the memory fico adds is measured where it is spent: each span of
its work (:meth:`fico.ReductionRun.work`: forming a step's signals and running its stages)
is measured from the memory allocated when it begins to the highest point inside it, and
the largest of those is the run's *work peak*. The requirement compares it with the
unreduced prefill's peak: at most 10%.

Only CUDA keeps allocator statistics; on another device every number here is None
(reported as not measured, never estimated).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def _measurable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


class WorkPeak:
    """A :attr:`fico.ReductionRun.memory_probe`: the most bytes any span of fico's work held
    above what was allocated when it began. Nested spans are measured as part of the outer one."""

    def __init__(self, device: torch.device):
        self.device, self.bytes, self._depth = device, 0, 0

    @contextlib.contextmanager
    def __call__(self):
        if self._depth:
            yield
            return
        self._depth += 1
        start = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            self.bytes = max(self.bytes, torch.cuda.max_memory_allocated(self.device) - start)
            self._depth -= 1


@dataclass
class PrefillMemory:
    """Bytes: the prefill's peak (weights included), the same above what was allocated before
    it (activations, cache, signals), and fico's work peak (None unreduced)."""

    peak: int
    activations: int
    work: int | None


def prefill_memory(model, inputs: dict, recipe=None) -> PrefillMemory | None:
    """The peak memory of one prefill (``logits_to_keep=1``) with ``recipe`` applied (None:
    unreduced), and its work peak, from a second prefill with a :class:`WorkPeak` probe
    (its resets of the peak statistics would hide the first one's peak). None off CUDA."""
    from .. import apply

    device = next(model.parameters()).device
    if not _measurable(device):
        return None

    def prefill(probe: WorkPeak | None = None) -> tuple[int, int]:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with apply(model, recipe) if recipe is not None else contextlib.nullcontext() as run:
            if run is not None:
                run.memory_probe = probe
            model(**inputs, logits_to_keep=1)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), before

    peak, before = prefill()
    work = None
    if recipe is not None:
        probe = WorkPeak(device)
        prefill(probe)
        work = probe.bytes
    return PrefillMemory(peak, peak - before, work)
