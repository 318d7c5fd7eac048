"""Cosine similarity of attention keys, each discarded token to its top-K targets."""

from __future__ import annotations

import torch.nn.functional as F

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..selection import top_k_shares
from ..stages import Correlation, Correlator, Split
from ..state import TokenState, gather_tokens


class KeySimilarity(Correlator):
    r"""Key cosine similarity with top-K targets (ToMe: K = 1).

    .. math::  C_{ij} = \frac{k_i \cdot k_j}{\lVert k_i\rVert\,\lVert k_j\rVert}, \quad i \in S,\ j \in T,
               \qquad J_i = \operatorname{top}_K(C_{i,:}), \qquad
               \alpha_{ij} = \frac{C_{ij}}{\sum_{j' \in J_i} C_{ij'}}\ (j \in J_i)

    with :math:`k` the head-mean keys and only the filter's allowed targets in T. With
    K = 1 this is ToMe's matching (Bolya et al., ICLR 2023): each discarded token goes
    whole (:math:`\alpha = 1`) to its most similar token on the other side.
    """

    name = "key_similarity"
    cite = ("bolya2023tome",)
    requires = ("keys",)

    def __init__(self, targets: int = 1):
        if targets < 1:
            raise RecipeError(f"targets must be >= 1, got {targets}")
        self.targets = targets

    def correlate(self, state: TokenState, split: Split) -> Correlation:
        keys = F.normalize(state.signals["keys"], dim=-1)
        similarity = gather_tokens(keys, split.discarded) @ gather_tokens(keys, split.preserved).transpose(1, 2)
        if not bool(split.targets.all()):
            similarity.masked_fill_(~split.targets[:, None, :], float("-inf"))
        k = min(self.targets, similarity.shape[-1])
        return Correlation(matrix=similarity, shares=top_k_shares(similarity, k))


@hookimpl
def fico_correlators():
    return [KeySimilarity]
