"""Running a planned step where a site has built its :class:`fico.TokenState`, and recording it
on the run's trace (with provenance where the run keeps it)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..errors import InputError, RecipeError
from ..recipe.plan import PlannedStep, requested_removal
from ..run import ReductionRun, StepRecord, run_step
from ..state import TokenState


def run_point_step(run: ReductionRun, planned: PlannedStep, state: TokenState, remove: int | None = None
                   ) -> list[TokenState]:
    """Run a ``vision_output`` or ``pre_llm`` step on ``state`` (a batch of images): batched,
    removing the plan's count (or ``remove``, where the site counts the image itself), or
    image by image where the filter chooses the count from the image (``keep: adaptive``)."""
    step = planned.step
    site = step.site
    remove = planned.remove if remove is None else remove
    if remove is not None:
        new, seconds = run_step(planned, state, remove, run.sync_stage_timing)
        _record(run, site, state, new, remove, seconds)
        return [new]
    results = []
    for index in range(state.hidden.shape[0]):
        one = select_image(state, index)
        if one.hidden.is_meta:
            raise InputError(f"fico: {step.where} chooses its count from the image; it cannot run on the "
                             f"meta device")
        keep = step.filter.adaptive_keep(one)
        remove = int(one.candidate.sum()) - keep
        if keep < 0 or remove < 0:
            raise RecipeError(f"{run.recipe.source}: {step.where}: the filter {step.filter.name!r} "
                              f"chose to keep {keep} of {int(one.candidate.sum())} candidates")
        new, seconds = run_step(planned, one, remove, run.sync_stage_timing)
        _record(run, site, one, new, remove, seconds)
        results.append(new)
    return results


def image_removal(planned: PlannedStep, tokens: int, candidates: int, grids: tuple[tuple[int, int], ...]
                  ) -> int | None:
    """What a point step removes from one image of ``tokens`` visual tokens, ``candidates`` of
    them reducible, on ``grids``, where images differ in size (LLaVA-NeXT, Qwen-VL): ``keep: K``
    counts its tokens (an image of at most K keeps them all), other schedules count its
    candidates, and a filter's own count (``keep: filter``) follows from the image's grids.
    None: the filter chooses per image (``keep: adaptive``)."""
    step = planned.step
    if planned.remove is None:
        return None
    if step.schedule.counts_kept:
        requested = requested_removal(step, tokens)
    elif step.schedule.kind == "keep":  # the filter's count, on the image's own grids
        requested = candidates - step.filter.planned_keep_on(grids)
    else:
        requested = requested_removal(step, candidates, first=candidates)
    return min(max(requested, 0), candidates)


def _record(run: ReductionRun, site: str, state: TokenState, new: TokenState, remove: int, seconds: float) -> None:
    record = StepRecord(site, 0, state.num_tokens, new.num_tokens, remove, seconds)
    if new.sources is not None:
        record_provenance(record, state.positions, new.positions, new.sources, state.token_layout())
    run.trace.steps.append(record)


def record_provenance(record: StepRecord, before: Tensor, after: Tensor, sources: Tensor,
                      placed: tuple | None = None) -> None:
    """Store a step's provenance on its record (on the CPU), with the layout and grids of the
    tokens entering it (``TokenState.token_layout()``, where they have one)."""
    gone = ~torch.isin(before, after) if before.shape[0] == 1 else torch.stack(
        [~torch.isin(b, a) for b, a in zip(before, after)])
    record.sources = sources.detach().float().cpu()
    record.positions_in = before.detach().cpu()
    record.positions_out = after.detach().cpu()
    record.discarded = [row[mask].tolist() for row, mask in zip(before.cpu(), gone.cpu())]
    if placed is not None:
        record.layout_in, record.grids = placed[0].detach().cpu(), placed[1]


def select_image(state: TokenState, index: int) -> TokenState:
    """Image ``index`` of a batched state, as a batch of one."""
    pick = lambda t: None if t is None else t[index:index + 1]
    return replace(state, hidden=pick(state.hidden), positions=pick(state.positions), candidate=pick(state.candidate),
                   visual=pick(state.visual), text=pick(state.text), patch=pick(state.patch),
                   layout=pick(state.layout), sources=pick(state.sources), size=pick(state.size),
                   signals={k: v[index:index + 1] if torch.is_tensor(v) else v for k, v in state.signals.items()},
                   extras={k: v[index:index + 1] for k, v in state.extras.items()})
