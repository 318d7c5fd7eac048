"""PruMerge's adaptive selection: the attention outliers by Tukey's fence."""

from __future__ import annotations

import torch

from ..errors import InputError
from ..hookspecs import hookimpl
from ..selection import iqr_outlier_count, mask_scores, split_keeping
from ..signals import check_signal_name
from ..stages import Filter, Split
from ..state import TokenState


class IQROutliers(Filter):
    r"""PruMerge's selection (Shang et al., ICCV 2025): keep the candidates whose attention is
    an outlier, as many as lie above Tukey's upper fence, chosen per image.

    With :math:`a_j` the attention candidate j receives in ``signal`` (PruMerge: the [CLS] row
    of the layer after the feature layer, one full-width head) and its quartiles
    :math:`Q_1, Q_3` over the image's N candidates:

    .. math::  m = \#\{ j : a_j > Q_3 + 1.5\,(Q_3 - Q_1) \}, \qquad
               n = \lfloor N \cdot (m / N) \rfloor, \qquad T = \operatorname{top}_n(a)

    (the floor of the official float product). ``supplements: true`` is PruMerge+: add the
    patches ``0, s, 2s, ...`` below :math:`N - 1` with :math:`s = \lfloor \lfloor N / m \rfloor / 3 \rfloor`
    that are not yet kept, a spatially uniform complement. The kept tokens are emitted as the
    official code orders them (``Split.order``): the outliers by descending attention, then the
    supplements in ascending order. The official code takes the quartiles over the whole
    batch; fico takes them per image, so an image keeps the same tokens in any batch. With no
    outlier the official stride :math:`N / 0` fails; fico takes its limit :math:`s = \infty`
    (the supplement is patch 0 alone).
    """

    name = "iqr_outliers"
    cite = ("shang2025prumerge",)
    adaptive = True

    def __init__(self, signal: str = "next_cls_attention_fullwidth", supplements: bool = False):
        check_signal_name(signal)
        self.signal, self.supplements = signal, supplements

    def required_signals(self) -> set[str]:
        return {self.signal}

    def _choose(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates' token indices in emit order, for one image: outliers, then supplements."""
        candidates = state.candidate[0].nonzero()[:, 0]
        values = state.signals[self.signal][0, candidates]
        total = candidates.numel()
        ratio = iqr_outlier_count(values) / total
        count = int(total * ratio)
        top = torch.topk(values, count).indices
        chosen = candidates[top]
        if self.supplements:
            # no outlier: the official 1 / ratio fails; its limit (an infinite stride) leaves patch 0.
            # (The stride is >= 1 otherwise: Tukey's fence leaves at most a quarter above it.)
            stride = int(int(1 / ratio) / 3) if ratio else total
            patches = state.patch[0, candidates]
            taken = set(top.tolist())
            extra = [j for j in range(0, total - 1, stride) if j not in taken]
            # patch j of the uniform range is the candidate on grid cell j
            cell_to_index = {int(c): i for i, c in enumerate(patches.tolist())}
            extra_index = torch.tensor([cell_to_index[j] for j in extra if j in cell_to_index], dtype=torch.long,
                                       device=candidates.device)
            chosen = torch.cat([chosen, candidates[extra_index]])
        return chosen, candidates

    def adaptive_keep(self, state: TokenState) -> int:
        return int(self._choose(state)[0].numel())

    def split(self, state: TokenState, r: int) -> Split:
        if state.num_tokens and state.candidate.shape[0] != 1:
            raise InputError("fico: iqr_outliers chooses per image; the site runs it one image at a time")
        chosen, _ = self._choose(state)
        keep = (~state.candidate[0]).clone()
        keep[chosen] = True
        rank = torch.full((state.num_tokens,), state.num_tokens, dtype=torch.long, device=keep.device)
        rank[chosen] = torch.arange(chosen.numel(), device=keep.device)
        # protected tokens first (rank -1), then the chosen ones in emit order
        rank = torch.where(~state.candidate[0], -1, rank)
        split = split_keeping(keep[None], mask_scores(-state.signals[self.signal], state.candidate & ~keep[None]),
                              targets=state.candidate & keep[None])
        split.order = torch.gather(rank[None], 1, split.preserved)
        return split


@hookimpl
def fico_filters():
    return [IQROutliers]
