"""SparseVLM's selection: visual tokens rated by the text tokens that matter to the image."""

from __future__ import annotations

import torch

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..selection import mask_scores, split_by_scores
from ..stages import Filter, Split
from ..state import TokenState, gather_tokens

#: per-token extra marking SparseVLM's rater tokens (chosen once per prefill, then carried)
RATERS = "sparsevlm_rater"
VERSIONS = ("1.5", "2.0")


def choose_raters(embeddings: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    r"""SparseVLM's raters: text tokens whose softmax relevance to the image beats the mean.

    .. math::  r_j = \frac{1}{N_v} \sum_{v} \operatorname{softmax}_j\!\big(E_v \cdot E_j\big), \qquad
               R = \{ j : r_j > \bar r \}

    over the language model's input embeddings E of the visual tokens v and the text tokens j
    after the image (raw dot products). Returns ``(B, N)`` bool.
    """
    b, n, _ = embeddings.shape
    out = torch.zeros(b, n, dtype=torch.bool, device=embeddings.device)
    for row in range(b):
        v = embeddings[row, visual[row]]
        t_index = text[row].nonzero()[:, 0]
        if t_index.numel() == 0:
            continue
        relevance = torch.softmax(v @ embeddings[row, t_index].T, dim=-1).mean(0)
        out[row, t_index[relevance > relevance.mean()]] = True
    return out


class TextRaters(Filter):
    r"""SparseVLM (Zhang et al., ICML 2025): discard the visual tokens its raters attend to least.

    Raters are chosen once per prefill from the input embeddings (:func:`choose_raters`) and
    travel with the tokens. At each step, with :math:`\bar P` the previous layer's softmax
    attention averaged over heads (``version: "1.5"``) and the R rater rows:

    .. math::  \rho_j = \frac{1}{|R|} \sum_{k \in R} \bar P_{kj}, \qquad s_j = -\rho_j, \qquad
               S = \operatorname{top}_r(s)

    ``version: "2.0"`` (SparseVLM+) first divides each head's attention by the RoPE-only
    logits of all-ones queries and keys (``gravity``, :math:`G_{mn} = \frac{2}{\sqrt{d}} \sum_i
    \cos((m - n)\theta_i)`, literally, without an epsilon) and averages only the ``heads``
    heads with the most rater-to-visual mass. A step keeps at most all but one visual token.
    """

    name = "text_raters"
    cite = ("zhang2025sparsevlm",)
    requires = ("attention_rows", "input_embeddings")

    def __init__(self, version: str | float = "1.5", heads: int = 14):
        if str(version) not in VERSIONS:
            raise RecipeError(f"version must be one of {', '.join(VERSIONS)}, got {version!r}")
        if heads < 1:
            raise RecipeError(f"heads must be >= 1, got {heads}")
        self.version, self.heads = str(version), heads

    def required_signals(self) -> set[str]:
        return set(self.requires) | ({"rope_gravity"} if self.version == "2.0" else set())

    def discard(self, requested: int, num_tokens: int, num_candidates: int) -> int:
        return max(super().discard(requested, num_tokens, num_candidates), 1 if num_candidates > 1 else 0)

    def raters(self, state: TokenState) -> torch.Tensor:
        """``(B, N)`` rater flags: carried from the prefill's first step, or chosen now."""
        raters = state.extras.get(RATERS)
        if raters is None:
            raters = choose_raters(state.signals["input_embeddings"], state.candidate,
                                   state.text_after_image()).long()
        return raters

    def relevance(self, state: TokenState) -> torch.Tensor:
        """``(B, N)`` mean rater attention each token receives."""
        raters = self.raters(state) > 0
        count = raters.sum(1)
        longest = max(int(count.max()), 1)
        rows = torch.sort((~raters).to(torch.uint8), dim=1, stable=True).indices[:, :longest]
        valid = (torch.arange(longest, device=rows.device) < count[:, None]).to(state.hidden.dtype)
        if self.version == "1.5":
            probs = state.signals["attention_rows"](rows, "mean")  # (B, R, N)
        else:
            probs = state.signals["attention_rows"](rows, "all")  # (B, H, R, N)
            probs = probs / state.signals["rope_gravity"](rows)[:, None]
            mass = (probs * valid[:, None, :, None] * state.candidate[:, None, None, :]).sum((2, 3))
            top = torch.topk(mass, min(self.heads, probs.shape[1]), dim=1).indices
            probs = torch.gather(probs, 1, top[:, :, None, None].expand(-1, -1, *probs.shape[2:])).mean(1)
        return (probs * valid[:, :, None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)

    def split(self, state: TokenState, r: int) -> Split:
        relevance = self.relevance(state)
        split = split_by_scores(mask_scores(-relevance, state.candidate), r, targets=state.candidate)
        split.extras[RATERS] = gather_tokens(self.raters(state), split.preserved)
        return split


@hookimpl
def fico_filters():
    return [TextRaters]
