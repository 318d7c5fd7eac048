"""Rank tokens by the attention they receive from one query (EViT, FastV)."""

from __future__ import annotations

import torch

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..selection import mask_scores, split_by_scores, split_keeping, uniform_stride
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

    The same filter serves PyramidDrop (the last query with the layer's own q/k), FasterVLM,
    HiRED and VisionZip ([CLS] attention of the feature layer). Keeping the ``n - r`` most
    attended tokens is exactly the originals' ``topk``; fico keeps them in their original
    order instead of score order (sets are equal).

    ``receivers: C`` is VisionZip's split (Yang et al., CVPR 2025): of the ``n - r`` kept
    candidates only ``n - r - C`` are chosen by attention (the dominant tokens); from the
    others, in ascending order, the C at positions ``0, s, 2s, ...`` (:math:`s = \max(1, \lfloor M/C \rfloor)`,
    M of them) are kept too and are the only tokens that may receive the discarded ones'
    information (the contextual tokens). Emitted order (``Split.order``): protected tokens and
    dominant ones in original order, then the receivers.
    """

    name = "attention_rank"
    cite = ("liang2022evit", "chen2024fastv", "yang2025visionzip")

    def __init__(self, signal: str = "cls_attention", receivers: int = 0):
        check_signal_name(signal)
        if receivers < 0:
            raise RecipeError(f"receivers must be >= 0, got {receivers}")
        self.signal, self.receivers = signal, receivers

    def required_signals(self) -> set[str]:
        return {self.signal}

    def discard(self, requested: int, num_tokens: int, num_candidates: int) -> int:
        kept = num_candidates - requested
        if self.receivers > kept:
            raise RecipeError(f"receivers={self.receivers} (VisionZip's contextual tokens) is more than the {kept} "
                              f"candidates the step keeps")
        return super().discard(requested, num_tokens, num_candidates)

    def split(self, state: TokenState, r: int) -> Split:
        attention = state.signals[self.signal]
        scores = mask_scores(-attention, state.candidate)
        if not self.receivers:
            return split_by_scores(scores, r, targets=state.candidate)
        b, n = scores.shape
        dominant = split_by_scores(scores, r + self.receivers, targets=state.candidate)
        # the non-dominant candidates, ascending; the receivers are evenly spaced among them
        spread = uniform_stride(self.receivers, dominant.discarded.shape[1])
        receivers = dominant.discarded[:, spread]
        keep = torch.zeros(b, n, dtype=torch.bool, device=scores.device).scatter(1, dominant.preserved, True)
        keep.scatter_(1, receivers, True)
        is_receiver = torch.zeros_like(keep).scatter(1, receivers, True)
        split = split_keeping(keep, scores.masked_fill(keep, float("-inf")), targets=is_receiver)
        split.order = split.preserved + n * torch.gather(is_receiver, 1, split.preserved).long()
        return split


@hookimpl
def fico_filters():
    return [AttentionRank]
