"""Random pruning: the content-blind baseline."""

from __future__ import annotations

import torch

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..selection import mask_scores, split_by_scores
from ..stages import Filter, Split
from ..state import TokenState


class RandomFilter(Filter):
    r"""Discard ``r`` candidates chosen uniformly at random (the baseline of UniPruneBench and llmc).

    .. math::  u_c \sim U(0, 1)\ \text{i.i.d. per grid cell } c, \qquad s_i = u_{c(i)}, \qquad S = \operatorname{top}_r(s)

    The noise comes from a generator seeded with ``seed`` (plus the layer), drawn per grid
    cell of the image, so a sample draws the same tokens alone or in a padded batch, and a
    run is reproducible; tokens without a cell (appended ones) draw from one extra slot.
    Kept tokens keep their original order (llmc's ``RandomPrune`` sorts its sample too).
    """

    name = "random"
    cite = ("peng2025unipruneb",)

    def __init__(self, seed: int = 0):
        if seed < 0:
            raise RecipeError(f"seed must be >= 0, got {seed}")
        self.seed = seed

    def split(self, state: TokenState, r: int) -> Split:
        cells = state.grid[0] * state.grid[1] if state.grid is not None else state.num_tokens
        generator = torch.Generator(device="cpu").manual_seed(self.seed + 1000003 * state.layer)
        noise = torch.rand(cells + 1, generator=generator, dtype=torch.float64).to(state.hidden.device)
        patch = state.patch if state.patch is not None else torch.arange(state.num_tokens, device=noise.device)
        scores = noise[torch.where(patch >= 0, patch, cells)].expand(state.candidate.shape)
        return split_by_scores(mask_scores(scores, state.candidate), r, targets=state.candidate)


@hookimpl
def fico_filters():
    return [RandomFilter]
