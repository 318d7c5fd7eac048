"""DART's selection: pivot tokens by key norm, then the tokens least like each pivot."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..selection import mask_scores, split_keeping
from ..stages import Filter, Split
from ..state import TokenState

BUDGET_MODES = ("official", "exact")


class PivotDuplicates(Filter):
    r"""DART (Wen et al., EMNLP 2025): keep pivots and the tokens least duplicated by them.

    Pivots are the ``image_pivots`` visual tokens and the ``text_pivots`` text tokens (after
    the image) with the largest L1 norm of the previous layer's post-RoPE keys
    (``key_norms``). Then, for each pivot p in turn, with :math:`h` the hidden states through
    the language model's final norm (``final_normed_hidden``), the k still-unchosen visual
    tokens least similar to it join the kept set:

    .. math::  \mathrm{new}_p = \operatorname{bottom}_k \Big\{ \frac{h_p \cdot h_j}{\lVert h_p\rVert \lVert h_j\rVert} : j \in V \setminus P \Big\},
               \qquad k = \Big\lfloor \frac{K}{p_{img} + p_{txt}} \Big\rfloor

    with K the schedule's ``keep`` (DART's ``max_num_trunction``). The visual pivots and the
    chosen tokens are kept (``p_img + (p_img + p_txt) k`` of them: 132 for K = 128, as the
    official code keeps); text pivots only serve as queries. ``budget_mode: exact`` makes the
    count K: the ``K - p_img`` tokens are split over the pivots in iteration order, the first
    ``(K - p_img) mod (p_img + p_txt)`` taking one more.

    The pivots are visited in the order the official code visits them, a Python ``set`` of
    their sequence indices (without padding), and the result depends on that order.
    """

    name = "pivot_duplicates"
    cite = ("wen2025dart",)
    requires = ("key_norms", "final_normed_hidden")

    def __init__(self, image_pivots: int = 4, text_pivots: int = 4, budget_mode: str = "official"):
        if image_pivots < 1 or text_pivots < 0:
            raise RecipeError(f"image_pivots must be >= 1 and text_pivots >= 0, got {image_pivots}, {text_pivots}")
        if budget_mode not in BUDGET_MODES:
            raise RecipeError(f"budget_mode must be one of {', '.join(BUDGET_MODES)}, got {budget_mode!r}")
        self.image_pivots, self.text_pivots, self.budget_mode = image_pivots, text_pivots, budget_mode

    @property
    def pivots(self) -> int:
        return self.image_pivots + self.text_pivots

    def kept(self, budget: int) -> int:
        """Visual tokens kept for a budget K."""
        if budget < self.pivots:
            raise RecipeError(f"image_pivots + text_pivots = {self.pivots} is above keep={budget}: each pivot must "
                              f"bring at least one token")
        if self.budget_mode == "exact":
            return budget
        return self.image_pivots + self.pivots * (budget // self.pivots)

    def discard(self, requested: int, num_tokens: int, num_candidates: int) -> int:
        if requested <= 0:  # a budget of at least every token present keeps them all
            return 0
        kept = self.kept(num_candidates - requested)
        if kept > num_candidates:
            raise RecipeError(f"keeps {kept} tokens ({self.image_pivots} pivots + {self.pivots} x "
                              f"{(num_candidates - requested) // self.pivots}), more than the {num_candidates} present")
        return num_candidates - kept

    def _shares(self, kept: int) -> list[int]:
        """Tokens each pivot adds, in visiting order, for ``kept`` visual tokens in all."""
        if self.budget_mode == "official":
            return [(kept - self.image_pivots) // self.pivots] * self.pivots
        base, more = divmod(kept - self.image_pivots, self.pivots)
        return [base + (1 if i < more else 0) for i in range(self.pivots)]

    def split(self, state: TokenState, r: int) -> Split:
        b, n = state.candidate.shape
        visual, text = state.candidate, state.text_after_image()
        norms = state.signals["key_norms"]
        hidden = state.signals["final_normed_hidden"]
        unit = F.normalize(hidden.float() if hidden.dtype in (torch.float16, torch.bfloat16) else hidden, dim=-1)
        shares = self._shares(int(visual[0].sum()) - r)
        # each token's index in its sequence without padding: what the official code (batch 1) sees
        pad = (~state.text & ~state.visual).long()
        index = state.positions - (pad.cumsum(1) - pad)
        keep = ~visual
        for row in range(b):
            image_pivots = torch.topk(norms[row].masked_fill(~visual[row], float("-inf")), self.image_pivots).indices
            text_pivots = torch.topk(norms[row].masked_fill(~text[row], float("-inf")),
                                     min(self.text_pivots, int(text[row].sum()))).indices
            pivots = torch.cat([image_pivots, text_pivots]).tolist()
            token_of = {int(index[row, i]): i for i in pivots}
            visiting = [token_of[i] for i in set(int(index[row, i]) for i in pivots)]  # CPython's set order
            valid = visual[row].clone()
            valid[image_pivots] = False
            keep[row, image_pivots] = True
            for pivot, count in zip(visiting, shares):
                candidates = valid.nonzero()[:, 0]
                if count <= 0 or candidates.numel() == 0:
                    continue
                similarity = unit[row, candidates] @ unit[row, pivot]
                new = candidates[torch.topk(similarity, min(count, candidates.numel()), largest=False).indices]
                keep[row, new] = True
                valid[new] = False
        return split_keeping(keep, mask_scores(-norms, visual & ~keep), targets=visual & keep)


@hookimpl
def fico_filters():
    return [PivotDuplicates]
