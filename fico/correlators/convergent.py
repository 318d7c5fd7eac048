"""Convergent correlation: all discarded tokens feed one new token (EViT)."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..signals import check_signal_name
from ..stages import Correlation, Correlator, Split
from ..state import TokenState


class Convergent(Correlator):
    r"""Convergent correlation (EViT's inattentive-token fusion).

    Every discarded token links to one new token, with weight

    .. math::  w_i = \bar a_i \quad (i \in S)

    the head-mean attention it receives in ``signal`` (EViT: ``cls_attention``). The weights
    are not renormalised, as in the original (Liang et al., ICLR 2022, "Not All Patches
    Are What You Need"); FiCoCo (arXiv 2411.17686, §3.3) names this correlation convergent.
    """

    name = "convergent"
    cite = ("liang2022evit", "han2026ficoco",)
    produces = "fused"

    def __init__(self, signal: str = "cls_attention"):
        check_signal_name(signal)
        self.signal = signal

    def required_signals(self) -> set[str]:
        return {self.signal}

    def correlate(self, state: TokenState, split: Split) -> Correlation:
        weights = state.signals[self.signal].gather(1, split.discarded)
        return Correlation(fused=weights)


@hookimpl
def fico_correlators():
    return [Convergent]
