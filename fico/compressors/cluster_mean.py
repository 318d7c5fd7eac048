"""One new token per cluster of discarded tokens (SparseVLM's recycling)."""

from __future__ import annotations

import torch

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..stages import Compressor, Correlation, Split
from ..state import TokenState, gather_tokens


class ClusterMean(Compressor):
    r"""SparseVLM's recycled tokens (Zhang et al., ICML 2025): each cluster g of discarded tokens
    becomes one appended token, the mean of its members.

    .. math::  x_g = \frac{\sum_{i : g_i = g} x_i}{n_g + 10^{-6}}

    (the official code's denominator). The preserved tokens are unchanged. The number of new
    tokens follows the correlator's rule, ``int((int(fraction * r) + 1) / 10) + 1`` (give both
    the same ``fraction``); on the llm site they are placed right after the kept visual tokens.
    """

    name = "cluster_mean"
    cite = ("zhang2025sparsevlm",)
    consumes = "clusters"

    def __init__(self, fraction: float = 0.3):
        if not 0 <= fraction <= 1:
            raise RecipeError(f"fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction

    def appended(self, removed: int) -> int:
        from ..correlators.clusters import cluster_count

        return cluster_count(removed, self.fraction)

    def compress(self, state: TokenState, split: Split, correlation: Correlation) -> TokenState:
        kept = state.keep(split.preserved)
        kept.extras.update(split.extras)
        count = self.appended(split.r)
        if not count:
            return kept
        groups = correlation.clusters  # (B, r), -1: not recycled
        members = (groups[:, :, None] == torch.arange(count, device=groups.device)).to(state.hidden.dtype)
        sums = members.transpose(1, 2) @ gather_tokens(state.hidden, split.discarded)  # (B, c, D)
        means = sums / (members.sum(1)[..., None] + 1e-6)
        return kept.append(means)


@hookimpl
def fico_compressors():
    return [ClusterMean]
