"""FiCoCo's correlations: direct attention (V) and direct + text-bridged indirect (L)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..selection import quantile_shares, top_k_shares
from ..stages import Correlation, Correlator, Split
from ..state import TokenState, gather_tokens


class ThresholdedCorrelator(Correlator):
    """Common target selection: FiCoCo's quantile rule, or a fixed K (ablations).

    ``k: null`` (default) uses :func:`fico.selection.quantile_shares` with ``epsilon``;
    ``k: 0`` relates nothing (pruning); ``k >= 1`` sends each discarded token to its K
    highest-correlated targets, shares normalised the same way.
    """

    def __init__(self, epsilon: float = 0.998, k: int | None = None):
        if not 0 <= epsilon <= 1:
            raise RecipeError(f"epsilon must be in [0, 1], got {epsilon}")
        if k is not None and k < 0:
            raise RecipeError(f"k must be >= 0 or null, got {k}")
        self.epsilon, self.k = epsilon, k

    def matrix(self, state: TokenState, split: Split) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def correlate(self, state: TokenState, split: Split) -> Correlation:
        matrix = self.matrix(state, split)
        if self.k == 0:
            return Correlation(matrix=matrix)
        if self.k is None:
            shares = quantile_shares(matrix, split.targets, self.epsilon)
        else:
            masked = matrix.masked_fill(~split.targets[:, None, :], float("-inf"))
            shares = top_k_shares(masked, min(self.k, int(split.targets.sum(1).min())))
        return Correlation(matrix=matrix, shares=shares)


def _block(attention: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    """``attention[b, rows[b]][:, columns[b]]`` for (B, N, N) attention."""
    picked = gather_tokens(attention, rows)  # (B, R, N)
    return torch.gather(picked, 2, columns[:, None, :].expand(-1, rows.shape[1], -1))


class AttentionCorrelation(ThresholdedCorrelator):
    r"""FiCoCo-V's direct correlation (Han et al., AAAI 2026, arXiv 2411.17686, §3.3, Alg. 1).

    .. math::  C_{ij} = A_{ij}, \quad i \in S,\ j \in T

    with :math:`A` the layer's head-mean softmax attention (discarded token as query), and
    each discarded token's targets :math:`J_i` by the quantile rule, with shares
    :math:`\alpha_{ij}` (epsilon = 0.998):

    .. math::  J_i = \{ j \in T : C_{ij} \ge \operatorname{quantile}_\epsilon(C_{i,T}) \}, \qquad
               \alpha_{ij} = \frac{C_{ij}}{\sum_{j' \in J_i} C_{ij'}}
    """

    name = "attention"
    cite = ("han2026ficoco",)
    requires = ("attention",)

    def matrix(self, state: TokenState, split: Split) -> Tensor:
        return _block(state.signals["attention"], split.discarded, split.preserved)


class TextBridgedCorrelation(ThresholdedCorrelator):
    r"""FiCoCo-L's correlation (Han et al., AAAI 2026, arXiv 2411.17686, Eq. 4, causal reading).

    .. math::  C_{ij} = \gamma\,(A_{ij} + A_{ji}) + (1-\gamma)\,\frac{1}{M}\sum_{k \in Q} A_{ki} A_{kj}

    for i in S, j in T (visual tokens), with :math:`A` the previous layer's head-mean
    softmax attention and Q the M text tokens after the first visual token. In a causal
    model only one of :math:`A_{ij}, A_{ji}` is non-zero, so the sum is the causally valid
    direct correlation; the indirect term relates two visual tokens through the text
    queries that attend to both. gamma = 0.6; targets and shares as in ``attention``:

    .. math::  J_i = \{ j \in T : C_{ij} \ge \operatorname{quantile}_\epsilon(C_{i,T}) \}, \qquad
               \alpha_{ij} = \frac{C_{ij}}{\sum_{j' \in J_i} C_{ij'}}
    """

    name = "text_bridged"
    cite = ("han2026ficoco",)
    requires = ("attention",)

    def __init__(self, gamma: float = 0.6, epsilon: float = 0.998, k: int | None = None):
        if not 0 <= gamma <= 1:
            raise RecipeError(f"gamma must be in [0, 1], got {gamma}")
        super().__init__(epsilon=epsilon, k=k)
        self.gamma = gamma

    def matrix(self, state: TokenState, split: Split) -> Tensor:
        attention = state.signals["attention"]
        direct = _block(attention, split.discarded, split.preserved)
        direct = direct + _block(attention, split.preserved, split.discarded).transpose(1, 2)
        text = state.text_after_image().to(attention.dtype)  # (B, N)
        count = text.sum(1).clamp_min(1)[:, None, None]
        from_text = attention * text[:, :, None]  # rows of the text queries
        indirect = gather_tokens(from_text.transpose(1, 2), split.discarded) @ gather_tokens(
            from_text.transpose(1, 2), split.preserved).transpose(1, 2) / count
        return self.gamma * direct + (1 - self.gamma) * indirect


@hookimpl
def fico_correlators():
    return [AttentionCorrelation, TextBridgedCorrelation]
