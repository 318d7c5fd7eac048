"""Spatial pooling as a filter: one representative per k x k window of the patch grid."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..layout import windows
from ..selection import split_keeping
from ..stages import Filter, Split
from ..state import TokenState


def window_of(patch: Tensor, grid: tuple[int, int], kernel: int) -> tuple[Tensor, Tensor]:
    """``(B, N)`` index of each token's k x k window (row-major over whole windows; -1 for
    tokens outside every whole window, as stride-k pooling drops them) and whether it is the
    window's top-left cell."""
    rows, cols = grid
    per_row = cols // kernel
    cell = patch.clamp_min(0)
    r, c = cell // cols, cell % cols
    inside = (patch >= 0) & (r < (rows // kernel) * kernel) & (c < per_row * kernel)
    window = torch.where(inside, (r // kernel) * per_row + c // kernel, -1)
    corner = inside & (r % kernel == 0) & (c % kernel == 0)
    return window, corner


def token_windows(state: TokenState, kernel: int) -> tuple[Tensor, Tensor]:
    """:func:`window_of` for a state's tokens: by their cell where the site gave one grid, by
    their layout entry (each image's and part's own grid, :func:`fico.layout.windows`) where it
    gave a layout."""
    if state.layout is None or state.grids is None:
        return window_of(state.patch, state.grid, kernel)
    window, corner, _ = windows(state.layout, state.grids, kernel, whole=True)
    return window, corner


class WindowRepresentatives(Filter):
    r"""k x k pooling's selection: preserve one token per window of the patch grid (its top-left
    cell), discard the rest (UniPruneBench's ``pool``; VTC-Bench's downsampling baseline).

    .. math::  W(i) = (\lfloor \mathrm{row}_i / k \rfloor, \lfloor \mathrm{col}_i / k \rfloor), \qquad
               T = \{ i : \mathrm{row}_i \bmod k = \mathrm{col}_i \bmod k = 0 \}

    With the ``window`` correlator and an unweighted average, the preserved token becomes the
    mean of its window: ``avg_pool2d`` with kernel and stride k. Cells beyond the last whole
    window (when k does not divide the grid) are dropped, as stride-k pooling drops them. The
    count follows from the grid (``keep: filter``): 576 patches keep 144 at k = 2, 64 at k = 3.
    """

    name = "window"
    cite = ("peng2025unipruneb",)

    def __init__(self, kernel: int = 2):
        if kernel < 1:
            raise RecipeError(f"kernel must be >= 1, got {kernel}")
        self.kernel = kernel

    def planned_keep(self, num_candidates: int) -> int:
        side = math.isqrt(num_candidates)
        if side * side != num_candidates:
            raise RecipeError(f"window: {num_candidates} candidates are not a square grid")
        if self.kernel > side:
            raise RecipeError(f"kernel={self.kernel} is larger than the {side} x {side} grid")
        return (side // self.kernel) ** 2

    def planned_keep_on(self, grids: tuple[tuple[int, int], ...]) -> int:
        """One token per whole window of each part's own grid."""
        return sum((rows // self.kernel) * (cols // self.kernel) for rows, cols in grids)

    def split(self, state: TokenState, r: int) -> Split:
        _, corner = token_windows(state, self.kernel)
        keep = corner | ~state.candidate
        return split_keeping(keep, torch.where(keep, float("-inf"), 0.0).to(state.hidden.dtype),
                             targets=corner)


@hookimpl
def fico_filters():
    return [WindowRepresentatives]
