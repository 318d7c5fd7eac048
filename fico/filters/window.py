"""Spatial pooling as a filter: one representative per k x k window of the patch grid."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..layout import grid_layout, windows
from ..selection import split_keeping
from ..stages import Filter, Split
from ..state import TokenState


def window_of(patch: Tensor, grid: tuple[int, int], kernel: int) -> tuple[Tensor, Tensor]:
    """``(B, N)`` index of each token's k x k window (row-major over whole windows; -1 for
    tokens outside every whole window, as stride-k pooling drops them) and whether it is the
    window's top-left cell, for tokens on one grid placed by their row-major cell ``patch``
    (:func:`fico.layout.windows` for any layout)."""
    window, corner, _ = windows(grid_layout(patch, grid), (tuple(grid),), kernel, whole=True)
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

    def split(self, state: TokenState, r: int) -> Split:
        _, corner, _ = windows(state.layout, state.grids, self.kernel, whole=True)
        keep = corner | ~state.candidate
        return split_keeping(keep, torch.where(keep, float("-inf"), 0.0).to(state.hidden.dtype),
                             targets=corner)


@hookimpl
def fico_filters():
    return [WindowRepresentatives]
