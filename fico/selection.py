"""Small tensor functions shared by components: choosing S, T and targets."""

from __future__ import annotations

import torch
from torch import Tensor

from .stages import Split


def split_by_scores(scores: Tensor, r: int, targets: Tensor | None = None) -> Split:
    """S = the ``r`` highest ``scores`` per row, T = the rest, both ascending.

    Ties go to the lower index (a stable sort), and indices follow the current token
    order, which is the original relative order, so ties discard the lower original
    position first. Tokens scored ``-inf`` are never chosen as long as ``r`` does not
    exceed the number of finite scores.

    Args:
        scores: ``(B, N)`` redundancy scores, higher = more redundant.
        r: tokens to discard per row.
        targets: ``(B, N)`` bool, tokens that may receive information if preserved;
            defaults to the finite-scored tokens.
    """
    b, n = scores.shape
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    discard = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    discard.scatter_(1, order[:, :r], True)
    # Sorting the 0/1 discard flags stably lists T then S, each in ascending index order.
    layout = torch.sort(discard.to(torch.uint8), dim=1, stable=True).indices
    preserved, discarded = layout[:, : n - r], layout[:, n - r :]
    if targets is None:
        targets = torch.isfinite(scores)
    return Split(
        scores=scores,
        discarded=discarded,
        preserved=preserved,
        targets=torch.gather(targets, 1, preserved),
    )


def mask_scores(scores: Tensor, allowed: Tensor) -> Tensor:
    """``scores`` with ``-inf`` wherever ``allowed`` is False."""
    return scores.masked_fill(~allowed, float("-inf"))


def top_k_shares(matrix: Tensor, k: int) -> Tensor:
    """Shares ``alpha_ij = C_ij / sum_{j' in J_i} C_ij'`` over the ``k`` largest entries J_i of each row.

    With ``k = 1`` every share is 1 (ToMe: each discarded token goes to its most similar
    target). Entries that are ``-inf`` (not targets) never receive a share. For k > 1
    the shares are normalised correlations, which needs a non-negative correlation.

    Args:
        matrix: ``(B, r, T)`` correlation matrix.
        k: targets per discarded token, 1 <= k <= T.
    """
    top = torch.topk(matrix, k, dim=-1)
    if k == 1:
        # A row with no finite entry has no target and sends nothing.
        weights = torch.isfinite(top.values).to(matrix.dtype)
    else:
        values = torch.nan_to_num(top.values, neginf=0.0).clamp_min(0)
        weights = values / values.sum(-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    return torch.zeros_like(matrix).scatter_(-1, top.indices, weights)


def row_quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q, dim=-1, keepdim=True)`` (linear interpolation), bit for bit,
    from the top ``n - floor(q (n - 1))`` values only: with q near 1, as FiCoCo's epsilon,
    that is two values per row instead of a sort of the whole row."""
    n = values.shape[-1]
    # the rank in the values' dtype, as torch.quantile computes it
    rank = torch.tensor(q, dtype=values.dtype) * (n - 1)
    below = int(rank)
    above = min(int(torch.ceil(rank)), n - 1)
    top = values.topk(n - below, dim=-1, sorted=True).values  # descending: top[k] = ascending[n - 1 - k]
    lower, upper = top[..., n - 1 - below:n - below], top[..., n - 1 - above:n - above]
    return torch.lerp(lower, upper, rank - below)


def quantile_shares(matrix: Tensor, targets: Tensor, epsilon: float) -> Tensor:
    r"""FiCoCo's token-adaptive targets: shares over the entries at or above each row's quantile.

    .. math::  \tau_i = \operatorname{quantile}_\epsilon(C_{i,T}), \quad
               J_i = \{j \in T : C_{ij} \ge \tau_i\}, \quad
               \alpha_{ij} = \frac{C_{ij}}{\sum_{j' \in J_i} C_{ij'}}

    with linear interpolation (``torch.quantile``'s default). The number of targets depends
    only on the row length n (without ties): ``n - ceil(epsilon * (n - 1))`` when
    ``epsilon * (n - 1)`` is not an integer, so with epsilon = 0.998 every row of at most
    500 targets gets exactly one, its maximum (FiCoCo, arXiv 2411.17686, §3.3; see
    ``docs/ficoco.md``). J_i is never empty.

    Args:
        matrix: ``(B, r, T)`` non-negative correlations over the preserved tokens.
        targets: ``(B, T)`` bool, the preserved tokens that may receive; every row of a
            batch must have the same number of them.
        epsilon: quantile level in [0, 1].
    """
    b, r, t = matrix.shape
    count = targets.sum(1)
    n = int(count[0]) if b else 0
    if r == 0 or n == 0:
        return torch.zeros_like(matrix)
    if bool((count != n).any()):
        raise ValueError("quantile_shares: every sample needs the same number of targets")
    # columns of the targets, ascending, without a per-sample loop
    columns = torch.sort((~targets).to(torch.uint8), dim=1, stable=True).indices[:, :n]
    values = torch.gather(matrix, 2, columns[:, None, :].expand(b, r, n))
    work = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
    tau = row_quantile(work, epsilon)
    chosen = work >= tau
    weights = torch.where(chosen, work, torch.zeros_like(work))
    total = weights.sum(-1, keepdim=True)
    # all chosen correlations zero: share equally among the chosen targets
    weights = torch.where(total > 0, weights / total.clamp_min(torch.finfo(work.dtype).tiny),
                          chosen.to(work.dtype) / chosen.sum(-1, keepdim=True))
    return torch.zeros_like(matrix).scatter_(2, columns[:, None, :].expand(b, r, n), weights.to(matrix.dtype))


def split_keeping(keep: Tensor, scores: Tensor, targets: Tensor | None = None) -> Split:
    """The split that preserves the tokens flagged in ``keep`` ``(B, N)`` (the same count per
    row) and discards the others, both ascending; ``targets`` defaults to every preserved
    token. For selections made by a rule other than a score ranking (diversity, pivots)."""
    b, n = keep.shape
    layout = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    kept = int(keep[0].sum()) if b else 0
    preserved, discarded = layout[:, :kept], layout[:, kept:]
    if targets is None:
        targets = keep
    return Split(scores=scores, discarded=discarded, preserved=preserved, targets=torch.gather(targets, 1, preserved))


def candidate_indices(candidate: Tensor) -> Tensor:
    """``(B, C)`` indices of each row's candidates ``(B, N)`` bool, ascending (the same count per row)."""
    count = int(candidate[0].sum()) if candidate.shape[0] else 0
    return torch.sort((~candidate).to(torch.uint8), dim=1, stable=True).indices[:, :count]


def split_keeping_chosen(candidate: Tensor, candidates: Tensor, chosen: Tensor | None, dtype: torch.dtype) -> Split:
    """The split that keeps the protected tokens and ``candidates[chosen]`` (``chosen``: ``(B, k)``
    positions into :func:`candidate_indices`, or None for none) and discards the other
    candidates; for selections made by a rule rather than a score (zero scores, ``-inf`` on
    the kept)."""
    keep = ~candidate
    if chosen is not None:
        keep = keep.scatter(1, torch.gather(candidates, 1, chosen), True)
    scores = torch.zeros(candidate.shape, dtype=dtype, device=candidate.device)
    return split_keeping(keep, mask_scores(scores, candidate & ~keep), targets=candidate & keep)


def uniform_stride(count: int, total: int) -> list[int]:
    """VisionZip's receivers: positions ``0, s, 2s, ...`` of a list of ``total``, the first ``count``,
    with ``s = max(1, total // count)``."""
    if count <= 0:
        return []
    step = max(1, total // count)
    return list(range(0, total, step))[:count]


def greedy_max_min(distance: Tensor, first: Tensor, k: int) -> Tensor:
    r"""Farthest-point selection: ``(B, k)`` indices, starting from ``first`` ``(B,)``, each next
    one the token farthest from those chosen (:math:`\arg\max_j \min_{s \in S} D_{sj}`, first
    index on ties; chosen tokens score 0 and are never chosen again while another has
    positive distance).

    Args:
        distance: ``(B, N, N)`` symmetric distances.
    """
    b, n, _ = distance.shape
    chosen = [first]
    nearest = torch.gather(distance, 1, first[:, None, None].expand(b, 1, n))[:, 0]  # distance to the set
    taken = torch.zeros(b, n, dtype=torch.bool, device=distance.device).scatter_(1, first[:, None], True)
    for _ in range(k - 1):
        score = nearest.masked_fill(taken, float("-inf"))
        pick = score.argmax(1)
        chosen.append(pick)
        taken.scatter_(1, pick[:, None], True)
        nearest = torch.minimum(nearest, torch.gather(distance, 1, pick[:, None, None].expand(b, 1, n))[:, 0])
    return torch.stack(chosen, 1)


def greedy_dpp_map(kernel: Tensor, k: int) -> Tensor:
    r"""Greedy MAP inference of a determinantal point process: ``(B, k)`` indices in the order
    chosen, each the item that most increases :math:`\log\det L_{S}` of the chosen set.

    With the incremental Cholesky update (Chen et al., NeurIPS 2018): :math:`d^2 = \mathrm{diag}(L)`;
    at each step :math:`j = \arg\max d^2` (first index on ties),
    :math:`e = (L_{j,:} - \sum_t c_{t,j}\, c_{t,:}) / \sqrt{d^2_j}`, store :math:`c \leftarrow e`,
    :math:`d^2 \leftarrow d^2 - e^2` and :math:`d^2_j = -\infty`, so no item is chosen twice.
    Past the kernel's rank the gains are zero up to rounding; where :math:`d^2_j \le 0` the
    update is taken as :math:`e = 0` (the reference update divides by :math:`\sqrt{0}` there,
    turning every gain into NaN and allowing an item to be chosen again).

    Args:
        kernel: ``(B, N, N)`` symmetric positive semi-definite kernel over the items that
            may be chosen.
        k: items to choose, ``k <= N``.
    """
    b, n, _ = kernel.shape
    rows = torch.arange(b, device=kernel.device)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    factors = kernel.new_zeros(k, b, n)
    chosen = torch.empty(b, k, dtype=torch.long, device=kernel.device)
    for step in range(k):
        j = gains.argmax(-1)
        chosen[:, step] = j
        update = torch.einsum("tb,tbn->bn", factors[:step, rows, j], factors[:step])
        pivot = gains[rows, j].clamp_min(0).sqrt()[:, None]
        factors[step] = torch.where(pivot > 0, (kernel[rows, j] - update) / pivot.clamp_min(torch.finfo(pivot.dtype).tiny), 0)
        gains -= factors[step].square()
        gains[rows, j] = float("-inf")
    return chosen


def iqr_outlier_count(values: Tensor) -> int:
    r"""How many of ``values`` (one row) lie above :math:`Q_3 + 1.5 (Q_3 - Q_1)` (Tukey's upper
    fence, quartiles by linear interpolation as ``numpy.percentile``)."""
    q1, q3 = torch.quantile(values.double(), torch.tensor([0.25, 0.75], dtype=torch.float64, device=values.device))
    return int((values.double() > q3 + 1.5 * (q3 - q1)).sum())
