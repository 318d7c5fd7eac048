"""PruMerge's correlation: each kept token gathers its most similar tokens, kept or not."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..signals import check_signal_name
from ..stages import Correlation, Correlator, Split
from ..state import TokenState, gather_tokens


class KeyNeighbours(Correlator):
    r"""PruMerge's k-nearest-neighbour correlation (Shang et al., ICCV 2025).

    For each preserved target j, its ``neighbors`` most similar other candidates by the cosine
    of ``keys`` (PruMerge: the next layer's full-width keys), among the other targets and the
    discarded tokens alike, send their state with weight :math:`a_o`, the attention in
    ``weights``, unnormalised:

    .. math::  N_j = \operatorname{top}_k \{ \cos(k_j, k_o) : o \in (T \setminus \{j\}) \cup S \}, \qquad
               \alpha_{oj} = a_o\, [o \in N_j]

    Neighbourhoods overlap and include other targets (their states before the step), as in
    the official code. Every discarded token also feeds one appended token with weight
    :math:`a_o` (PruMerge's extra token; the ``fused`` weights).
    """

    name = "key_neighbours"
    cite = ("shang2025prumerge",)
    produces = "neighbours"

    def __init__(self, neighbors: int = 32, keys: str = "next_keys_fullwidth",
                 weights: str = "next_cls_attention_fullwidth"):
        if neighbors < 1:
            raise RecipeError(f"neighbors must be >= 1, got {neighbors}")
        check_signal_name(keys)
        check_signal_name(weights)
        self.neighbors, self.keys, self.weights = neighbors, keys, weights

    def required_signals(self) -> set[str]:
        return {self.keys, self.weights}

    def correlate(self, state: TokenState, split: Split) -> Correlation:
        unit = F.normalize(state.signals[self.keys], dim=-1)
        attention = state.signals[self.weights]
        b, t = split.preserved.shape
        r = split.r
        # candidates: the preserved targets, then the discarded tokens (the official order)
        pool = torch.cat([split.preserved, split.discarded], 1)
        usable = torch.cat([split.targets, torch.ones_like(split.discarded, dtype=torch.bool)], 1)
        similarity = gather_tokens(unit, split.preserved) @ gather_tokens(unit, pool).transpose(1, 2)  # (B, T, T + r)
        itself = torch.zeros_like(similarity, dtype=torch.bool)
        itself[:, torch.arange(t), torch.arange(t)] = True
        similarity = similarity.masked_fill(itself | ~usable[:, None, :], float("-inf"))
        similarity = similarity.masked_fill(~split.targets[:, :, None], float("-inf"))
        k = min(self.neighbors, t + r - 1)
        chosen = torch.zeros_like(similarity, dtype=torch.bool)
        if k > 0:
            top = torch.topk(similarity, k, dim=-1)
            chosen.scatter_(-1, top.indices, torch.isfinite(top.values))
        weight = gather_tokens(attention, pool).to(state.hidden.dtype)  # (B, T + r)
        received = chosen * weight[:, None, :]
        shares = received[:, :, t:].transpose(1, 2)  # (B, r, T): discarded o -> target j
        preserved_shares = received[:, :, :t]  # (B, T, T): target j takes in target o
        fused = torch.gather(attention, 1, split.discarded).to(state.hidden.dtype)
        return Correlation(shares=shares, preserved_shares=preserved_shares, fused=fused)


@hookimpl
def fico_correlators():
    return [KeyNeighbours]
