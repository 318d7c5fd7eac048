"""FiCoCo's self-preserving compression."""

from __future__ import annotations

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..stages import Compressor, Correlation, Split
from ..state import TokenState
from .weighted_average import average_into_targets

WEIGHTINGS = ("correlation", "uniform")


class SelfPreserving(Compressor):
    r"""Self-preserving compression (Han et al., AAAI 2026, arXiv 2411.17686, Eq. 2).

    .. math::  x_j \leftarrow \frac{x_j + \sum_{i \in I_j} \alpha_{ij} x_i}{1 + \sum_{i \in I_j} \alpha_{ij}},
               \qquad I_j = \{ i \in S : j \in J_i \}

    for every preserved j; S is removed. Each preserved token keeps weight 1 on itself; no
    token sizes are tracked and no proportional attention follows. A preserved token that
    receives nothing is unchanged. ``weighting: uniform`` replaces :math:`\alpha_{ij}` by 1
    (the paper's "average compression" ablation: the plain mean of the token and the
    discarded tokens that chose it).
    """

    name = "self_preserving"
    cite = ("han2026ficoco",)
    consumes = "shares"

    def __init__(self, weighting: str = "correlation"):
        if weighting not in WEIGHTINGS:
            raise RecipeError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        self.weighting = weighting

    def compress(self, state: TokenState, split: Split, correlation: Correlation) -> TokenState:
        shares = correlation.shares
        if shares is not None and self.weighting == "uniform":
            shares = (shares > 0).to(shares.dtype)
        return average_into_targets(state, split, shares, size_weighted=False)


@hookimpl
def fico_compressors():
    return [SelfPreserving]
