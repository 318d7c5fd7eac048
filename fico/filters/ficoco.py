"""FiCoCo's filters: vision-aware redundancy with semantic- (V) or task-aware (L) redundancy."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..errors import RecipeError
from ..hookspecs import hookimpl
from ..selection import mask_scores, split_by_scores
from ..stages import Filter, Split
from ..state import TokenState
from .local_penalty import local_penalty, penalise_windows

VISION_AWARE = ("received", "given")
SCORES = ("softmax", "logits")


def _check_common(weight_name: str, weight: float, c: float, window: int, vision_aware: str, scores: str) -> None:
    if not 0 <= weight <= 1:
        raise RecipeError(f"{weight_name} must be in [0, 1], got {weight}")
    if c <= 0:
        raise RecipeError(f"c must be > 0, got {c}")
    if window < 1:
        raise RecipeError(f"window must be >= 1, got {window}")
    if vision_aware not in VISION_AWARE:
        raise RecipeError(f"vision_aware must be one of {', '.join(VISION_AWARE)}, got {vision_aware!r}")
    if scores not in SCORES:
        raise RecipeError(f"scores must be one of {', '.join(SCORES)}, got {scores!r}")


def mean_over(matrix: Tensor, members: Tensor, axis: str) -> Tensor:
    """Mean of ``matrix`` (B, N, N) over the rows (``axis="rows"``: what each column
    receives) or columns (``"columns"``: what each row gives) flagged in ``members`` (B, N)."""
    weights = members.to(matrix.dtype)
    count = weights.sum(1, keepdim=True).clamp_min(1)
    if axis == "rows":
        return (weights[:, :, None] * matrix).sum(1) / count
    return (matrix * weights[:, None, :]).sum(2) / count


def vision_aware_redundancy(attention: Tensor, visual: Tensor, reading: str) -> Tensor:
    r"""``received``: :math:`VR_i = \frac1N \sum_{q \in V} A_{qi}` (attention each token receives
    from the N visual tokens; the paper's prose, "attention-in"); ``given``:
    :math:`\frac1N \sum_{j \in V} A_{ij}` (the paper's index order, a row mean)."""
    return mean_over(attention, visual, "rows" if reading == "received" else "columns")


class _RedundancyFilter(Filter):
    """What FiCoCo's two filters share: the readings, the signal they need and the split
    (highest penalised score; the local penalty wherever tokens know their grid cells)."""

    def _configure(self, c: float, window: int, vision_aware: str, scores: str) -> None:
        self.c, self.window, self.vision_aware, self.scores = c, window, vision_aware, scores

    def required_signals(self) -> set[str]:
        return {"attention_logits"} if self.scores == "logits" else {"attention"}

    def redundancy(self, state: TokenState) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def split(self, state: TokenState, r: int) -> Split:
        scores = mask_scores(self.redundancy(state), state.candidate)
        if state.layout is not None and state.grids is not None:
            scores = penalise_windows(scores, state.layout, state.grids, self.window, self.c)
        elif state.patch is not None and state.grid is not None:
            scores = local_penalty(scores, state.patch, state.grid, self.window, self.c)
        return split_by_scores(scores, r, targets=state.candidate)


class FiCoCoV(_RedundancyFilter):
    r"""FiCoCo-V filter (Han et al., "Filter, Correlate, Compress", AAAI 2026, arXiv 2411.17686, Eq. 1).

    With the layer's head-mean softmax attention :math:`A` over [CLS] and the N patches V:

    .. math::  s_i = \lambda\, \frac{1}{N}\sum_{q \in V} A_{qi} \;-\; (1-\lambda)\, A_{\mathrm{cls},i}

    (vision-aware redundancy minus semantic-aware redundancy; higher = more redundant),
    then the local penalty (:func:`fico.filters.local_penalty.penalise_windows`): in each
    non-overlapping w x w window W of the patch grid, the highest score is raised,

    .. math::  \tilde s_i = \begin{cases} c\, s_i & i = i^*_W,\ s_i > 0 \\ s_i / c & i = i^*_W,\ s_i \le 0 \\
               s_i & \text{otherwise} \end{cases} \qquad i^*_W = \arg\max_{i \in W} s_i

    .. math::  S = \operatorname{top}_r(\tilde s)

    S is the r patches with the highest penalised score (ties: lower original position);
    ``c = 1`` switches the penalty off. [CLS] is never discarded and never a target.

    Second readings, off by default:

    * ``vision_aware: given``: :math:`\frac1N \sum_{j \in V} A_{ij}` (the equation's index
      order) instead of the attention received (the paper's prose, App. 10.3 "attention-in");
    * ``scores: logits``: the official code's scoring: head-mean *pre-softmax* logits
      :math:`L`, :math:`VR_i = \frac1N\sum_{j\in V} L_{ij}` and :math:`L_{\mathrm{cls},i}`,
      each L2-normalised over the patches. The code also swaps the weights (its effective
      :math:`\lambda` is 0.65): set ``lambda: 0.65`` to reproduce it.
    """

    name = "ficoco_v"
    cite = ("han2026ficoco",)

    def __init__(self, lambda_: float = 0.35, c: float = 2.0, window: int = 2, vision_aware: str = "received",
                 scores: str = "softmax"):
        _check_common("lambda", lambda_, c, window, vision_aware, scores)
        self.lambda_ = lambda_
        self._configure(c, window, vision_aware, scores)

    def redundancy(self, state: TokenState) -> Tensor:
        patches = state.candidate
        if self.scores == "logits":
            logits = state.signals["attention_logits"]
            vision = F.normalize(mask_scores(mean_over(logits, patches, "columns"), patches).nan_to_num(0, 0, 0), dim=-1)
            semantic = F.normalize(mask_scores(logits[:, 0], patches).nan_to_num(0, 0, 0), dim=-1)
        else:
            attention = state.signals["attention"]
            vision = vision_aware_redundancy(attention, patches, self.vision_aware)
            semantic = attention[:, 0]  # the [CLS] query's row
        return self.lambda_ * vision - (1 - self.lambda_) * semantic


class FiCoCoL(_RedundancyFilter):
    r"""FiCoCo-L filter (Han et al., AAAI 2026, arXiv 2411.17686, Eq. 3, causal reading).

    With the previous decoder layer's head-mean softmax attention :math:`A`, the N visual
    tokens V and the M text tokens Q after the first visual token (those that can attend
    to the image):

    .. math::  s_i = \beta\, \frac{1}{N}\sum_{q \in V} A_{qi} \;-\; (1-\beta)\, \frac{1}{M}\sum_{k \in Q} A_{ki}

    (vision-aware minus task-aware redundancy: text-to-visual attention, since a visual
    query cannot attend to later text in a causal LLM), then the local penalty of the
    ``ficoco_v`` filter on the image's patch grid (the highest score of each w x w window
    W raised), which is the identity at the default ``c = 1`` (``c > 1`` is the paper's
    "w/ local penalty" ablation):

    .. math::  \tilde s_i = \begin{cases} c\, s_i & i = i^*_W,\ s_i > 0 \\ s_i / c & i = i^*_W,\ s_i \le 0 \\
               s_i & \text{otherwise} \end{cases} \qquad i^*_W = \arg\max_{i \in W} s_i

    .. math::  S = \operatorname{top}_r(\tilde s)

    S is the r visual tokens with the highest score (ties: lower original position). Text
    tokens are never candidates.

    Second readings, off by default: ``vision_aware: given`` (row mean over visual keys);
    ``scores: logits``: the official code's unmasked pre-softmax logits :math:`L`, with
    :math:`\frac1N\sum_{j\in V} L_{ij}` and the visual-query-to-text-key term
    :math:`\frac1M\sum_{k\in Q} L_{ik}`.
    """

    name = "ficoco_l"
    cite = ("han2026ficoco",)

    def __init__(self, beta: float = 0.6, c: float = 1.0, window: int = 2, vision_aware: str = "received",
                 scores: str = "softmax"):
        _check_common("beta", beta, c, window, vision_aware, scores)
        self.beta = beta
        self._configure(c, window, vision_aware, scores)

    def redundancy(self, state: TokenState) -> Tensor:
        visual, text = state.candidate, state.text_after_image()
        if self.scores == "logits":
            logits = state.signals["attention_logits"]
            vision = mean_over(logits, visual, "columns")
            task = mean_over(logits, text, "columns")
        else:
            attention = state.signals["attention"]
            vision = vision_aware_redundancy(attention, visual, self.vision_aware)
            task = mean_over(attention, text, "rows")
        return self.beta * vision - (1 - self.beta) * task


@hookimpl
def fico_filters():
    return [FiCoCoV, FiCoCoL]
