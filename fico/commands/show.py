"""``fico show``: where the discarded tokens' information went, drawn on the image.

One panel per reducing layer (evenly chosen if there are many): the patches discarded at
that step are shaded, with a line to the patch that received most of each one's
information (a cross where it was pruned); and a last panel colouring every patch by the
surviving token that holds it (black: pruned). Like FiCoCo's Fig. 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .results import save_figure


#: sites whose steps number the same original tokens (provenance columns)
SITE_GROUPS = {"vision": "vision", "vision_output": "vision", "pre_llm": "pre_llm", "llm": "llm", "llm_mid": "llm"}


def provenance_panels(trace) -> list[dict]:
    """For each step with provenance: moves (cell -> cell or None) on the first image's grid
    and the final owner map. Each token's cell is its layout entry (image, part, row, column)
    as the step's site recorded it: the first sample's first image, its own grid (part 0)."""
    panels = []
    cells: dict[str, dict[int, int]] = {}  # site group -> original position -> cell
    for step in trace.steps:
        if step.sources is None or step.layout_in is None:
            continue
        rows, cols = step.grids[0]
        known = cells.setdefault(SITE_GROUPS[step.site], {})
        for position, (image, part, row, column) in zip(step.positions_in[0].tolist(), step.layout_in[0].tolist()):
            if position >= 0 and image == 0 and part == 0 and row >= 0:
                known.setdefault(position, row * cols + column)
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


def draw(image, panels: list[dict], path: Path, title: str, max_panels: int = 5) -> int:
    """Draw at most ``max_panels`` of the reducing steps (evenly spaced, first and last
    included) and the kept-token map, on each panel's grid; the title says how many were left
    out. Returns the number drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("the recipe reduced nothing on this input: nothing to draw")
    chosen = panels if len(panels) <= max_panels else [panels[round(i * (len(panels) - 1) / (max_panels - 1))]
                                                       for i in range(max_panels)]
    rows, cols = panels[-1]["grid"]
    width, height = image.size[0] / cols, image.size[1] / rows
    figure, axes = plt.subplots(1, len(chosen) + 1, figsize=(3.2 * (len(chosen) + 1), 3.6))
    centre = lambda p: ((p % cols + 0.5) * width, (p // cols + 0.5) * height)  # noqa: E731
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
        ax.set_title(f"{panel['site']} layer {panel['layer']}: -{len(panel['moves'])}", fontsize=9)
        ax.axis("off")
    owner = chosen[-1]["owner"] if len(chosen) == len(panels) else panels[-1]["owner"]
    rng = np.random.default_rng(0)
    palette = rng.uniform(0.15, 1.0, size=(owner.max() + 2, 3))
    colours = np.where(owner[:, None] >= 0, palette[owner.clip(0)], 0.0).reshape(rows, cols, 3)
    axes[-1].imshow(np.asarray(image.resize((cols, rows))) / 255.0 * 0.35 + colours * 0.65, interpolation="nearest")
    axes[-1].set_title(f"kept-token map ({panels[-1]['tokens_out']} tokens)", fontsize=9)
    axes[-1].axis("off")
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
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(figure, path, dpi=110)
    plt.close(figure)
    return len(chosen)


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
    panels = provenance_panels(run.trace)
    path = Path(out)
    drawn = draw(image.resize((336, 336)), panels, path, f"{recipe.name}: where discarded tokens went", max_panels)
    return path, drawn, len(panels)
