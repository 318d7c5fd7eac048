"""Signals of a packed, [CLS]-free vision transformer with a 2 x 2 patch merger (the Qwen-VL
towers), for the ``pre_llm`` site.

These towers run every image of a batch as one batch-less sequence of patches, an image (or,
in Qwen2.5-VL's window blocks, a window) per segment of ``cu_seqlens``, with a fused ``qkv``
projection and 2-D rotary positions, and their merger joins each 4 consecutive rows (a 2 x 2
group) into one language-model token. No block can return its attention weights under SDPA,
and there is no [CLS] row to read, so the signals are re-formed from the block's own input,
one image at a time, a band of query rows at a time (:func:`fico.adapters.attention.row_bands`):

``attention_received``
    ``(N,)`` per merged token of an image: the attention its patches receive in the block,
    averaged over heads and over every query patch of the image, then over its 4 patches,

    .. math::  a_j = \\frac{1}{4} \\sum_{p \\in g(j)} \\frac{1}{H n} \\sum_{h=1}^{H} \\sum_{i=1}^{n}
               \\mathrm{softmax}_p\\Big(\\frac{q^h_i \\cdot k^h_p}{\\sqrt d}\\Big)

    (VisPruner's maintainers' substitute for [CLS] attention on Qwen2.5-VL, VisPruner issue #1;
    vLLM's VisionZip port for Qwen-VL sums the same columns).
``keys``
    ``(N, d)`` per merged token: the block's keys (before the rotary positions) averaged over
    heads and over its 4 patches, for similarity between tokens (ToMe's metric).

Both come out in the order the merger's tokens reach the language model (raster order on
the image's merged grid); a tower that runs its blocks in window order (Qwen2.5-VL) gives the
window permutation, which is undone.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import row_bands
from ..hooks import hook

#: the signals these towers give at the pre_llm site
PACKED_VIT_SIGNALS = {"attention_received", "keys"}


#: logits a band of the received-attention signal holds (4 M values, 16 MB in float32): it runs
#: inside the tower's forward, beside the tower's own activations, so smaller than the decoder's
RECEIVED_BAND_ELEMENTS = 1 << 22


def received_attention(queries: Tensor, keys: Tensor, scaling: float) -> Tensor:
    """``(n,)`` the head- and query-mean softmax attention each key receives, from ``queries``
    and ``keys`` ``(H, n, d)`` of one image (full, bidirectional attention), a band of query
    rows at a time."""
    heads, n, _ = queries.shape
    total = queries.new_zeros(n, dtype=torch.float32 if queries.dtype in (torch.float16, torch.bfloat16)
                              else queries.dtype)
    for band in row_bands(n, heads, n, RECEIVED_BAND_ELEMENTS):
        logits = torch.matmul(queries[:, band], keys.transpose(-1, -2)).mul_(scaling).to(total.dtype)
        total += torch.softmax(logits, -1).sum(dim=(0, 1))
        del logits
    return total / (heads * n)


def per_merged_token(values: Tensor, merge: int) -> Tensor:
    """``(N / merge^2, ...)`` the mean of ``values`` ``(N, ...)`` over each group of ``merge^2``
    consecutive rows (the merger's groups)."""
    return values.reshape(-1, merge * merge, *values.shape[1:]).mean(1)


class PackedTowerSignals:
    """Captures the pre_llm signals of one block of a packed tower during its forward.

    Args:
        tower: the vision tower (``blocks``, ``spatial_merge_size``).
        block: the index of the block whose attention is read.
        apply_rotary: the modeling file's ``apply_rotary_pos_emb_vision(q, k, cos, sin)``.
        names: the signals wanted (:data:`PACKED_VIT_SIGNALS`).
        window_order: ``grid_thw -> window_index`` where the tower runs its blocks in window
            order (Qwen2.5-VL), else None.
    """

    def __init__(self, tower: nn.Module, block: int, apply_rotary: Callable, names: set[str],
                 window_order: Callable[[Tensor], Tensor] | None = None):
        self.tower, self.block, self.apply_rotary = tower, block, apply_rotary
        self.names, self.window_order = names, window_order
        self.merge = tower.spatial_merge_size
        self.grid: Tensor | None = None
        #: per image: signal name -> values in the order the merger emits them
        self.captured: list[dict[str, Tensor]] = []
        self.run = None  # the run it is attached to: its work spans time the capture

    def attach(self, run) -> None:
        self.run = run
        hook(run, self.tower.register_forward_pre_hook(self._begin, with_kwargs=True))
        attention = self.tower.blocks[self.block].attn
        hook(run, attention.register_forward_pre_hook(functools.partial(self._capture, attention),
                                                      with_kwargs=True))

    def _begin(self, module, args, kwargs):
        self.grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.captured = []
        return None

    def _capture(self, attention: nn.Module, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.is_meta or self.grid is None:
            return None
        with self.run.work():  # fico's own work inside the tower's forward
            self._signals(attention, hidden, kwargs["position_embeddings"])
        return None

    def _signals(self, attention: nn.Module, hidden: Tensor, rotary: tuple[Tensor, Tensor]) -> None:
        cos, sin = rotary
        n, heads = hidden.shape[0], attention.num_heads
        width = attention.qkv.out_features // 3  # the fused projection's q and k rows only
        bias = attention.qkv.bias[:2 * width] if attention.qkv.bias is not None else None
        queries, keys = F.linear(hidden, attention.qkv.weight[:2 * width], bias).view(n, 2, heads, -1).unbind(1)
        head_mean_keys = keys.mean(1) if "keys" in self.names else None
        rotated_q, rotated_k = self.apply_rotary(queries, keys, cos, sin)
        del queries, keys
        order = None
        if self.window_order is not None:  # rows in window order: back to the merger's output order
            window = self.window_order(self.grid).to(hidden.device)
            groups = self.merge * self.merge
            order = (torch.argsort(window)[:, None] * groups + torch.arange(groups, device=hidden.device)).reshape(-1)
        lengths = (self.grid.prod(-1)).tolist()
        first = 0
        for length in lengths:
            # the image's rows: a slice in raster order, gathered where the tower runs windows
            rows = order[first:first + length] if order is not None else slice(first, first + length)
            out = {}
            if "attention_received" in self.names:
                received = received_attention(rotated_q[rows].transpose(0, 1), rotated_k[rows].transpose(0, 1),
                                              attention.scaling)
                out["attention_received"] = per_merged_token(received, self.merge)
            if head_mean_keys is not None:
                out["keys"] = per_merged_token(head_mean_keys[rows], self.merge)
            self.captured.append(out)
            first += length

    def take(self) -> list[dict[str, Tensor]]:
        """The signals of each image of the last forward, and forget them."""
        captured, self.captured = self.captured, []
        return captured
