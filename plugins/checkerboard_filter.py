"""An example third-party filter in one file: thin the image out like a checkerboard.

Reference it from a recipe with ``plugins: [path/to/checkerboard_filter.py]`` and
``filter: {name: checkerboard}``. A spatially uniform subsample is the simplest content-blind
baseline beside fico's built-in ``random`` filter and ``pool``.
"""

import torch

import fico
from fico.selection import mask_scores, split_by_scores


class Checkerboard(fico.Filter):
    r"""Discard the patches on the checkerboard's dark cells first, in reading order.

    .. math::  s_i = ((\mathrm{row}_i + \mathrm{col}_i) \bmod 2) - \epsilon\, i, \qquad S = \operatorname{top}_r(s)

    with the patch's grid cell and a tie-break towards the lower index: up to half of the
    patches go by parity alone; a larger r continues on the light cells.
    """

    name = "checkerboard"

    def split(self, state, r):
        cols = state.grid[1] if state.grid else 1
        cell = state.patch.clamp_min(0)
        dark = ((cell // cols + cell % cols) % 2).to(state.hidden.dtype)
        order = torch.arange(state.num_tokens, device=cell.device, dtype=state.hidden.dtype)
        scores = dark - order / (10 * state.num_tokens)
        return split_by_scores(mask_scores(scores, state.candidate & (state.patch >= 0)), r, targets=state.candidate)


@fico.hookimpl
def fico_filters():
    return [Checkerboard]
