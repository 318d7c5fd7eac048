"""Where each visual token sits: its layout entry ``(image, part, row, column)``.

A site describes every token of a :class:`fico.TokenState` by the image it comes from (within
the batch the site sees), the part of that image (0: the image itself; a family that adds
high-resolution crops numbers them 1, 2, ...), and its cell's row and column on that part's
grid (``state.grids[part]`` is ``(rows, columns)``). Tokens with no cell ([CLS], text,
padding, tokens a compressor created) have -1 throughout. Stages that work on neighbourhoods
(FiCoCo's local penalty, pooling) group tokens by window of their own part's grid, so tokens
of different images or parts never share a window.

>>> import torch
>>> layout = grid_layout(torch.tensor([[0, 1, 4, 5, -1]]), (4, 4))
>>> layout[0].tolist()
[[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 1, 1], [-1, -1, -1, -1]]
>>> windows(layout, ((4, 4),), 2, whole=True)[0].tolist()
[[0, 0, 0, 0, -1]]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FIELDS = ("image", "part", "row", "column")


def grid_layout(patch: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, N, 4)`` layout of tokens on one grid (image 0, part 0): the row and column of the
    row-major cell ``patch`` ``(B, N)``; -1 throughout where ``patch < 0``."""
    cols = grid[1]
    cell = patch.clamp_min(0)
    layout = torch.stack([torch.zeros_like(cell), torch.zeros_like(cell), cell // cols, cell % cols], dim=-1)
    return torch.where((patch >= 0)[..., None], layout, -1)


def windows(layout: Tensor, grids: tuple[tuple[int, int], ...], size: int, whole: bool
            ) -> tuple[Tensor, Tensor, Tensor]:
    r"""Each token's ``size x size`` window on its own part's grid.

    .. math::  W(i) = (\mathrm{image}_i, \mathrm{part}_i, \lfloor \mathrm{row}_i / k \rfloor,
               \lfloor \mathrm{column}_i / k \rfloor)

    Returns ``(window, corner, count)``: ``(B, N)`` a window index, equal for tokens of one
    window and distinct across windows, images and parts (row-major within a part), -1 for
    tokens without a cell and, with ``whole``, for cells beyond the last whole window of their
    part (stride-k pooling drops them); ``(B, N)`` whether the token is its window's top-left
    cell; and a bound above every window index.
    """
    image, part, row, column = layout.unbind(-1)
    valid = row >= 0
    shapes = torch.tensor(grids, dtype=torch.long, device=layout.device)[part.clamp_min(0)]
    rows, cols = shapes[..., 0], shapes[..., 1]
    if whole:
        per_row = cols // size
        inside = valid & (row < (rows // size) * size) & (column < per_row * size)
        per_part = max((r // size) * (c // size) for r, c in grids)
    else:
        per_row = (cols + size - 1) // size
        inside = valid
        per_part = max(math.ceil(r / size) * math.ceil(c / size) for r, c in grids)
    local = (row // size) * per_row + column // size
    images = 1 if len(grids) == 1 and not bool((image > 0).any()) else int(image.max()) + 1
    window = torch.where(inside, (image.clamp_min(0) * len(grids) + part.clamp_min(0)) * per_part + local, -1)
    corner = inside & (row % size == 0) & (column % size == 0)
    return window, corner, images * len(grids) * per_part
