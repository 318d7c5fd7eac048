"""Drop the discarded tokens."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..stages import Compressor, Correlation, Split
from ..state import TokenState


class Drop(Compressor):
    r"""Pruning: the preserved tokens are unchanged and S is removed.

    .. math::  X \leftarrow (x_j)_{j \in T}

    The compress stage of FastV (Chen et al., ECCV 2024) and of EViT without fusion
    (Liang et al., ICLR 2022). Its math is trivial, so ``fico explain`` cites no source for
    it: a recipe cites the method it reproduces.
    """

    name = "drop"
    cite = ()

    def compress(self, state: TokenState, split: Split, correlation: Correlation) -> TokenState:
        kept = state.keep(split.preserved)
        kept.extras.update(split.extras)
        return kept


@hookimpl
def fico_compressors():
    return [Drop]
