"""The three stage contracts: :class:`Filter`, :class:`Correlator`, :class:`Compressor`.

One reduction step (FiCoCo, arXiv 2411.17686, §3) is

1. **filter**: redundancy scores ``s`` over the tokens present; the ``r`` most redundant
   candidates form the discarded set S, the rest the preserved set T;
2. **correlate**: a correlation matrix ``C`` (|S| x |T|) and the shares ``alpha_ij`` that
   each discarded token i sends to preserved token j (or nothing: pruning; or one new
   token: convergent fusion);
3. **compress**: T's new states from S's information; S is removed.

Components subclass one of the three classes below, take their parameters as keyword
arguments of ``__init__`` (annotated, so recipes are type-checked), and are registered
by name through the ``fico`` pluggy hooks (see :mod:`fico.hookspecs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from .state import TokenState


@dataclass
class Split:
    """Output of a filter.

    Attributes:
        scores: ``(B, N)`` redundancy scores (higher = more redundant); ``-inf`` for
            tokens that may not be discarded.
        discarded: ``(B, r)`` indices of S into the current tokens, ascending.
        preserved: ``(B, N - r)`` indices of T, ascending (kept tokens keep their order).
        targets: ``(B, N - r)`` bool, preserved tokens that may receive information
            (candidates, further restricted by the filter, e.g. ToMe's B side).
        extras: per-token attributes ``(B, N - r)`` to store on the preserved tokens.
    """

    scores: Tensor
    discarded: Tensor
    preserved: Tensor
    targets: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def r(self) -> int:
        return self.discarded.shape[1]


@dataclass
class Correlation:
    """Output of a correlator. At most one of ``shares`` / ``fused`` is set.

    Attributes:
        matrix: ``(B, r, N - r)`` correlation ``C[i, j]`` between discarded token i and
            preserved token j (``-inf`` where j is not a target), or None.
        shares: ``(B, r, N - r)`` share ``alpha_ij`` of discarded token i sent to
            preserved token j; each row sums to 1 over the targets it chose. None means
            nothing is transferred (pruning, K = 0).
        fused: ``(B, r)`` weight of each discarded token in one new, appended token
            (EViT's convergent correlation).
    """

    matrix: Tensor | None = None
    shares: Tensor | None = None
    fused: Tensor | None = None


class Component:
    """Common base: name, stage, required signals, and parameter handling."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    #: Signals (see ``fico.signals``) the component reads from ``TokenState.signals``.
    requires: ClassVar[tuple[str, ...]] = ()
    #: BibTeX keys (``fico.citations``) of the methods the component comes from.
    cite: ClassVar[tuple[str, ...]] = ()

    def required_signals(self) -> set[str]:
        """Signals this configured instance needs (may depend on parameters)."""
        return set(self.requires)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{self.stage}:{self.name}({params})"


class Filter(Component):
    """Scores redundancy and splits the tokens into discarded S and preserved T."""

    stage: ClassVar[str] = "filter"

    def max_discard(self, num_tokens: int, num_candidates: int) -> int:
        """Most tokens one step can discard; a larger schedule is clipped to it."""
        return num_candidates

    def split(self, state: TokenState, r: int) -> Split:  # pragma: no cover - interface
        raise NotImplementedError


class Correlator(Component):
    """Relates each discarded token to the preserved ones."""

    stage: ClassVar[str] = "correlator"
    #: What :meth:`correlate` fills in: "nothing", "shares" or "fused".
    produces: ClassVar[str] = "shares"

    def correlate(self, state: TokenState, split: Split) -> Correlation:  # pragma: no cover
        raise NotImplementedError


class Compressor(Component):
    """Moves the discarded tokens' information into the preserved ones."""

    stage: ClassVar[str] = "compressor"
    #: Tokens a step appends (EViT's fused token): 0 or more.
    appends: ClassVar[int] = 0
    #: What the compressor needs from the correlator: "nothing", "shares" or "fused".
    consumes: ClassVar[str] = "nothing"

    def compress(self, state: TokenState, split: Split, correlation: Correlation) -> TokenState:  # pragma: no cover
        raise NotImplementedError


STAGES: dict[str, type[Component]] = {"filter": Filter, "correlator": Correlator, "compressor": Compressor}
