"""Size-weighted average of each preserved token with the discarded tokens it receives."""

from __future__ import annotations

import torch

from ..hookspecs import hookimpl
from ..stages import Compressor, Correlation, Split
from ..state import TokenState, gather_tokens


class WeightedAverage(Compressor):
    r"""Size-weighted averaging (ToMe's ``merge_wavg``, Bolya et al., ICLR 2023).

    With token sizes :math:`m` (1 for an original token) and the correlator's shares
    :math:`\alpha_{ij}`:

    .. math::  x_j \leftarrow \frac{m_j x_j + \sum_{i \in S} \alpha_{ij} m_i x_i}
                                   {m_j + \sum_{i \in S} \alpha_{ij} m_i}, \qquad
               m_j \leftarrow m_j + \sum_{i \in S} \alpha_{ij} m_i

    and S is removed. With ``size_weighted: false`` all sizes count as 1 and are not
    tracked, which is FiCoCo's self-preserving compression (arXiv 2411.17686, §3.3).
    A preserved token that receives nothing is unchanged.
    """

    name = "weighted_average"
    consumes = "shares"

    def __init__(self, size_weighted: bool = True):
        self.size_weighted = size_weighted

    def compress(self, state: TokenState, split: Split, correlation: Correlation) -> TokenState:
        kept = state.keep(split.preserved)
        kept.extras.update(split.extras)
        if correlation.shares is None:
            return kept
        sizes = state.token_sizes() if self.size_weighted else state.hidden.new_ones(*state.hidden.shape[:2], 1)
        sizes = sizes.to(state.hidden.dtype)
        source_size = gather_tokens(sizes, split.discarded)  # (B, r, 1)
        weights = correlation.shares.to(state.hidden.dtype) * source_size  # (B, r, T): alpha_ij m_i
        target_size = gather_tokens(sizes, split.preserved)  # (B, T, 1)
        received = weights.transpose(1, 2) @ gather_tokens(state.hidden, split.discarded)
        received_mass = weights.sum(1)[..., None]  # (B, T, 1)
        new_size = target_size + received_mass
        averaged = (target_size * kept.hidden + received) / new_size
        # Exactly unchanged (not m * x / m) where nothing arrives.
        kept.hidden = torch.where(received_mass > 0, averaged, kept.hidden)
        if self.size_weighted:
            kept.size = new_size
        return kept


@hookimpl
def fico_compressors():
    return [WeightedAverage]
