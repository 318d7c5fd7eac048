"""LLaVA-NeXT's anyres packing, position-aware: the CLIP tokens that survive a vision-side step,
each at its own crop and cell, placed where LLaVA-NeXT's ``pack_image_features`` puts them.

An image is encoded as a base crop (the image resized to one crop) and ``nph x npw``
high-resolution crops of the padded image. The stock packer lays the crops' cells out on one
``(nph g) x (npw g)`` grid (``g x g`` cells per crop), cuts the rows or columns that cover the
padding (``unpad_image``), appends the ``image_newline`` embedding at the end of each row,
flattens row-major and puts the base crop's tokens first. Any discarded token breaks its
reshapes, so this packer places tokens by their cells instead:

* the base crop's tokens first, in the order the vision side left them;
* each high-resolution token at ``(row, column)`` of the unpadded grid, where
  ``row = (k // npw) g + cell // g`` and ``column = (k % npw) g + cell % g`` for crop ``k``,
  dropped where unpadding cuts its cell (as the stock packer drops it), raster order;
* one newline after every row of the unpadded grid, emptied rows included: newlines are
  visual but never discarded, so each image keeps ``rows`` of them;
* tokens a compressor created (no cell) after the last newline.

With nothing discarded this is the stock packing, value for value. The cut is the stock
``unpad_image`` applied to a grid of cell indices, so both cut exactly the same cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PackedImage:
    """One image's tokens as the language model receives them.

    ``features`` ``(N, D)``; ``layout`` ``(N, 4)`` (:mod:`fico.layout`: image, part 0 base /
    1 high resolution, row, column; -1 for newlines and created tokens); ``newline`` ``(N,)``
    bool; ``cells`` ``(N,)`` the base crop's cell of base tokens, -1 elsewhere; ``grids`` the
    base and unpadded grids.
    """

    features: Tensor
    layout: Tensor
    newline: Tensor
    cells: Tensor
    grids: tuple[tuple[int, int], tuple[int, int]]


def anyres_grids(image_size, pinpoints, crop: int, patch: int) -> tuple[int, tuple[int, int], tuple[tuple[int, int],
                                                                                            tuple[int, int]]]:
    """``(passes, (nph, npw), (base grid, unpadded grid))`` of an image of ``image_size`` (height,
    width) under LLaVA-NeXT's anyres with ``pinpoints`` (pixel sizes) and ``crop`` px crops of
    ``patch`` px patches: the tower passes (base + crops), the crops' arrangement, and the grids
    its visual tokens lie on, by transformers' own functions. The image gives the language
    model :func:`anyres_tokens` of them."""
    from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                    image_size_to_num_patches, unpad_image)

    size = [int(v) for v in image_size]
    pinpoints = [list(p) for p in pinpoints]
    shape = tuple(get_anyres_image_grid_shape(size, pinpoints, crop))
    g = crop // patch
    rows, cols = unpadded_cells(shape, g, size, unpad_image).shape
    return image_size_to_num_patches(size, pinpoints, crop), shape, ((g, g), (rows, cols))


def anyres_tokens(grids: tuple[tuple[int, int], tuple[int, int]]) -> int:
    """Visual tokens of an image on ``grids``: the base cells, then each unpadded row and its newline."""
    (g, h), (rows, cols) = grids
    return g * h + rows * (cols + 1)


def unpadded_cells(grid_shape: tuple[int, int], cell_grid: int, image_size, unpad) -> Tensor:
    """``(rows, cols)`` of the high-resolution grid after unpadding, as the index of each kept
    cell on the padded ``(nph g) x (npw g)`` grid (``unpad``: transformers' ``unpad_image``)."""
    nph, npw = grid_shape
    height, width = nph * cell_grid, npw * cell_grid
    return unpad(torch.arange(height * width).view(1, height, width), image_size)[0]


def pack_image(crops: list[Tensor], cells: list[Tensor], grid_shape: tuple[int, int], cell_grid: int,
               image_size, newline: Tensor, unpad, image: int = 0) -> PackedImage:
    """Pack one image's crops (``crops[0]`` the base crop, then the high-resolution crops in
    row-major order), each ``(n_k, D)`` with the cell of each token in ``cells[k]`` (``-1``:
    created by a compressor)."""
    device = crops[0].device
    base, base_cells = crops[0], cells[0].to(device)
    g = cell_grid
    base_layout = torch.stack([torch.full_like(base_cells, image), torch.zeros_like(base_cells),
                               base_cells // g, base_cells % g], -1)
    base_layout = torch.where((base_cells >= 0)[:, None], base_layout, -1)
    if len(crops) == 1:  # no high-resolution crops: the stock packer appends one newline
        features = torch.cat([base, newline[None].to(base)], 0)
        layout = torch.cat([base_layout, base_layout.new_full((1, 4), -1)])
        is_newline = torch.zeros(features.shape[0], dtype=torch.bool, device=device)
        is_newline[-1] = True
        return PackedImage(features, layout, is_newline, torch.cat([base_cells, base_cells.new_full((1,), -1)]),
                           ((g, g), (0, 0)))
    nph, npw = grid_shape
    kept = unpadded_cells(grid_shape, g, image_size, unpad).to(device)  # (rows, cols) padded-grid index
    rows, cols = kept.shape
    where = torch.full((nph * g * npw * g,), -1, dtype=torch.long, device=device)
    where[kept.reshape(-1)] = torch.arange(rows * cols, device=device)
    hires = torch.cat(crops[1:], 0)
    crop_of = torch.cat([torch.full((c.shape[0],), k, dtype=torch.long, device=device)
                         for k, c in enumerate(crops[1:])])
    cell = torch.cat([c.to(device) for c in cells[1:]])
    padded = ((crop_of // npw) * g + cell.clamp_min(0) // g) * (npw * g) + (crop_of % npw) * g + cell.clamp_min(0) % g
    slot = torch.where(cell >= 0, where[padded], -1)
    placed = (slot >= 0).nonzero()[:, 0]
    placed = placed[torch.argsort(slot[placed], stable=True)]
    created = (cell < 0).nonzero()[:, 0]
    slot_row = slot[placed] // cols
    # each row's tokens, then its newline: a newline's key sorts after every cell of its row
    keys = torch.cat([slot_row * (cols + 1) + slot[placed] % cols, torch.arange(rows, device=device) * (cols + 1) + cols])
    order = torch.argsort(keys, stable=True)
    source = torch.cat([placed, torch.full((rows,), -1, dtype=torch.long, device=device)])[order]
    is_newline = source < 0
    values = hires[source.clamp_min(0)]
    values = torch.where(is_newline[:, None], newline.to(values)[None], values)
    grid_slot = torch.cat([slot[placed], torch.full((rows,), -1, dtype=torch.long, device=device)])[order]
    hires_layout = torch.stack([torch.full_like(grid_slot, image), torch.ones_like(grid_slot),
                                grid_slot // cols, grid_slot % cols], -1)
    hires_layout = torch.where((grid_slot >= 0)[:, None], hires_layout, -1)
    extra = hires[created]
    features = torch.cat([base, values, extra], 0)
    layout = torch.cat([base_layout, hires_layout, hires_layout.new_full((extra.shape[0], 4), -1)])
    is_newline = torch.cat([torch.zeros_like(base_cells, dtype=torch.bool), is_newline,
                            torch.zeros(extra.shape[0], dtype=torch.bool, device=device)])
    base_only = torch.cat([base_cells, base_cells.new_full((features.shape[0] - base.shape[0],), -1)])
    return PackedImage(features, layout, is_newline, base_only, ((g, g), (rows, cols)))
