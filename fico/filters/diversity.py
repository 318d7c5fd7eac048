"""Diversity filters: keep tokens unlike each other (DivPrune, VisPruner's diverse part)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..selection import candidate_indices, greedy_max_min, mask_scores, split_keeping, split_keeping_chosen
from ..signals import check_signal_name
from ..stages import Filter, Split
from ..state import TokenState, gather_tokens


def cosine_distance(x: Tensor) -> Tensor:
    """``(B, N, N)`` one minus the cosine similarity of the rows of ``x`` ``(B, N, D)``."""
    unit = F.normalize(x, dim=-1)
    return 1 - unit @ unit.transpose(1, 2)


class MaxMinDiversity(Filter):
    r"""DivPrune's selection (Alvar et al., CVPR 2025): keep the ``n - r`` candidates that are
    farthest from each other, by greedy max-min on cosine distance of their hidden states.

    .. math::  D_{ij} = 1 - \frac{x_i \cdot x_j}{\lVert x_i\rVert \lVert x_j\rVert}, \qquad
               s_0 = \arg\max_j \min_{i \ne j} D_{ij}, \qquad
               s_{t+1} = \arg\max_{j \notin P} \min_{i \in P} D_{ij}

    The first token is the most isolated one (largest distance to its nearest neighbour: the
    second-smallest entry of its column, the smallest being its own zero), then each next one
    the farthest from those already kept; the first index wins ties. Kept tokens keep their
    original order. The official code runs on the projector's outputs (fico's ``pre_llm``
    site) of one sample; fico selects per sample.
    """

    name = "max_min_diversity"
    cite = ("alvar2025divprune",)

    def split(self, state: TokenState, r: int) -> Split:
        candidates = candidate_indices(state.candidate)
        keep_count = candidates.shape[1] - r
        distance = cosine_distance(gather_tokens(state.hidden, candidates))
        chosen = None
        if keep_count > 0:
            # the second-smallest entry of each column, by topk rather than a sort of the whole
            # N x N matrix (the same value: at 2928 LLaVA-NeXT tokens the sort was most of the step)
            isolation = torch.topk(distance, 2, dim=1, largest=False).values[:, 1] if distance.shape[1] > 1 \
                else distance.new_zeros(distance.shape[0], 1)
            chosen = greedy_max_min(distance, isolation.argmax(1), keep_count)
        return split_keeping_chosen(state.candidate, candidates, chosen, state.hidden.dtype)


class BipartiteDuplicates(Filter):
    r"""VisPruner's selection (Zhang et al., ICCV 2025): important tokens by attention, then
    diverse ones by repeatedly dropping duplicates across a bipartite split.

    The ``int(important_ratio * T)`` candidates with the highest attention in ``signal`` are
    kept first (:math:`T = n - r`). The rest, in descending attention order, are reduced to
    the remaining :math:`T_d` by rounds: split them by parity of their current order into
    :math:`A` (even) and :math:`B` (odd), score

    .. math::  s_i = \max_{j \in B} \frac{x_i \cdot x_j}{\lVert x_i\rVert \lVert x_j\rVert} \quad (i \in A)

    on the hidden states, drop the ``min(round_size, |rest| - T_d)`` A-tokens with the highest
    :math:`s` (the most duplicated), and order the rest as [remaining A by descending s, B],
    until :math:`T_d` are left. Kept tokens keep their original order.
    """

    name = "bipartite_duplicates"
    cite = ("zhang2025vispruner",)

    def __init__(self, signal: str = "cls_attention", important_ratio: float = 0.5, round_size: int = 8):
        check_signal_name(signal)
        if not 0 <= important_ratio <= 1:
            raise RecipeError(f"important_ratio must be in [0, 1], got {important_ratio}")
        if round_size < 1:
            raise RecipeError(f"round_size must be >= 1, got {round_size}")
        self.signal, self.important_ratio, self.round_size = signal, important_ratio, round_size

    def required_signals(self) -> set[str]:
        return {self.signal}

    def split(self, state: TokenState, r: int) -> Split:
        b, n = state.candidate.shape
        total = int(state.candidate[0].sum()) - r
        important = int(total * self.important_ratio)
        diverse = total - important
        attention = mask_scores(state.signals[self.signal], state.candidate)
        order = torch.sort(attention, dim=1, descending=True, stable=True).indices
        rest = order[:, important: int(state.candidate[0].sum())]
        unit = F.normalize(state.hidden, dim=-1)
        while True:
            drop = min(self.round_size, rest.shape[1] - diverse)
            if drop <= 0:
                break
            a, bb = rest[:, 0::2], rest[:, 1::2]
            similarity = gather_tokens(unit, a) @ gather_tokens(unit, bb).transpose(1, 2)
            best = similarity.max(-1).values
            ranked = torch.sort(best, dim=1, descending=True, stable=True).indices
            rest = torch.cat([torch.gather(a, 1, ranked[:, drop:]), bb], 1)
        keep = (~state.candidate).scatter(1, order[:, :important], True).scatter(1, rest, True)
        scores = -attention
        return split_keeping(keep, mask_scores(scores, state.candidate & ~keep), targets=state.candidate & keep)


@hookimpl
def fico_filters():
    return [MaxMinDiversity, BipartiteDuplicates]
