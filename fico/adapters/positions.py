"""How a decoder places tokens: the position strategy a model family hands the decoder sites.

The sites gather, renumber and re-form positions of the tokens they keep; how a position
becomes a rotation is the family's: 1-D RoPE for Llama-style decoders
(:class:`RotaryPositions`), multimodal RoPE for the families that use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn


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
