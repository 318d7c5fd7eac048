"""The ``key_norm`` filter, registered with fico through the ``fico`` entry point."""

import fico
from fico.selection import mask_scores, split_by_scores


class KeyNorm(fico.Filter):
    r"""Discard the candidates whose head-mean attention keys are shortest.

    .. math::  s_i = -\lVert \bar k_i \rVert_2, \qquad S = \operatorname{top}_r(s)

    A key-norm score needs no attention matrix, so it stays cheap under any attention
    kernel (the idea behind DART's pivot tokens, Wen et al., EMNLP 2025).
    """

    name = "key_norm"
    requires = ("keys",)

    def __init__(self, largest: bool = False):
        self.largest = largest

    def split(self, state, r):
        norms = state.signals["keys"].float().norm(dim=-1)
        scores = norms if self.largest else -norms
        return split_by_scores(mask_scores(scores, state.candidate), r, targets=state.candidate)


@fico.hookimpl
def fico_filters():
    return [KeyNorm]
