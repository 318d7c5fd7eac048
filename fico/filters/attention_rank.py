"""Rank tokens by the attention they receive from one query (EViT, FastV)."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..selection import mask_scores, split_by_scores
from ..signals import check_signal_name
from ..stages import Filter, Split
from ..state import TokenState


class AttentionRank(Filter):
    r"""Discard the candidates that receive the least attention from one query.

    .. math::  s_i = -\bar a_i, \qquad S = \operatorname{top}_r(s)

    where :math:`\bar a_i` is the head-mean softmax attention that token i receives in the
    site's signal ``signal``:

    * ``cls_attention``: from the [CLS] query, same layer, as in EViT (Liang et al., ICLR
      2022, "Not All Patches Are What You Need");
    * ``last_query_attention``: from the last input token in the previous decoder layer,
      as in FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2").

    Keeping the ``n - r`` most attended tokens is exactly the originals' ``topk``; fico
    keeps them in their original order instead of score order (sets are equal).
    """

    name = "attention_rank"
    cite = ("liang2022evit", "chen2024fastv",)

    def __init__(self, signal: str = "cls_attention"):
        check_signal_name(signal)
        self.signal = signal

    def required_signals(self) -> set[str]:
        return {self.signal}

    def split(self, state: TokenState, r: int) -> Split:
        attention = state.signals[self.signal]
        return split_by_scores(mask_scores(-attention, state.candidate), r, targets=state.candidate)


@hookimpl
def fico_filters():
    return [AttentionRank]
