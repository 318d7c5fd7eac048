"""The FLOPs counting conventions ``fico cost``, ``bench`` and ``eval`` take, by name.

Kept apart from :mod:`fico.cost` (which needs torch through the recipe machinery) so that
the command line can offer them as choices without loading torch.

Their formulas are in :mod:`fico.cost` and docs/cost.md.
"""

CONVENTIONS = ("llm-viewer", "full", "mac2", "mac3", "mac2-image", "mac3-image")
#: the multiply-accumulate conventions: (FFN matrices, image tokens only)
MAC_CONVENTIONS = {"mac2": (2, False), "mac3": (3, False), "mac2-image": (2, True), "mac3-image": (3, True)}
