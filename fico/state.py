"""The tokens one reduction step sees: :class:`TokenState`.

A state is built by a site for one step and handed through filter, correlate and
compress. Everything a stage may read is here as tensors; no stage ever sees a
model module. Per-token tensors share the token axis (dim 1) and are gathered
together, so a token's original position, size and flags travel with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import torch
from torch import Tensor

from .layout import grid_layout


@dataclass
class TokenState:
    """Tokens present at one step of one forward pass.

    Attributes:
        hidden: ``(B, N, D)`` hidden states of the tokens present.
        positions: ``(B, N)`` original positions: the token's index in the unreduced
            sequence at this site ([CLS] is 0 in the vision tower). Tokens created by a
            compressor (EViT's fused token) have position -1.
        candidate: ``(B, N)`` bool, tokens that may be discarded or receive information
            (image patches / visual tokens). The others are *protected* ([CLS], text,
            padding) and pass through a step unchanged.
        visual: ``(B, N)`` bool, tokens that carry image information.
        text: ``(B, N)`` bool, real (non-padding) text tokens (LLM site only).
        patch: ``(B, N)`` long, the token's cell on the image's patch grid (row-major),
            -1 for tokens that are not patches ([CLS], text, fused tokens).
        grid: ``(rows, cols)`` of the patch grid (24 x 24 for LLaVA-1.5).
        layout: ``(B, N, 4)`` long, each token's place ``(image, part, row, column)``
            (:mod:`fico.layout`), -1 throughout for tokens with no cell, where the site gives
            it; read it with :meth:`token_layout`, which derives it from ``patch`` and
            ``grid`` (one image, one part) otherwise.
        grids: ``(rows, cols)`` of each part's grid, by part, with ``layout``.
        sources: ``(B, N, N0)`` provenance, when the run tracks it: the weight of each
            original token in each token present (a row of the identity at first).
            Compressors need not handle it: it travels with the hidden states.
        carried: ``(B, N, C)`` per-token values a site needs moved exactly as the tokens are
            (Qwen3-VL's DeepStack features of each visual token): like ``sources``, they
            travel with the hidden states through the compressor (every compressor is linear
            in the tokens), and no stage reads them.
        size: ``(B, N, 1)`` how many original tokens each token stands for, or None
            while no compressor tracks sizes (ToMe's ``size``).
        signals: what the site measured for this step, by name (see
            ``fico.signals``), e.g. ``keys`` ``(B, N, d)`` or ``cls_attention`` ``(B, N)``.
        extras: per-token attributes ``(B, N)`` that components keep across steps of
            one forward pass (e.g. ToMe's token layout). Tokens appended by a compressor
            get -1.
        site: ``"vision"`` or ``"llm"``.
        layer: 0-based module index of the layer this step runs at.
    """

    hidden: Tensor
    positions: Tensor
    candidate: Tensor
    visual: Tensor
    text: Tensor | None = None
    patch: Tensor | None = None
    grid: tuple[int, int] | None = None
    sources: Tensor | None = None
    size: Tensor | None = None
    signals: Mapping[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)
    site: str = "vision"
    layer: int = 0
    layout: Tensor | None = None
    grids: tuple[tuple[int, int], ...] | None = None
    carried: Tensor | None = None

    def token_layout(self) -> tuple[Tensor, tuple[tuple[int, int], ...]] | None:
        """``(layout, grids)``: each token's ``(image, part, row, column)`` and each part's grid,
        as the site gave them or, from ``patch`` and ``grid``, on one grid; None without either.
        Derived when asked (most stages never read it), so sites that give only cells pay nothing."""
        if self.layout is not None and self.grids is not None:
            return self.layout, self.grids
        if self.patch is not None and self.grid is not None:
            return grid_layout(self.patch, self.grid), (tuple(self.grid),)
        return None

    @property
    def protected(self) -> Tensor:
        return ~self.candidate

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[1]

    def text_after_image(self) -> Tensor:
        """``(B, N)`` bool: text tokens after the first visual token (those that can attend to it)."""
        if self.text is None:
            return torch.zeros_like(self.candidate)
        order = torch.arange(self.candidate.shape[1], device=self.candidate.device)
        first_visual = torch.where(self.visual, order, self.candidate.shape[1]).min(1, keepdim=True).values
        return self.text & (order > first_visual)

    def token_sizes(self) -> Tensor:
        """``size``, or ones when sizes are not tracked."""
        if self.size is not None:
            return self.size
        return self.hidden.new_ones(*self.hidden.shape[:2], 1)

    def keep(self, index: Tensor) -> "TokenState":
        """The state restricted to tokens ``index`` ``(B, K)``, in that order."""
        return replace(
            self,
            hidden=gather_tokens(self.hidden, index),
            positions=gather_tokens(self.positions, index),
            candidate=gather_tokens(self.candidate, index),
            visual=gather_tokens(self.visual, index),
            text=None if self.text is None else gather_tokens(self.text, index),
            patch=None if self.patch is None else gather_tokens(self.patch, index),
            layout=None if self.layout is None else gather_tokens(self.layout, index),
            sources=None if self.sources is None else gather_tokens(self.sources, index),
            carried=None if self.carried is None else gather_tokens(self.carried, index),
            size=None if self.size is None else gather_tokens(self.size, index),
            extras={k: gather_tokens(v, index) for k, v in self.extras.items()},
            signals={},
        )

    def append(self, hidden: Tensor, size: Tensor | None = None) -> "TokenState":
        """The state with new tokens ``hidden`` ``(B, K, D)`` appended (visual candidates)."""
        b, k = hidden.shape[:2]
        if self.size is not None and size is None:
            size = hidden.new_ones(b, k, 1)
        return replace(
            self,
            hidden=torch.cat([self.hidden, hidden], dim=1),
            positions=torch.cat([self.positions, self.positions.new_full((b, k), -1)], dim=1),
            candidate=torch.cat([self.candidate, self.candidate.new_ones(b, k)], dim=1),
            visual=torch.cat([self.visual, self.visual.new_ones(b, k)], dim=1),
            text=None if self.text is None else torch.cat([self.text, self.text.new_zeros(b, k)], dim=1),
            patch=None if self.patch is None else torch.cat([self.patch, self.patch.new_full((b, k), -1)], dim=1),
            layout=None if self.layout is None else torch.cat(
                [self.layout, self.layout.new_full((b, k, self.layout.shape[-1]), -1)], dim=1),
            sources=None if self.sources is None else torch.cat(
                [self.sources, self.sources.new_zeros(b, k, self.sources.shape[-1])], dim=1),
            carried=None if self.carried is None else torch.cat(
                [self.carried, self.carried.new_zeros(b, k, self.carried.shape[-1])], dim=1),
            size=None if self.size is None else torch.cat([self.size, size], dim=1),
            extras={k_: torch.cat([v, v.new_full((b, k), -1)], dim=1) for k_, v in self.extras.items()},
        )


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b]]`` for a per-token tensor ``x`` of shape ``(B, N, ...)``."""
    if x.shape[0] != index.shape[0]:
        x = x.expand(index.shape[0], *x.shape[1:])
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)
