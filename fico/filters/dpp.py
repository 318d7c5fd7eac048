"""Conditional-diversity filter: a determinantal point process over the candidates (CDPruner)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..selection import candidate_indices, greedy_dpp_map, split_keeping_chosen
from ..signals import check_signal_name
from ..stages import Filter, Split
from ..state import TokenState, gather_tokens

RELEVANCE = ("negative", "positive")


def min_max_relevance(similarity: Tensor, relevance: str = "negative") -> Tensor:
    r"""CDPruner's relevance of each token to the instruction, per row of ``similarity`` ``(B, N)``:

    .. math::  r_i = \frac{\pm\,\bar s_i - \min_k (\pm\,\bar s_k) + 10^{-6}}{\max_k (\pm\,\bar s_k) - \min_k (\pm\,\bar s_k)}

    with the sign ``-`` for ``negative`` (the official code) and ``+`` for ``positive``.
    """
    score = -similarity if relevance == "negative" else similarity
    low, high = score.min(-1, keepdim=True).values, score.max(-1, keepdim=True).values
    return (score - low + 1e-6) / (high - low)


class ConditionalDPP(Filter):
    r"""CDPruner's selection (Zhang et al., NeurIPS 2025): keep the ``n - r`` candidates chosen by
    greedy MAP inference of a determinantal point process whose kernel weighs the tokens'
    similarity by their relevance to the instruction.

    .. math::  S_{ij} = \frac{x_i \cdot x_j}{\lVert x_i\rVert \lVert x_j\rVert}, \qquad
               L = \mathrm{diag}(r)\, S\, \mathrm{diag}(r), \qquad
               P = \arg\max_{|P| = n - r} \mathrm{det}(L_P) \text{ (greedily)}

    :math:`x` are the hidden states (the projector's outputs at fico's ``pre_llm`` site) and
    :math:`r` the min-max-normalised relevance of :func:`min_max_relevance` from ``signal``
    (``instruction_similarity``: each token's mean CLIP similarity to the instruction's
    77-token segments). ``relevance: negative`` follows the official code, which rates a
    token by its *negative* similarity (the maintainers call this intentional, an observed
    CLIP phenomenon, CDPruner issues #14/#19); ``positive`` is the paper's "relevant to the
    instruction" reading. The kernel is formed in float32 (float64 for a float64 model), as
    the official code does; kept tokens keep their original order. The official code
    normalises the relevance over the whole batch, which it runs one sample at a time; fico
    normalises per sample, so a batch equals its samples run alone.
    """

    name = "conditional_dpp"
    cite = ("zhang2025cdpruner", "chen2018fastmap")

    def __init__(self, signal: str = "instruction_similarity", relevance: str = "negative"):
        check_signal_name(signal)
        if relevance not in RELEVANCE:
            raise RecipeError(f"relevance must be {' or '.join(RELEVANCE)}, got {relevance!r}")
        self.signal, self.relevance = signal, relevance

    def required_signals(self) -> set[str]:
        return {self.signal}

    def split(self, state: TokenState, r: int) -> Split:
        candidates = candidate_indices(state.candidate)
        keep_count = candidates.shape[1] - r
        dtype = torch.float64 if state.hidden.dtype == torch.float64 else torch.float32
        unit = F.normalize(gather_tokens(state.hidden, candidates), dim=-1).to(dtype)
        similarity = unit @ unit.transpose(1, 2)
        relevance = min_max_relevance(torch.gather(state.signals[self.signal].to(dtype), 1, candidates),
                                      self.relevance)
        kernel = relevance[:, :, None] * similarity * relevance[:, None, :]
        chosen = greedy_dpp_map(kernel, keep_count) if keep_count > 0 else None
        return split_keeping_chosen(state.candidate, candidates, chosen, state.hidden.dtype)


@hookimpl
def fico_filters():
    return [ConditionalDPP]
