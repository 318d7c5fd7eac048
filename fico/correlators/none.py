"""No correlation: pruning."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..stages import Correlation, Correlator, Split
from ..state import TokenState


class NoCorrelation(Correlator):
    r"""Pruning: discarded tokens relate to nothing (K = 0).

    .. math::  C = \varnothing, \qquad J_i = \varnothing

    FiCoCo (arXiv 2411.17686, §3.3) calls this the K = 0 case; FastV (Chen et al., ECCV
    2024) is its best-known instance. Its math is trivial, so ``fico explain`` cites no
    source for it: a recipe cites the method it reproduces.
    """

    name = "none"
    cite = ()
    produces = "nothing"

    def correlate(self, state: TokenState, split: Split) -> Correlation:
        return Correlation()


@hookimpl
def fico_correlators():
    return [NoCorrelation]
