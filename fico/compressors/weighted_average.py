"""Size-weighted average of each preserved token with the discarded tokens it receives."""

from __future__ import annotations

import torch
from torch import Tensor

from ..hookspecs import hookimpl
from ..stages import Compressor, Correlation, Split
from ..state import TokenState, gather_tokens


def receive(weights: Tensor, discarded: Tensor) -> tuple[Tensor, Tensor]:
    r"""What each preserved token receives: :math:`\sum_i w_{ij} x_i` ``(B, T, D)`` and
    :math:`\sum_i w_{ij}` ``(B, T, 1)``, from ``weights`` ``(B, r, T)`` and the discarded
    tokens ``(B, r, D)``.

    Most correlators send each discarded token to one or a few targets (ToMe: one; FiCoCo's
    quantile rule: one for rows of up to 500 candidates), so ``weights`` is mostly zeros.
    Then the K nonzeros of each row are added into their targets, O(r K D), instead of
    the dense product, O(r T D), a large part of ToMe's step at 577 tokens.
    """
    b, r, t = weights.shape
    per_row = int((weights != 0).sum(-1).max()) if r else 0
    if per_row == 0 or 4 * per_row > t:
        return weights.transpose(1, 2) @ discarded, weights.sum(1)[..., None]
    index = weights.abs().topk(per_row, dim=-1, sorted=False).indices  # (B, r, K): every nonzero of each row
    values = weights.gather(-1, index)
    index, values = index.flatten(1), values.flatten(1)  # (B, r K)
    sources = (discarded if per_row == 1 else discarded.repeat_interleave(per_row, dim=1)) * values[..., None]
    received = discarded.new_zeros(b, t, discarded.shape[-1]).scatter_add_(
        1, index[..., None].expand(-1, -1, discarded.shape[-1]), sources)
    mass = weights.new_zeros(b, t).scatter_add_(1, index, values)[..., None]
    return received, mass


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
    received, received_mass = receive(weights, gather_tokens(state.hidden, split.discarded))
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
