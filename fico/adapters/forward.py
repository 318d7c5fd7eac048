"""What one forward pass of a model carries from its vision side to its decoder."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ForwardPass:
    """The state of one forward of the model (or one ``generate``: its image encoding and the
    prefill that uses it), created when the forward begins and dropped when it ends.

    Attributes:
        image_patches: the patch cell of every visual token reaching the language model,
            images in the order the model places them, or None (each image's tokens are its
            unreduced patches in order).
        inside_model: the language model's forward has begun (a vision tower that runs now
            is part of it, not called on its own).
        visual_layout: ``(V, 4)`` the layout entry (:mod:`fico.layout`) of every visual token
            reaching the language model, in the same order, where the family gives one (images
            with several parts); None: ``image_patches`` on one grid.
        visual_grids: each part's ``(rows, cols)`` for ``visual_layout`` (the largest over the
            batch's images, which keeps window indices distinct).
        protected_visual: ``(V,)`` bool, visual tokens no step may discard or merge (LLaVA-NeXT's
            row newlines), or None.
    """

    image_patches: Tensor | None = None
    inside_model: bool = False
    visual_layout: Tensor | None = None
    visual_grids: tuple[tuple[int, int], ...] | None = None
    protected_visual: Tensor | None = None


class ForwardPasses:
    """The pass in flight, shared by the sites of one applied recipe (handed to each of them
    when the adapter attaches; never a global)."""

    def __init__(self):
        self.current: ForwardPass | None = None

    def ensure(self) -> ForwardPass:
        """The pass in flight, begun now if none is."""
        if self.current is None:
            self.current = ForwardPass()
        return self.current

    def end(self) -> None:
        self.current = None

    @property
    def inside_model(self) -> bool:
        return self.current is not None and self.current.inside_model
