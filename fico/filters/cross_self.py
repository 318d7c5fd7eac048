"""FitPrune's selection: visual tokens that neither the text nor the image attends to."""

from __future__ import annotations

import torch

from ..hookspecs import hookimpl
from ..selection import mask_scores, split_by_scores
from ..stages import Filter, Split
from ..state import TokenState


class CrossSelfAttention(Filter):
    r"""FitPrune (Ye et al., AAAI 2025): discard the visual tokens with the least cross x self attention.

    With :math:`A` the layer's attention maximised over heads, the N visual tokens V present
    and the tokens after them Q (the question and the answer prompt):

    .. math::  \mathrm{self}_j = \frac{1}{N} \sum_{q \in V} A_{qj}, \qquad
               \mathrm{cross}_j = \sum_{q \in Q} A_{qj}, \qquad
               s_j = -\,\mathrm{cross}_j \cdot \mathrm{self}_j, \qquad S = \operatorname{top}_r(s)

    The official code runs it inside the decoder layer, after attention and before the MLP
    (fico's ``llm_mid`` site), with a fitted per-layer count table (``recipes/fitprune.yaml``).
    Only the rows of V and Q are formed, from the layer's own q/k.
    """

    name = "cross_self_attention"
    cite = ("ye2025fitprune",)
    requires = ("attention_rows",)

    def split(self, state: TokenState, r: int) -> Split:
        visual = state.candidate
        after = state.text_after_image()
        queries = visual | after
        count = queries.sum(1)
        longest = int(count.max())
        rows = torch.sort((~queries).to(torch.uint8), dim=1, stable=True).indices[:, :longest]
        valid = torch.arange(longest, device=rows.device) < count[:, None]
        probs = state.signals["attention_rows"](rows, "max")  # (B, R, N)
        row_visual = torch.gather(visual, 1, rows) & valid
        row_after = torch.gather(after, 1, rows) & valid
        n_visual = visual.sum(1, keepdim=True).clamp_min(1).to(probs.dtype)
        self_attention = (probs * row_visual[:, :, None]).sum(1) / n_visual
        cross_attention = (probs * row_after[:, :, None]).sum(1)
        scores = mask_scores(-(cross_attention * self_attention), visual)
        return split_by_scores(scores, r, targets=visual)


@hookimpl
def fico_filters():
    return [CrossSelfAttention]
