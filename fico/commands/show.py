"""``fico show``: where the discarded tokens' information went, drawn on the image.

One panel per reducing layer (evenly chosen if there are many): the patches discarded at
that step are shaded, with a line to the patch that received most of each one's
information (a cross where it was pruned); and a last panel colouring every patch by the
surviving token that holds it (black: pruned). Like FiCoCo's Fig. 3. An image with several
parts (LLaVA-NeXT's base image and high-resolution grid) gets one row of panels per part,
each on its own grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .results import save_figure


#: sites whose steps number the same original tokens (provenance columns)
SITE_GROUPS = {"vision": "vision", "vision_output": "vision", "pre_llm": "pre_llm", "llm": "llm", "llm_mid": "llm"}


def image_parts(trace) -> list[int]:
    """The parts of the first image that some step with provenance recorded (0: the image; a
    family with high-resolution crops adds 1)."""
    parts = set()
    for step in trace.steps:
        if step.sources is not None and step.layout_in is not None:
            layout = step.layout_in[0]
            parts |= {int(p) for p in layout[(layout[:, 0] == 0) & (layout[:, 2] >= 0), 1].unique()}
    return sorted(parts)


def provenance_panels(trace, part: int = 0) -> list[dict]:
    """For each step with provenance: moves (cell -> cell or None) on the first image's grid
    and the final owner map. Each token's cell is its layout entry (image, part, row, column)
    as the step's site recorded it: the first sample's first image, on the grid of ``part``."""
    panels = []
    cells: dict[str, dict[int, int]] = {}  # site group -> original position -> cell
    for step in trace.steps:
        if step.sources is None or step.layout_in is None or part >= len(step.grids):
            continue
        rows, cols = step.grids[part]
        known = cells.setdefault(SITE_GROUPS[step.site], {})
        for position, (image, at, row, column) in zip(step.positions_in[0].tolist(), step.layout_in[0].tolist()):
            if position >= 0 and image == 0 and at == part and row >= 0:
                known.setdefault(position, row * cols + column)
        if not known:
            continue
        sources = step.sources[0]  # first sample / image
        after = step.positions_out[0].tolist()
        moves = []
        for pos in step.discarded[0]:
            if pos not in known:
                continue
            weights = sources[:, pos]
            target = int(weights.argmax())
            destination = after[target] if float(weights[target]) > 0 else None
            moves.append((known[pos], known.get(destination) if destination is not None else None))
        owner = np.full(rows * cols, -1)
        columns = list(known)
        absorbed = sources[:, columns]  # (tokens, cells)
        best = absorbed.max(0)
        held = best.values.numpy() > 0
        owner[np.array(list(known.values()))[held]] = best.indices.numpy()[held]
        panels.append({"site": step.site, "layer": step.layer, "moves": moves, "owner": owner,
                       "tokens_out": step.tokens_out, "grid": (rows, cols)})
    return panels


def draw(image, panels: list[dict] | list[list[dict]], path: Path, title: str, max_panels: int = 5,
         part_names: list[str] | None = None) -> int:
    """Draw at most ``max_panels`` of the reducing steps (evenly spaced, first and last
    included) and the kept-token map, on each panel's grid; the title says how many were left
    out. ``panels`` is one list, or one list per part of the image (a row each, named by
    ``part_names``). Returns the number drawn (of the first part)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_part = [p for p in (panels if panels and isinstance(panels[0], list) else [panels]) if p]
    if not by_part:
        raise ValueError("the recipe reduced nothing on this input: nothing to draw")
    chosen_by_part = [part if len(part) <= max_panels else
                      [part[round(i * (len(part) - 1) / (max_panels - 1))] for i in range(max_panels)]
                      for part in by_part]
    columns = max(len(c) for c in chosen_by_part) + 1
    figure, grid = plt.subplots(len(by_part), columns, figsize=(3.2 * columns, 3.6 * len(by_part)), squeeze=False)
    for row_index, (panels, chosen) in enumerate(zip(by_part, chosen_by_part)):
        name = part_names[row_index] if part_names and len(by_part) > 1 else None
        _draw_part(plt, image, panels, chosen, list(grid[row_index]), name)
    panels, chosen = by_part[0], chosen_by_part[0]
    if len(chosen) < len(panels):
        title += (f"\nshowing {len(chosen)} of {len(panels)} reducing steps (layers "
                  f"{', '.join(str(p['layer']) for p in chosen)}; --panels {len(panels)} draws all)")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    legend = [Patch(color="black", alpha=0.45, label="discarded at this step"),
              Line2D([], [], color="orange", lw=1, label="merged into the kept token it points to"),
              Line2D([], [], color="red", marker="x", lw=0, markersize=5, label="dropped (its information is lost)"),
              Patch(color=(0.6, 0.4, 0.8), label="map: each patch coloured by the kept token holding most of it")]
    figure.legend(handles=legend, loc="lower center", ncol=4, fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.07 / len(by_part), 1, 1))
    save_figure(figure, path, dpi=110)
    plt.close(figure)
    return len(chosen)


def _draw_part(plt, image, panels: list[dict], chosen: list[dict], axes: list, name: str | None) -> None:
    """One row: the chosen steps' moves and the kept-token map, on the part's own grid."""
    rows, cols = panels[-1]["grid"]
    width, height = image.size[0] / cols, image.size[1] / rows
    centre = lambda p: ((p % cols + 0.5) * width, (p // cols + 0.5) * height)  # noqa: E731
    for ax in axes[len(chosen):-1]:
        ax.axis("off")
    axes = axes[:len(chosen)] + axes[-1:]
    prefix = f"{name}, " if name else ""
    for ax, panel in zip(axes, chosen):
        ax.imshow(image)
        for source, target in panel["moves"]:
            x, y = centre(source)
            ax.add_patch(plt.Rectangle((x - width / 2, y - height / 2), width, height, color="black", alpha=0.45,
                                       lw=0))
            if target is None:
                ax.plot([x], [y], marker="x", color="red", markersize=3)
            else:
                tx, ty = centre(target)
                ax.plot([x, tx], [y, ty], color="orange", lw=0.6)
        ax.set_title(f"{prefix}{panel['site']} layer {panel['layer']}: -{len(panel['moves'])}", fontsize=9)
        ax.axis("off")
    owner = chosen[-1]["owner"] if len(chosen) == len(panels) else panels[-1]["owner"]
    rng = np.random.default_rng(0)
    palette = rng.uniform(0.15, 1.0, size=(owner.max() + 2, 3))
    colours = np.where(owner[:, None] >= 0, palette[owner.clip(0)], 0.0).reshape(rows, cols, 3)
    axes[-1].imshow(np.asarray(image.resize((cols, rows))) / 255.0 * 0.35 + colours * 0.65, interpolation="nearest")
    axes[-1].set_title(f"{prefix}kept-token map ({panels[-1]['tokens_out']} tokens)", fontsize=9)
    axes[-1].axis("off")


def show(recipe, model: str = "toy", image_path: str | None = None, seed: int = 0, out: str = "fico-show.png",
         max_panels: int = 5) -> tuple[Path, int, int]:
    """Run ``recipe`` on one image with provenance and draw it to ``out``. Returns the path,
    the reducing steps drawn and how many there were."""
    from PIL import Image

    from .. import apply
    from ..adapters import family_of
    from ..models import check_recipes, load_model
    from ..toy.data import TEST_SEEDS, example

    check_recipes([recipe], model)
    model_obj, processor = load_model(model, "float32", "sdpa")
    if image_path:
        image = Image.open(image_path).convert("RGB").resize((336, 336))
        question = "what digit is written ?" if model == "toy" else "Describe."
    else:
        ex = example(TEST_SEEDS.start + seed)
        image, question = ex.image, ex.questions[0].text
    text = family_of(model_obj).prompt(question, 1, processor)
    inputs = dict(processor(images=[image], text=[text], return_tensors="pt"))
    with torch.inference_mode(), apply(model_obj, recipe, provenance=True) as run:
        model_obj(**inputs, logits_to_keep=1)
    parts = image_parts(run.trace) or [0]
    panels = [provenance_panels(run.trace, part) for part in parts]
    names = ["base image" if part == 0 else "high-resolution grid" for part in parts]
    path = Path(out)
    drawn = draw(image.resize((336, 336)), panels, path, f"{recipe.name}: where discarded tokens went", max_panels,
                 names)
    return path, drawn, len(panels[0])
