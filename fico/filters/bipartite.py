"""ToMe's bipartite soft matching as a filter."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..hookspecs import hookimpl
from ..selection import split_by_scores
from ..stages import Filter, Split
from ..state import TokenState

#: Per-token extra holding each token's index in ToMe's own token layout.
TOME_ORDER = "tome_order"


class BipartiteMatching(Filter):
    r"""ToMe's bipartite soft matching (Bolya et al., ICLR 2023, "Token Merging: Your ViT But Faster").

    With head-mean keys :math:`k` and ToMe's alternating split of the tokens into
    :math:`\mathbb{A}` (even) and :math:`\mathbb{B}` (odd):

    .. math::  s_i = \max_{j \in \mathbb{B}} \frac{k_i \cdot k_j}{\lVert k_i\rVert \lVert k_j\rVert}
               \quad (i \in \mathbb{A}), \qquad s_j = -\infty \quad (j \in \mathbb{B})

    .. math::  S = \operatorname{top}_r(s)

    S is the ``r`` A-tokens with the highest :math:`s`; protected tokens ([CLS]) are never in
    S and only B-side candidates may receive information.

    ``r`` is clipped to half the candidates, as in the original. The alternation follows the
    token layout the original produces ([unmerged A tokens, then B tokens]), which fico keeps
    per token in the ``tome_order`` extra while the tokens themselves stay in their original
    relative order; so every layer's split, and the merged set, equal the original's.
    """

    name = "bipartite_matching"
    cite = ("bolya2023tome",)
    requires = ("keys",)

    def max_discard(self, num_tokens: int, num_candidates: int) -> int:
        return num_candidates // 2

    def split(self, state: TokenState, r: int) -> Split:
        keys = F.normalize(state.signals["keys"], dim=-1)
        b, n = state.candidate.shape
        rank = state.extras.get(TOME_ORDER)
        if rank is None:
            rank = torch.arange(n, device=keys.device).expand(b, n)
        # Tokens listed in ToMe's layout; A = even slots, B = odd slots.
        by_rank = torch.sort(rank, dim=1, stable=True).indices
        a_idx, b_idx = by_rank[:, 0::2], by_rank[:, 1::2]
        ordered = torch.gather(keys, 1, by_rank[..., None].expand(-1, -1, keys.shape[-1]))
        similarity = ordered[:, 0::2] @ ordered[:, 1::2].transpose(1, 2)
        a_cand = torch.gather(state.candidate, 1, a_idx)
        b_cand = torch.gather(state.candidate, 1, b_idx)
        if not bool(b_cand.all()):  # a protected token on the B side may not receive
            similarity.masked_fill_(~b_cand[:, None, :], float("-inf"))
        best = similarity.max(dim=-1).values.masked_fill_(~a_cand, float("-inf"))

        scores = keys.new_full((b, n), float("-inf")).scatter(1, a_idx, best)
        on_b_side = torch.zeros(b, n, dtype=torch.bool, device=keys.device).scatter(1, b_idx, True)
        split = split_by_scores(scores, r, targets=on_b_side & state.candidate)

        # The original's next layout: unmerged A tokens in ascending A order, then all B tokens.
        kept_rank = torch.gather(torch.argsort(by_rank, dim=1), 1, split.preserved)
        kept_b = torch.gather(on_b_side, 1, split.preserved)
        layout_key = kept_b.to(kept_rank.dtype) * n + kept_rank
        split.extras[TOME_ORDER] = torch.argsort(torch.argsort(layout_key, dim=1), dim=1)
        return split


@hookimpl
def fico_filters():
    return [BipartiteMatching]
