"""Window membership: each discarded token belongs to its pooling window's representative."""

from __future__ import annotations

import torch

from ..errors import RecipeError
from ..filters.window import token_windows
from ..hookspecs import hookimpl
from ..stages import Correlation, Correlator, Split
from ..state import TokenState, gather_tokens


class SameWindow(Correlator):
    r"""Spatial pooling's correlation: a discarded token goes whole to the representative of its
    k x k window (UniPruneBench's ``pool``).

    .. math::  C_{ij} = \alpha_{ij} = [\, W(i) = W(j) \,], \qquad i \in S,\ j \in T

    Tokens outside every whole window relate to nothing (stride-k pooling drops them).
    """

    name = "window"
    cite = ("peng2025unipruneb",)

    def __init__(self, kernel: int = 2):
        if kernel < 1:
            raise RecipeError(f"kernel must be >= 1, got {kernel}")
        self.kernel = kernel

    def correlate(self, state: TokenState, split: Split) -> Correlation:
        window, _ = token_windows(state, self.kernel)
        source = gather_tokens(window, split.discarded)
        target = torch.where(split.targets, gather_tokens(window, split.preserved), -2)
        shares = ((source[:, :, None] == target[:, None, :]) & (source[:, :, None] >= 0)).to(state.hidden.dtype)
        return Correlation(matrix=shares, shares=shares)


@hookimpl
def fico_correlators():
    return [SameWindow]
