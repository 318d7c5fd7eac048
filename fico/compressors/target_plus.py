"""Compressors that add discarded tokens onto their targets without renormalising the target."""

from __future__ import annotations

import torch

from ..hookspecs import hookimpl
from ..stages import Compressor, Correlation, Split
from ..state import TokenState, gather_tokens
from .weighted_average import receive


class TargetPlusMean(Compressor):
    r"""VisionZip's merge (Yang et al., CVPR 2025): each target keeps itself and adds the mean of
    the discarded tokens assigned to it.

    .. math::  x_j \leftarrow x_j + \frac{\sum_{i \in S} \alpha_{ij} x_i}{\max\big(1, \sum_{i \in S} \alpha_{ij}\big)}

    Not an average of the group: a target with members has about twice the magnitude of a
    plain mean, as in the official code (its targets are not weighted by group size). A
    target that receives nothing is unchanged.
    """

    name = "target_plus_mean"
    cite = ("yang2025visionzip",)
    consumes = "shares"

    def compress(self, state: TokenState, split: Split, correlation: Correlation) -> TokenState:
        kept = state.keep(split.preserved)
        kept.extras.update(split.extras)
        if correlation.shares is None:
            return kept
        shares = correlation.shares.to(state.hidden.dtype)
        received, mass = receive(shares, gather_tokens(state.hidden, split.discarded))
        kept.hidden = kept.hidden + received / mass.clamp_min(1)
        return kept


class TargetPlusSum(Compressor):
    r"""PruMerge's merge (Shang et al., ICCV 2025): each target adds its neighbours, weighted by
    their attention and unnormalised, and the discarded tokens also form one extra token.

    .. math::  x_j \leftarrow x_j + \sum_{i \in S} \alpha_{ij} x_i + \sum_{k \in T} w_{jk} x_k, \qquad
               x_{\text{extra}} = \sum_{i \in S} a_i x_i

    with the correlator's shares :math:`\alpha`, preserved shares :math:`w` (states before the
    step) and fused weights :math:`a`; the extra token is appended after the targets. As in
    the official code it is appended even when nothing is discarded (then it is the empty
    sum, a zero vector: an image whose every patch is an outlier or a supplement).
    """

    name = "target_plus_sum"
    cite = ("shang2025prumerge",)
    consumes = "neighbours"
    appends = 1

    def appended(self, removed: int) -> int:
        return self.appends

    def compress(self, state: TokenState, split: Split, correlation: Correlation) -> TokenState:
        kept = state.keep(split.preserved)
        kept.extras.update(split.extras)
        dtype = state.hidden.dtype
        discarded = gather_tokens(state.hidden, split.discarded)
        added = correlation.shares.to(dtype).transpose(1, 2) @ discarded
        if correlation.preserved_shares is not None:
            added = added + correlation.preserved_shares.to(dtype) @ kept.hidden
        kept.hidden = kept.hidden + added
        extra = (correlation.fused.to(dtype)[..., None] * discarded).sum(1, keepdim=True)
        return kept.append(extra)


@hookimpl
def fico_compressors():
    return [TargetPlusMean, TargetPlusSum]
