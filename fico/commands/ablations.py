"""The paper's ablation tables as named variants (FiCoCo Tables 2 and 4, ``docs/ficoco.md``).

Each variant is a list of overrides on the recipe; ``fico ablate ficoco_v --variants paper``
runs them all. No variant needs code of its own: each is a knob change or a stage swap.
"""

PAPER_TABLES = {
    "ficoco_v": [  # Table 2
        ("FiCoCo-V (full)", []),
        ("w/o vision-aware redundancy", ["lambda=0"]),
        ("w/o semantic-aware redundancy", ["lambda=1"]),
        ("w/o local penalty", ["c=1"]),
        ("fixed K = 0 (pruning)", ["steps.0.correlate.k=0"]),
        ("fixed K = 1", ["steps.0.correlate.k=1"]),
        ("fixed K = 2", ["steps.0.correlate.k=2"]),
        ("convergent correlation", ["steps.0.correlate={name: convergent, signal: cls_attention}",
                                    "steps.0.compress=fuse"]),
        ("average compression", ["steps.0.compress.weighting=uniform"]),
    ],
    "ficoco_l": [  # Table 4
        ("FiCoCo-L (full)", []),
        ("w/o vision-aware redundancy", ["beta=0"]),
        ("w/o task-aware redundancy", ["beta=1"]),
        ("w/ local penalty", ["steps.0.filter.c=2"]),
        ("w/o indirect correlation", ["gamma=1"]),
        ("w/o direct correlation", ["gamma=0"]),
        ("fixed K = 0", ["steps.0.correlate.k=0"]),
        ("fixed K = 1", ["steps.0.correlate.k=1"]),
        ("fixed K = 2", ["steps.0.correlate.k=2"]),
        ("convergent correlation", ["steps.0.correlate={name: convergent, signal: text_attention}",
                                    "steps.0.compress=fuse"]),
        ("average compression", ["steps.0.compress.weighting=uniform"]),
    ],
}


def paper_table(recipe_name: str) -> list[tuple[str, list[str]]]:
    """The ablation variants of the paper's table for ``recipe_name`` (its budget variants too)."""
    base = recipe_name.split("/")[-1]
    for method in ("ficoco_v", "ficoco_l"):
        if base == method or base.startswith(method + "_"):
            return PAPER_TABLES[method]
    raise KeyError(f"the paper has ablation tables for ficoco_v and ficoco_l, not {recipe_name!r}")
