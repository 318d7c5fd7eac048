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

from .errors import RecipeError
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
        order: ``(B, N - r)`` sort key of the order in which the method emits the preserved
            tokens (ascending), or None for their original order. Used where the language
            model sees the sequence (``order: method`` at the vision_output and pre_llm sites).
    """

    scores: Tensor
    discarded: Tensor
    preserved: Tensor
    targets: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    order: Tensor | None = None

    @property
    def r(self) -> int:
        return self.discarded.shape[1]


@dataclass
class Correlation:
    """Output of a correlator.

    Attributes:
        matrix: ``(B, r, N - r)`` correlation ``C[i, j]`` between discarded token i and
            preserved token j (``-inf`` where j is not a target), or None.
        shares: ``(B, r, N - r)`` share ``alpha_ij`` of discarded token i sent to
            preserved token j (for most correlators each row sums to 1 over the targets it
            chose). None means nothing is transferred (pruning, K = 0).
        fused: ``(B, r)`` weight of each discarded token in one new, appended token
            (EViT's convergent correlation, PruMerge's extra token).
        preserved_shares: ``(B, N - r, N - r)`` weight ``w_jk`` with which preserved token j
            takes in preserved token k's state as it was before the step (PruMerge: a
            centre's neighbours may be other centres), or None.
        clusters: ``(B, r)`` index of the new token each discarded token joins (-1: none),
            for compressors that append one token per cluster (SparseVLM's recycling).
    """

    matrix: Tensor | None = None
    shares: Tensor | None = None
    fused: Tensor | None = None
    preserved_shares: Tensor | None = None
    clusters: Tensor | None = None


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
    #: True for a filter that chooses its own count (a step with ``keep: adaptive``).
    adaptive: ClassVar[bool] = False

    def max_discard(self, num_tokens: int, num_candidates: int) -> int:
        """Most tokens one step can discard; a larger schedule is clipped to it."""
        return num_candidates

    def discard(self, requested: int, num_tokens: int, num_candidates: int) -> int:
        """Tokens the step discards when its schedule asks for ``requested`` (the plan's count).

        The default clips to :meth:`max_discard`; a method whose own rule gives another count
        (DART's pivots add tokens on top of its budget) says so here, before anything runs.
        """
        return min(requested, self.max_discard(num_tokens, num_candidates))

    def planned_keep(self, num_candidates: int) -> int:
        """For ``keep: filter``: how many of ``num_candidates`` the filter's own rule keeps."""
        raise RecipeError(f"the filter {self.name!r} has no count rule of its own; give the step keep: N")

    def planned_keep_on(self, grids: tuple[tuple[int, int], ...]) -> int:
        """``planned_keep`` for candidates that lie on the parts ``grids`` (a family that gives an
        image several grids, such as LLaVA-NeXT's base and high-resolution ones); a filter whose
        count follows from the grid overrides it."""
        return self.planned_keep(sum(rows * cols for rows, cols in grids))

    def adaptive_keep(self, state: TokenState) -> int:  # pragma: no cover - interface
        """For ``adaptive`` filters: how many candidates to keep in ``state`` (one image)."""
        raise NotImplementedError

    def split(self, state: TokenState, r: int) -> Split:  # pragma: no cover - interface
        raise NotImplementedError


class Correlator(Component):
    """Relates each discarded token to the preserved ones."""

    stage: ClassVar[str] = "correlator"
    #: What :meth:`correlate` fills in: "nothing", "shares", "fused", "neighbours" or "clusters".
    produces: ClassVar[str] = "shares"

    def correlate(self, state: TokenState, split: Split) -> Correlation:  # pragma: no cover
        raise NotImplementedError


class Compressor(Component):
    """Moves the discarded tokens' information into the preserved ones."""

    stage: ClassVar[str] = "compressor"
    #: Tokens a step appends (EViT's fused token): 0 or more (see :meth:`appended`).
    appends: ClassVar[int] = 0
    #: What the compressor needs from the correlator: "nothing", "shares", "fused",
    #: "neighbours" (shares, preserved shares and a fused token) or "clusters".
    consumes: ClassVar[str] = "nothing"

    def appended(self, removed: int) -> int:
        """Tokens the step appends when it removes ``removed`` (0 when it removes none)."""
        return self.appends if removed else 0

    def compress(self, state: TokenState, split: Split, correlation: Correlation) -> TokenState:  # pragma: no cover
        raise NotImplementedError


STAGES: dict[str, type[Component]] = {"filter": Filter, "correlator": Correlator, "compressor": Compressor}
