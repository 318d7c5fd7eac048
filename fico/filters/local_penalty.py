"""FiCoCo's local penalty: spread the discarded tokens over the image."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..layout import windows


def penalise_windows(scores: Tensor, layout: Tensor, grids: tuple[tuple[int, int], ...], window: int,
                     c: float) -> Tensor:
    r"""Raise each window's most redundant score (FiCoCo, arXiv 2411.17686, §3.2).

    Scores are placed by each token's layout entry (:mod:`fico.layout`); each part's grid is
    cut into non-overlapping ``window x window`` windows (fixed for all layers; tokens of
    different images or parts never share one). In each window, among the tokens still
    present with a finite score, the largest score :math:`s^*` becomes

    .. math::  s^* \leftarrow \begin{cases} c\, s^* & s^* > 0 \\ s^* / c & s^* \le 0 \end{cases}

    (the paper: "enhances positive scores and diminishes negative ones"). At most one score
    changes per window (ties: the cell first in row-major order); windows with no token left
    are skipped; ``c = 1`` is the identity. Tokens without a cell or with a ``-inf`` score are
    never changed.

    Args:
        scores: ``(B, N)`` redundancy scores (higher = more redundant).
        layout: ``(B, N, 4)`` each token's ``(image, part, row, column)``, -1 if none.
        grids: ``(rows, cols)`` of each part's grid.
        window: window side, >= 1.
        c: scaling coefficient, > 0.
    """
    if c == 1:
        return scores
    bucket, _, count = windows(layout, grids, window, whole=False)
    valid = (bucket >= 0) & torch.isfinite(scores)
    widest = max(cols for _, cols in grids)
    cell = torch.where(valid, layout[..., 2] * widest + layout[..., 3], 0)  # row-major order within a part
    bucket = torch.where(valid, bucket, count)  # one spare bucket for the rest
    return _raise_window_maxima(scores, valid, bucket, count, cell, max(rows for rows, _ in grids) * widest, c)


def local_penalty(scores: Tensor, patch: Tensor, grid: tuple[int, int], window: int, c: float) -> Tensor:
    r"""Raise each window's most redundant score (FiCoCo, arXiv 2411.17686, §3.2).

    Tokens on one grid, placed by their original cell ``patch`` (:func:`penalise_windows`
    computes the same for any layout, several images or parts; this is the one-grid case in
    fewer operations). The grid is cut into non-overlapping ``window x window`` windows (fixed
    for all layers). In each window, among the tokens still present with a finite score, the
    largest score :math:`s^*` becomes

    .. math::  s^* \leftarrow \begin{cases} c\, s^* & s^* > 0 \\ s^* / c & s^* \le 0 \end{cases}

    (the paper: "enhances positive scores and diminishes negative ones"). At most one score
    changes per window (ties: the lower original position); windows with no token left are
    skipped; ``c = 1`` is the identity. Tokens with ``patch < 0`` or a ``-inf`` score are
    never changed.

    Args:
        scores: ``(B, N)`` redundancy scores (higher = more redundant).
        patch: ``(B, N)`` grid cell (row-major) of each token, -1 if none.
        grid: ``(rows, cols)`` of the patch grid.
        window: window side, >= 1.
        c: scaling coefficient, > 0.
    """
    if c == 1:
        return scores
    rows, cols = grid
    window_cols = math.ceil(cols / window)
    windows = math.ceil(rows / window) * window_cols
    valid = (patch >= 0) & torch.isfinite(scores)
    cell = patch.clamp_min(0)
    window_of = (cell // cols // window) * window_cols + (cell % cols) // window
    window_of = torch.where(valid, window_of, windows)  # one spare bucket for the rest
    return _raise_window_maxima(scores, valid, window_of, windows, cell, int(rows * cols), c)


def _raise_window_maxima(scores: Tensor, valid: Tensor, bucket: Tensor, count: int, cell: Tensor, beyond: int,
                         c: float) -> Tensor:
    """The penalty itself: in each of ``count`` windows (``bucket``; invalid tokens in the spare
    bucket ``count``), the valid token with the largest score, the lowest ``cell`` (< ``beyond``)
    among ties, has its score multiplied by ``c`` (positive) or divided by it."""
    b = scores.shape[0]
    low = torch.finfo(scores.dtype).min
    masked = torch.where(valid, scores, low)
    best = scores.new_full((b, count + 1), low).scatter_reduce(1, bucket, masked, "amax")
    is_best = valid & (masked == torch.gather(best, 1, bucket))
    first = torch.full((b, count + 1), beyond, dtype=torch.long, device=scores.device)
    first = first.scatter_reduce(1, bucket, torch.where(is_best, cell, beyond), "amin")
    chosen = is_best & (cell == torch.gather(first, 1, bucket))
    raised = torch.where(scores > 0, scores * c, scores / c)
    return torch.where(chosen, raised, scores)
