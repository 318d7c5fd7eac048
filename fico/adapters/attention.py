"""Attention rows as the stages read them, shared by the vision-layer and the decoder sites:
softmax over keys with the heads reduced, and a layer's 4D mask applied to chosen query rows."""

from __future__ import annotations

import torch
from torch import Tensor


def softmax_heads(logits: Tensor, heads: str = "mean") -> Tensor:
    """Softmax over the last axis, reduced over the head axis (1): ``mean``, ``max`` or ``sum``.

    float32 softmax for half dtypes (as HF's eager attention), the model's dtype otherwise;
    a fully masked row (left padding) attends to nothing, not NaN.
    """
    probs = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
    return reduce_heads(torch.nan_to_num(probs, nan=0.0), heads)


def reduce_heads(probs: Tensor, heads: str = "mean") -> Tensor:
    """``(B, H, R, N)`` attention probabilities reduced over the head axis: ``mean``, ``max``,
    ``sum``, or ``all`` (kept)."""
    if heads == "all":
        return probs
    if heads == "mean":
        return probs.mean(dim=1)
    if heads == "max":
        return probs.amax(dim=1)
    if heads == "sum":
        return probs.sum(dim=1)
    raise ValueError(f"heads must be mean, max, sum or all, got {heads!r}")


def masked_logits(logits: Tensor, rows: Tensor, mask: Tensor | None) -> Tensor:
    """``(B, H, R, N)`` logits of query rows ``rows`` with a layer's 4D mask (bool: True
    attends; float: added) applied, or plain causal masking where ``mask`` is None."""
    b = rows.shape[0]
    if mask is None:
        allowed = torch.arange(logits.shape[-1], device=rows.device)[None, None, :] <= rows[:, :, None]
        return logits.masked_fill(~allowed[:, None], float("-inf"))
    mask = mask.expand(b, -1, -1, -1)
    mask_rows = torch.gather(mask, 2, rows[:, None, :, None].expand(b, mask.shape[1], rows.shape[1], mask.shape[-1]))
    return logits.masked_fill(~mask_rows, float("-inf")) if mask_rows.dtype == torch.bool else logits + mask_rows


#: elements of attention logits (B x H x rows x N) formed at a time where a signal needs every
#: row: 2^23 (32 MB in float32; a band's logits, mask, softmax and its copies hold a few times
#: that), so a full attention matrix over LLaVA-NeXT's ~3000 tokens is built a band of query
#: rows at a time instead of as 32 heads x N x N at once
CHUNK_ELEMENTS = 1 << 23


def row_bands(rows: int, batch_heads: int, keys: int, elements: int | None = None) -> list[slice]:
    """Consecutive bands of ``rows`` query rows, each small enough that its ``(B, H, band, N)``
    logits hold at most ``elements`` values (default :data:`CHUNK_ELEMENTS`; one row at
    least). Every output element is computed as it would be whole: the bands only bound the
    memory in flight."""
    elements = CHUNK_ELEMENTS if elements is None else elements
    band = max(1, elements // max(1, batch_heads * keys))
    return [slice(start, min(start + band, rows)) for start in range(0, rows, band)]
