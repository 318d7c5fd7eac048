"""How a decoder places tokens: the position strategy a model family hands the decoder sites.

The sites gather, renumber and re-form positions of the tokens they keep; how a position
becomes a rotation is the family's: 1-D RoPE for Llama-style decoders
(:class:`RotaryPositions`), multimodal RoPE for the families that use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from ..state import gather_tokens


@dataclass(frozen=True)
class RotaryPositions:
    r"""1-D rotary positions (RoPE, Su et al. 2021): token ``m``'s query or key ``x`` becomes
    :math:`x \cos(m\theta) + \mathrm{rotate\_half}(x) \sin(m\theta)`, with ``(cos, sin)`` the
    ``(B, N, d)`` tables the language model's rotary embedding gives for the positions.

    The family passes its modeling file's own functions, so that what the sites re-form is
    bitwise what the model computes.
    """

    rotate_half: Callable[[Tensor], Tensor]
    #: ``(q, k, cos, sin) -> (q, k)``, as the model's attention applies it (``(B, H, N, d)``)
    apply_rotary_pos_emb: Callable
    #: ``(keys, groups) -> keys`` repeated for grouped-query attention
    repeat_kv: Callable[[Tensor, int], Tensor]

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x`` at the positions of ``cos``/``sin`` (broadcast against ``x``)."""
        return x * cos + self.rotate_half(x) * sin

    def embeddings(self, language_model: nn.Module, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` of ``position_ids`` from the language model's rotary embedding."""
        return language_model.rotary_emb(hidden, position_ids)

    def present(self, full: tuple[Tensor, Tensor], rope: Tensor, renumbered: bool, language_model: nn.Module,
                hidden: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` of the tokens present, from the prefill's ``full`` tables: entry
        ``rope[b, i]`` of each (the token's own position while positions are kept; its rank
        among the real tokens after a renumbering step, which the 1-D table holds)."""
        cos, sin = full
        return gather_tokens(cos, rope), gather_tokens(sin, rope)


@dataclass(frozen=True)
class MultimodalRotaryPositions(RotaryPositions):
    r"""Multimodal RoPE (Qwen2-VL's M-RoPE): each token's time, height and width positions
    rotate its own sections of the head (``mrope_section``); text tokens have the three equal.
    The language model folds them into per-token ``(cos, sin)``, so a token keeps its 3-D
    position by gathering its entry, as with 1-D RoPE.

    Renumbering has no 3-D meaning (a reduced image has no grid), so a renumbering step gives
    every token present the 1-D position of its rank among the sample's real tokens, in all
    three rows, as a text-only sequence would have them (what the official ports renumber to);
    decode steps continue that numbering.
    """

    def present(self, full: tuple[Tensor, Tensor], rope: Tensor, renumbered: bool, language_model: nn.Module,
                hidden: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
        if not renumbered:
            return super().present(full, rope, renumbered, language_model, hidden, real)
        rank = (real.long().cumsum(1) - 1).clamp_min(0)  # each real token's 1-D position
        return self.embeddings(language_model, hidden, gather_tokens(rank, rope))
