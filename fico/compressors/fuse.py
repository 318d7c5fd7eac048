"""Fuse the discarded tokens into one appended token (EViT)."""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..stages import Compressor, Correlation, Split
from ..state import TokenState, gather_tokens


class Fuse(Compressor):
    r"""Convergent fusion (EViT, Liang et al., ICLR 2022): S becomes one new token appended after T.

    The preserved tokens are unchanged, and

    .. math::  x_{\text{new}} = \sum_{i \in S} w_i\, x_i

    is appended after them, with the correlator's weights :math:`w_i` (EViT: [CLS]
    attention, not renormalised). Its size is :math:`\sum_i m_i` when sizes are tracked.
    In later steps the fused token is an ordinary candidate.
    """

    name = "fuse"
    cite = ("liang2022evit",)
    appends = 1
    consumes = "fused"

    def compress(self, state: TokenState, split: Split, correlation: Correlation) -> TokenState:
        kept = state.keep(split.preserved)
        kept.extras.update(split.extras)
        weights = correlation.fused.to(state.hidden.dtype)[..., None]  # (B, r, 1)
        fused = (weights * gather_tokens(state.hidden, split.discarded)).sum(1, keepdim=True)
        fused_size = None
        if state.size is not None:
            fused_size = gather_tokens(state.size, split.discarded).sum(1, keepdim=True)
        return kept.append(fused, fused_size)


@hookimpl
def fico_compressors():
    return [Fuse]
