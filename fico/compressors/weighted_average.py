"""Size-weighted average of each preserved token with the discarded tokens it receives."""

from __future__ import annotations

import torch
from torch import Tensor

from ..hookspecs import hookimpl
from ..stages import Compressor, Correlation, Split
from ..state import TokenState, gather_tokens


def average_into_targets(state: TokenState, split: Split, shares: Tensor | None, size_weighted: bool) -> TokenState:
    r"""Keep T and move S into it: :math:`x_j \leftarrow (m_j x_j + \sum_i w_{ij} m_i x_i) / (m_j + \sum_i w_{ij} m_i)`.

    ``m`` are the token sizes if ``size_weighted`` (and then updated to the denominator),
    else 1. Tokens that receive nothing are returned bit for bit.
    """
    kept = state.keep(split.preserved)
    kept.extras.update(split.extras)
    if shares is None:
        return kept
    dtype = state.hidden.dtype
    sizes = state.token_sizes() if size_weighted else state.hidden.new_ones(*state.hidden.shape[:2], 1)
    sizes = sizes.to(dtype)
    weights = shares.to(dtype) * gather_tokens(sizes, split.discarded)  # (B, r, T): alpha_ij m_i
    target_size = gather_tokens(sizes, split.preserved)  # (B, T, 1)
    received = weights.transpose(1, 2) @ gather_tokens(state.hidden, split.discarded)
    received_mass = weights.sum(1)[..., None]  # (B, T, 1)
    new_size = target_size + received_mass
    averaged = (target_size * kept.hidden + received) / new_size
    # Exactly unchanged (not m * x / m) where nothing arrives.
    kept.hidden = torch.where(received_mass > 0, averaged, kept.hidden)
    if size_weighted:
        kept.size = new_size
    return kept


class WeightedAverage(Compressor):
    r"""Size-weighted averaging (ToMe's ``merge_wavg``, Bolya et al., ICLR 2023).

    With token sizes :math:`m` (1 for an original token) and the correlator's shares
    :math:`\alpha_{ij}`:

    .. math::  x_j \leftarrow \frac{m_j x_j + \sum_{i \in S} \alpha_{ij} m_i x_i}
                                   {m_j + \sum_{i \in S} \alpha_{ij} m_i}, \qquad
               m_j \leftarrow m_j + \sum_{i \in S} \alpha_{ij} m_i

    and S is removed. With ``size_weighted: false`` all sizes count as 1 and are not
    tracked. A preserved token that receives nothing is unchanged.
    """

    name = "weighted_average"
    cite = ("bolya2023tome",)
    consumes = "shares"

    def __init__(self, size_weighted: bool = True):
        self.size_weighted = size_weighted

    def compress(self, state: TokenState, split: Split, correlation: Correlation) -> TokenState:
        return average_into_targets(state, split, correlation.shares, self.size_weighted)


@hookimpl
def fico_compressors():
    return [WeightedAverage]
