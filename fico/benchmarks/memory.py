"""Peak memory of a prefill, and the most memory fico's own work adds.

A reduced prefill's peak can sit below the unreduced one even where a step forms a large
signal (an attention matrix over every token), because the step runs early, while the KV
cache is still short. So the memory fico adds is measured where it is spent: each span of
its work (:meth:`fico.ReductionRun.work`: forming a step's signals and running its stages)
is measured from the memory allocated when it begins to the highest point inside it, and
the largest of those is the run's *work peak*. The requirement compares it with the
unreduced prefill's peak (weights included, as ``torch.cuda.max_memory_allocated`` and
papers report it): at most 10%.

Both are measured, never estimated: on CUDA from the caching allocator's statistics; on the
CPU from the allocation events of ``torch.profiler`` (``profile_memory``), which carry the
allocator's running total at every allocation and free, so the peaks are exact to the
allocation. Weights and inputs held before the prefill count as its starting level.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .spans import SpanProbe

#: the profiler range a CPU probe marks each span of fico's work with
SPAN = "fico.work"


@dataclass
class PrefillMemory:
    """Bytes: the prefill's peak (what was allocated before it included), the same above what
    was allocated before it (activations, cache, signals), and fico's work peak (None
    unreduced)."""

    peak: int
    activations: int
    work: int | None


class CudaWorkPeak(SpanProbe):
    """A :attr:`fico.ReductionRun.work_probe` on CUDA: the most bytes any span of fico's work
    held above what was allocated when it began."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.bytes = device, 0

    @contextlib.contextmanager
    def measure(self):
        start = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            self.bytes = max(self.bytes, torch.cuda.max_memory_allocated(self.device) - start)


class ProfiledSpans(SpanProbe):
    """A :attr:`fico.ReductionRun.work_probe` on the CPU: marks each outermost span of fico's
    work as a profiler range (:data:`SPAN`), read back by :func:`span_peaks`."""

    def measure(self):
        return torch.profiler.record_function(SPAN)


def span_peaks(trace: dict) -> tuple[int, list[int]]:
    """From a Chrome trace of a profiled prefill: the most bytes allocated above the level at
    its start, and for each :data:`SPAN` range the most bytes above the level when it began."""
    events = trace["traceEvents"]
    memory = sorted(((e["ts"], e["args"]["Total Allocated"], e["args"]["Bytes"]) for e in events
                     if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
                    key=lambda m: m[0])
    if not memory:
        return 0, []
    times, totals = [m[0] for m in memory], [m[1] for m in memory]
    start = totals[0] - memory[0][2]  # the level before the first allocation
    spans = []
    for e in events:
        if e.get("name") != SPAN or e.get("ph") != "X":
            continue
        first, past = bisect.bisect_left(times, e["ts"]), bisect.bisect_right(times, e["ts"] + e["dur"])
        level = totals[first - 1] if first else start
        spans.append(max([level, *totals[first:past]]) - level)
    return max(totals) - start, spans


def _held_bytes(model, inputs: dict) -> int:
    """What the model and its inputs hold before a prefill (weights, buffers, input tensors)."""
    tensors = [*model.parameters(), *model.buffers(), *(v for v in inputs.values() if isinstance(v, torch.Tensor))]
    return sum(t.numel() * t.element_size() for t in tensors)


def prefill_memory(model, inputs: dict, recipe=None) -> PrefillMemory:
    """The peak memory of one prefill (``logits_to_keep=1``) with ``recipe`` applied (None:
    unreduced), and its work peak (from a second prefill on CUDA, whose probe resets the peak
    statistics that the first one reads)."""
    from .. import apply

    device = next(model.parameters()).device

    def applied(probe):
        if recipe is None:
            return contextlib.nullcontext()
        run = apply(model, recipe)
        run.work_probe = probe
        return run

    if device.type == "cuda":
        def prefill(probe=None) -> tuple[int, int]:
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            with applied(probe):
                model(**inputs, logits_to_keep=1)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device), before

        peak, before = prefill()
        work = None
        if recipe is not None:
            probe = CudaWorkPeak(device)
            prefill(probe)
            work = probe.bytes
        return PrefillMemory(peak, peak - before, work)
    from torch.profiler import ProfilerActivity, profile

    with applied(ProfiledSpans()), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        model(**inputs, logits_to_keep=1)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(path))
        activations, spans = span_peaks(json.loads(path.read_text()))
    held = _held_bytes(model, inputs)
    return PrefillMemory(held + activations, activations, None if recipe is None else max(spans, default=0))
