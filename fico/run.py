"""A recipe applied to a model: :class:`ReductionRun` and its :class:`Trace`."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Callable, ContextManager

import torch

from .contract import Boundary
from .recipe import Recipe
from .recipe.plan import PlannedStep, RecipePlan, equivalent_tokens
from .state import TokenState


@dataclass
class StepRecord:
    """One executed step: where, tokens in/out (per sample), and host time spent in the stages."""

    site: str
    layer: int
    tokens_in: int
    tokens_out: int
    removed: int
    seconds: float
    #: with provenance: (B, tokens_out, N0) weight of each original token in each token after
    #: the step, the original positions (B, tokens_in) before it, and those discarded (B, r)
    sources: object = None
    positions_in: object = None
    positions_out: object = None
    discarded: object = None
    #: with provenance: the layout (B, tokens_in, 4) of the tokens entering the step
    #: (``fico.layout``: image, part, row, column) and each part's grid
    layout_in: object = None
    grids: object = None


@dataclass
class Trace:
    """Token counts of the last prefill forward pass.

    Attributes:
        vision: tokens entering each vision-encoder layer, per image ([CLS] included); a
            step inside layer i runs after its attention, so the layer's MLP sees the
            step's output.
        vision_features: image features per image reaching the language model (after any
            vision_output and pre_llm step); a list when the images of the batch differ.
        vision_passes: vision-tower passes per image (LLaVA-NeXT: base image + crops; None:
            one), a list when the images differ; ``vision`` counts the tokens of each pass.
        llm: sequence length each decoder layer runs on during prefill, after any step at
            its input (text and padding included); this is also its KV-cache length.
        llm_mlp: sequence length each decoder layer's MLP runs on (differs from ``llm`` at
            layers with an ``llm_mid`` step).
        visual: visual tokens entering each decoder layer's attention (first sample).
        ghosts: where samples of a ragged batch hold different numbers of tokens, the ghost
            slots (``fico.adapters.ghosts``) of each sample in each decoder layer, by layer;
            sample i runs ``llm[layer] - ghosts[layer][i]`` real tokens and padding.
        steps: the reduction steps that ran, in order.
    """

    vision: list[int] = field(default_factory=list)
    vision_features: int | list[int] | None = None
    vision_passes: int | list[int] | None = None
    llm: list[int] = field(default_factory=list)
    llm_mlp: list[int] = field(default_factory=list)
    visual: list[int] = field(default_factory=list)
    ghosts: dict[int, list[int]] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def stage_seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    def equivalent_tokens(self) -> dict[str, float] | None:
        """Visual tokens averaged over the decoder layers (see :func:`fico.recipe.plan.equivalent_tokens`)."""
        mid = [s for s in self.steps if s.site == "llm_mid" and s.layer == len(self.visual) - 1]
        output = self.visual[-1] - (mid[0].removed if mid else 0) if self.visual else 0
        return equivalent_tokens(self.visual, output)

    def rows(self) -> list[tuple[str, str, int, int]]:
        """(site, layer, tokens in, tokens out) for every layer (or point) that ran."""
        out = []
        points = {s.site: s for s in self.steps if s.site in ("vision_output", "pre_llm")}
        for site, counts in (("vision", self.vision), ("llm", self.llm)):
            if site == "llm":
                out += [(p.site, "-", p.tokens_in, p.tokens_out) for p in points.values()]
            steps = {}
            for s in self.steps:
                if s.site in (site, f"{site}_mid"):
                    first = steps.get(s.layer)
                    steps[s.layer] = (first[0] if first else s.tokens_in, s.tokens_out)
            for layer, n in enumerate(counts):
                n_in, n_out = steps.get(layer, (n, n))
                out.append((site, str(layer), n_in, n_out))
        return out

    def __str__(self) -> str:
        lines = [f"{'site':<14}{'layer':>6}{'tokens in':>11}{'tokens out':>12}"]
        for site, layer, n_in, n_out in self.rows():
            mark = "  <- reduced" if n_in != n_out else ""
            lines.append(f"{site:<14}{layer:>6}{n_in:>11}{n_out:>12}{mark}")
        if self.vision_features is not None:
            lines.append(f"image features per image: {self.vision_features}")
        return "\n".join(lines)


def run_step(planned: PlannedStep, state: TokenState, remove: int, synchronize: bool = False
             ) -> tuple[TokenState, float]:
    """filter -> correlate -> compress; returns the new state and the seconds it took.

    On the ``meta`` device (shape-only runs, e.g. FLOP counting) no stage runs: the step
    keeps the right number of tokens, so the model's own cost is measured exactly. With
    ``synchronize`` the accelerator is synchronised around the step, so the seconds are the
    step's own (benchmarks on a GPU; otherwise the asynchronous launch time would be counted).
    """
    sync = torch.cuda.synchronize if synchronize and state.hidden.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    step = planned.step
    if state.hidden.is_meta:
        return _shape_only_step(state, remove, step.compressor.appended(remove)), 0.0
    where = f"{state.site} layer {state.layer}" if state.site not in ("vision_output", "pre_llm") else state.site
    boundary = Boundary(f"{step.where} at {where}")
    split = boundary.split(step.filter, boundary.call(step.filter, step.filter.split, state, remove), state, remove)
    correlation = boundary.correlation(
        step.correlator, boundary.call(step.correlator, step.correlator.correlate, state, split), split)
    riders = [t for t in (state.sources, state.carried) if t is not None]
    if not riders:
        new_state = boundary.call(step.compressor, step.compressor.compress, state, split, correlation)
        new_state = _emit_order(step, split, boundary.state(step.compressor, new_state, state, remove))
        sync()
        return new_state, time.perf_counter() - start
    # Provenance (and a site's carried values) ride along as extra channels: every compressor
    # is linear in the tokens, so it moves them exactly as it moves the tokens' information.
    width = state.hidden.shape[-1]
    channels = torch.cat([state.hidden, *(t.to(state.hidden.dtype) for t in riders)], -1)
    carried = replace(state, hidden=channels, sources=None, carried=None)
    new_state = boundary.call(step.compressor, step.compressor.compress, carried, split, correlation)
    boundary.state(step.compressor, new_state, carried, remove)
    moved = new_state.hidden
    new_state.hidden = moved[..., :width]
    if state.sources is not None:
        new_state.sources = moved[..., width:width + state.sources.shape[-1]].float()
        width += state.sources.shape[-1]
    if state.carried is not None:
        new_state.carried = moved[..., width:].to(state.carried.dtype)
    new_state = _emit_order(step, split, new_state)
    sync()
    return new_state, time.perf_counter() - start


def _emit_order(step, split, state: TokenState) -> TokenState:
    """The preserved tokens in the order the method emits them (``order: method``); appended
    tokens stay last."""
    if step.order != "method" or split.order is None:
        return state
    b, kept = split.order.shape
    order = torch.sort(split.order, dim=1, stable=True).indices
    rest = torch.arange(kept, state.num_tokens, device=order.device).expand(b, -1)
    return state.keep(torch.cat([order, rest], 1))


class ReductionRun:
    """A recipe attached to a model. Use as a context manager or call :meth:`remove`.

    >>> import fico
    >>> model, processor = fico.embedded.build_model(), fico.embedded.build_processor()
    >>> inputs = fico.embedded.example_inputs(processor)
    >>> with fico.apply(model, fico.load_recipe("fastv")) as run:
    ...     _ = model(**inputs)
    >>> run.trace.llm[:4]
    [587, 587, 299, 299]
    """

    def __init__(self, model, recipe: Recipe, plan: RecipePlan, provenance: bool = False):
        self.model = model
        self.recipe = recipe
        self.plan = plan
        #: record, for every step, which original tokens each surviving token absorbed
        self.provenance = provenance
        self.trace = Trace()
        #: synchronise the accelerator around each step, so its recorded seconds are its own
        self.sync_stage_timing = False
        #: set by a benchmark: a context manager factory wrapped around each span of fico's own
        #: work (:meth:`work`), to measure the time or memory its signals and stages take
        self.work_probe: Callable[[], ContextManager] | None = None
        self._undo: list[Callable[[], None]] = []
        self.active = False

    def work(self) -> ContextManager:
        """A span of fico's own work at a site: forming a step's signals (an attention matrix,
        rows of it, a text tower's embedding) and running its stages. Sites wrap each span, so
        a benchmark's :attr:`work_probe` sees every one; without a probe it does nothing."""
        return self.work_probe() if self.work_probe is not None else contextlib.nullcontext()

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Register ``undo`` to run at :meth:`remove`: every change an adapter makes to the
        model comes with its exact reversal, undone in reverse order."""
        self._undo.append(undo)

    def begin_trace(self, keep_vision: bool = False) -> None:
        """Start the trace of a new forward; ``keep_vision`` keeps the image encoding that
        ``generate`` runs just before its prefill."""
        old = self.trace
        self.trace = Trace()
        if keep_vision:
            self.trace.vision, self.trace.vision_features = old.vision, old.vision_features
            self.trace.vision_passes = old.vision_passes
            self.trace.steps = [s for s in old.steps if s.site in ("vision", "vision_output", "pre_llm")]

    def remove(self) -> None:
        """Detach everything fico attached; the model is the vanilla model again."""
        while self._undo:
            self._undo.pop()()
        self.active = False

    def __enter__(self) -> "ReductionRun":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _shape_only_step(state: TokenState, remove: int, appends: int) -> TokenState:
    """The token counts of a step without its computation (meta tensors carry no values)."""
    b, n = state.candidate.shape
    kept = state.keep(torch.arange(n - remove, device=state.hidden.device).expand(b, n - remove))
    if appends:
        kept = kept.append(state.hidden.new_zeros(b, appends, state.hidden.shape[-1]))
    return kept
