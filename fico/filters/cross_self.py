"""FitPrune's selection: visual tokens that neither the text nor the image attends to, and the
rule its schedule is fitted with."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError, RecipeError
from ..hookspecs import hookimpl
from ..selection import mask_scores, split_by_scores
from ..stages import Filter, Split
from ..state import TokenState


class CrossSelfAttention(Filter):
    r"""FitPrune (Ye et al., AAAI 2025): discard the visual tokens with the least cross x self attention.

    With :math:`A` the layer's attention maximised over heads, the N visual tokens V present
    and the tokens after them Q (the question and the answer prompt):

    .. math::  \mathrm{self}_j = \frac{1}{N} \sum_{q \in V} A_{qj}, \qquad
               \mathrm{cross}_j = \sum_{q \in Q} A_{qj}, \qquad
               s_j = -\,\mathrm{cross}_j \cdot \mathrm{self}_j, \qquad S = \operatorname{top}_r(s)

    The official code runs it inside the decoder layer, after attention and before the MLP
    (fico's ``llm_mid`` site), with a fitted per-layer count table (``recipes/fitprune.yaml``).
    Only the rows of V and Q are formed, from the layer's own q/k.
    """

    name = "cross_self_attention"
    cite = ("ye2025fitprune",)
    requires = ("attention_rows",)

    def split(self, state: TokenState, r: int) -> Split:
        cross_attention, self_attention, _ = cross_and_self(state)
        scores = mask_scores(-(cross_attention * self_attention), state.candidate)
        return split_by_scores(scores, r, targets=state.candidate)


def cross_and_self(state: TokenState) -> tuple[Tensor, Tensor, Tensor]:
    """``(cross, self, queries)``: per token, the head-max attention it receives from the text
    after the image (summed over those rows), from the visual tokens (averaged over the N
    present), and ``(B,)`` how many text rows there are."""
    visual = state.candidate
    after = state.text_after_image()
    queries = visual | after
    count = queries.sum(1)
    longest = int(count.max())
    rows = torch.sort((~queries).to(torch.uint8), dim=1, stable=True).indices[:, :longest]
    valid = torch.arange(longest, device=rows.device) < count[:, None]
    probs = state.signals["attention_rows"](rows, "max")  # (B, R, N)
    row_visual = torch.gather(visual, 1, rows) & valid
    row_after = torch.gather(after, 1, rows) & valid
    n_visual = visual.sum(1, keepdim=True).clamp_min(1).to(probs.dtype)
    self_attention = (probs * row_visual[:, :, None]).sum(1) / n_visual
    cross_attention = (probs * row_after[:, :, None]).sum(1)
    return cross_attention, self_attention, after.sum(1)


class RetainedAttentionMass(Filter):
    r"""FitPrune's fitting rule (Ye et al., AAAI 2025; the official ``statistical_analysis.py``):
    discard the visual tokens whose loss keeps a share of the attention mass the unreduced
    model had at this layer, in both directions.

    With :math:`\mathrm{cross}_j` the head-max attention token j receives from the text after
    the image, averaged over those rows, :math:`\mathrm{self}_j` that from the N visual tokens
    present, averaged over them (as :class:`CrossSelfAttention` reads them), and
    :math:`W^c_l, W^s_l` the totals :math:`\sum_j` of both in the **unreduced** model's layer
    l (``cross_mass[l]``, ``self_mass[l]``, measured per sample by the fitting):

    .. math::  k_c = \max(0,\ \#\{k < N : \sum_j \mathrm{cross}_j - \sum_{i \le k}
               \mathrm{cross}_{(i)} \ge (1 - \alpha) W^c_l\} - 1)

    with :math:`\mathrm{cross}_{(i)}` in ascending order, likewise :math:`k_s`; the discarded
    set is the intersection of the :math:`k_c` lowest-cross and the :math:`k_s` lowest-self
    tokens. The official loop leaves a stale count when every k keeps the mass (it never
    breaks); fico takes :math:`N - 1`, the loop's last k. Runs with ``keep: adaptive`` at the
    ``llm_mid`` site, one count per sample; :mod:`fico.fitting.fitprune` fits the schedule
    with it.
    """

    name = "retained_attention_mass"
    cite = ("ye2025fitprune",)
    requires = ("attention_rows",)
    adaptive = True

    def __init__(self, alpha: float, cross_mass: list[float], self_mass: list[float]):
        if not 0 <= alpha <= 1:
            raise RecipeError(f"alpha must be in [0, 1], got {alpha!r}")
        if len(cross_mass) != len(self_mass):
            raise RecipeError(f"cross_mass and self_mass need one value per layer each, got {len(cross_mass)} and "
                              f"{len(self_mass)}")
        self.alpha, self.cross_mass, self.self_mass = float(alpha), list(cross_mass), list(self_mass)

    def _discarded(self, state: TokenState) -> Tensor:
        """``(B, N)`` bool: the tokens the rule discards in each sample."""
        if state.layer >= len(self.cross_mass):
            raise RecipeError(f"{self.name}: no reference mass for layer {state.layer} (cross_mass has "
                              f"{len(self.cross_mass)} layers)")
        cross_attention, self_attention, queries = cross_and_self(state)
        cross_attention = cross_attention / queries.clamp_min(1)[:, None].to(cross_attention.dtype)
        low = []
        for score, mass in ((cross_attention, self.cross_mass[state.layer]), (self_attention, self.self_mass[state.layer])):
            low.append(_lowest_within_mass(score, state.candidate, (1 - self.alpha) * mass))
        return low[0] & low[1]

    def adaptive_keep(self, state: TokenState) -> int:
        return int(state.candidate.sum()) - int(self._discarded(state).sum())

    def split(self, state: TokenState, r: int) -> Split:
        discarded = self._discarded(state)
        if bool((discarded.sum(1) != r).any()):
            raise InputError(f"fico: {self.name} discards {discarded.sum(1).tolist()} tokens; the step asked for {r}")
        return split_by_scores(mask_scores(discarded.to(state.hidden.dtype), state.candidate), r,
                               targets=state.candidate)


def _lowest_within_mass(score: Tensor, candidate: Tensor, floor: float) -> Tensor:
    """``(B, N)`` bool: the k lowest-scored candidates, k as large as keeps the candidates'
    total at least ``floor`` (the largest k below N; 0 when even k = 0 falls short)."""
    ordered = torch.sort(score.masked_fill(~candidate, float("inf")), dim=1, stable=True)
    n = candidate.sum(1, keepdim=True)
    values = ordered.values.masked_fill(torch.arange(score.shape[1], device=score.device) >= n, 0.0)
    total = values.sum(1, keepdim=True)
    # remaining after removing the k lowest, for k = 0 .. N-1
    remaining = total - torch.cat([values.new_zeros(values.shape[0], 1), values.cumsum(1)[:, :-1]], dim=1)
    kept = (remaining >= floor) & (torch.arange(score.shape[1], device=score.device) < n)
    k = (kept.long().cumprod(1).sum(1, keepdim=True) - 1).clamp_min(0)
    rank = torch.empty_like(ordered.indices).scatter_(1, ordered.indices, torch.arange(
        score.shape[1], device=score.device).expand_as(ordered.indices))
    return (rank < k) & candidate


@hookimpl
def fico_filters():
    return [CrossSelfAttention, RetainedAttentionMass]
