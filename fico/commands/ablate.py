"""``fico ablate``: a grid of knob values and stage swaps, each cell measured, resumable.

    fico ablate RECIPE --grid key=v1,v2 [--grid filter=name1,name2] [--variants paper] [--out FILE]

Cells are the cross product of the grids (OmegaConf overrides; ``filter``, ``correlate``
and ``compress`` swap that stage of step 0 for a component with default parameters), or
the paper's named ablation variants. Each finished cell is appended to ``--out`` as one
JSON line with the conditions it was measured under (model and its files, images, dtype,
threads, versions) and the hash of the recipe it ran; a rerun skips a cell only when both
match, and refuses a results file written under other conditions.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from ..cost.model import recipe_cost
from ..errors import RecipeError
from ..loading import load_recipe
from ..recipe.overrides import override_list
from .console import Table
from .results import append_result, conditions_key, measurement_conditions, read_results, recipe_digest, save_figure

STAGE_KEYS = {"filter", "correlate", "compress"}


def split_values(text: str) -> list[str]:
    """``a,b,[1,2]`` -> ``["a", "b", "[1,2]"]`` (commas inside brackets or braces stay)."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    return [v.strip() for v in values if v.strip()]


def grid_cells(grids: list[str]) -> list[tuple[str, list[str]]]:
    """(label, overrides) for the cross product of ``key=v1,v2`` grids."""
    axes = []
    for grid in grids:
        key, sep, values = grid.partition("=")
        if not sep or not values:
            raise RecipeError(f"--grid {grid!r}: expected key=value1,value2,...")
        key = key.strip()
        stage = key.split(".")[-1] if key.split(".")[-1] in STAGE_KEYS else None
        prefix = key[: -len(stage)].rstrip(".") if stage else ""
        step = prefix.replace("step", "steps.") if prefix.startswith("step") and not prefix.startswith("steps") else prefix
        target = f"{step or 'steps.0'}.{stage}" if stage else key
        def override(value: str) -> str:
            if not stage:
                return f"{key}={value}"
            # a stage swap: a bare name gets the component's defaults, a mapping is used as is
            return f"{target}={value}" if value.startswith("{") else f"{target}={{name: {value}}}"

        axes.append([(f"{key}={v}", override(v)) for v in split_values(values)])
    cells = []
    for combination in itertools.product(*axes):
        cells.append((" ".join(label for label, _ in combination), [override for _, override in combination]))
    return cells


def measure(recipe, model_name: str, bm, images: int) -> dict:
    """Accuracy (toy) or fidelity (other models) of one configuration, plus its cost."""
    from .bench import answer_distribution

    out = {}
    if recipe is not None:
        cost = recipe_cost("llava-1.5-7b", recipe, text_tokens=60)
        out["tflops_llava_1_5_7b"] = cost.tflops
    if model_name == "toy":
        accuracy, logprobs, _ = answer_distribution(bm, recipe, images)
        out["accuracy"] = accuracy
        out["_logprobs"] = logprobs
    else:
        out["_logprobs"] = fidelity_logprobs(bm, recipe, images)
    return out


def fidelity_logprobs(bm, recipe, images: int) -> torch.Tensor:
    """Next-token log-probabilities on generated pictures (models without a test set)."""
    from contextlib import nullcontext

    from .. import apply, embedded

    from ..adapters import family_of

    question = "what is the color of the circle ?" if bm.name == "embedded" else "Describe the image."
    text = family_of(bm.model).prompt(question, 1, bm.processor)
    instruction = recipe.instruction_inputs([question]) if recipe is not None else {}
    rows = []
    with apply(bm.model, recipe) if recipe is not None else nullcontext():
        for seed in range(images):
            inputs = dict(bm.processor(images=[embedded.example_image(seed)], text=[text], return_tensors="pt"))
            rows.append(bm.model(**inputs, **instruction, logits_to_keep=1).logits[:, -1].float().log_softmax(-1))
    return torch.cat(rows)


def default_results_path(recipe_name: str, conditions: dict) -> Path:
    model = Path(str(conditions["model"])).name or "model"
    return Path(f"ablate-{recipe_name.replace('/', '_')}-{model}-{conditions_key(conditions)}.jsonl")


def ablate(recipe_name: str, grids: list[str], variants: str | None, model: str = "toy", images: int = 50,
           out: Path | None = None, console: Console | None = None, overrides: list[str] | str | None = None,
           plugins: list[str] | None = None, dtype: str = "float32", threads: int | None = None) -> list[dict]:
    """Measure every cell (resuming those ``out`` holds under the same conditions); the records in order.

    Args:
        overrides: applied to every cell before the cell's own overrides.
        plugins: local plugin files the recipe, the overrides and the grids may name.
    """
    from ..models import check_recipes, load_model, model_source
    from .ablations import paper_table
    from .bench import BenchModel

    console = console or Console()
    model_source(model)  # a bad --model is reported before anything runs
    if variants:
        if variants != "paper":
            raise RecipeError(f"--variants: only 'paper' (the paper's ablation table) is bundled, got {variants!r}")
        try:
            cells = paper_table(recipe_name)
        except KeyError as error:
            raise RecipeError(str(error.args[0])) from error
    else:
        cells = grid_cells(grids) if grids else [("recipe as is", [])]
    base_overrides = override_list(overrides)
    recipes = {label: load_recipe(recipe_name, base_overrides + cell, plugins=plugins)
               for label, cell in cells}  # fail before running
    if threads is not None:
        torch.set_num_threads(threads)
    conditions = measurement_conditions(model, dtype, torch.get_num_threads(), images=images)
    out = Path(out) if out else default_results_path(recipe_name, conditions)
    done = read_results(out, conditions, "ablation results")
    check_recipes(recipes.values(), model)
    model_obj, processor = load_model(model, dtype, "sdpa")
    bm = BenchModel(model, model_obj, processor, {})
    records = []
    with torch.inference_mode(), Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"ablating {recipe_name}", total=len(cells) + 1)
        base = measure(None, model, bm, images)
        progress.advance(task)
        for label, cell in cells:
            digest = recipe_digest(recipes[label])
            if (label, digest) in done:
                records.append(done[(label, digest)])
                progress.advance(task)
                continue
            result = measure(recipes[label], model, bm, images)
            logprobs = result.pop("_logprobs")
            record = {"cell": label, "recipe": recipe_name, "overrides": base_overrides + cell, "model": model,
                      "images": images, "questions": logprobs.shape[0], **result,
                      "answer_agreement": (logprobs.argmax(-1) == base["_logprobs"].argmax(-1)).float().mean().item(),
                      "kl": torch.nn.functional.kl_div(logprobs, base["_logprobs"], log_target=True,
                                                       reduction="batchmean").item(),
                      "recipe_digest": digest}
            if "accuracy" in result:
                record["accuracy_retention"] = result["accuracy"]["overall"] / base["accuracy"]["overall"]
                record["baseline_accuracy"] = base["accuracy"]["overall"]
                record["baseline_accuracies"] = base["accuracy"]
            else:
                record["baseline_accuracy"] = None
            records.append(append_result(out, record, conditions))
            progress.advance(task)
    console.print(f"results: {out}", highlight=False)
    return records


def summary(records: list[dict]) -> Table:
    first = records[0]
    table = Table(title=f"fico ablate {first['recipe']} ({first['model']}, {first['images']} images, "
                        f"{first.get('questions', '?')} questions)")
    toy = "accuracy" in first
    columns = ["cell", "TFLOPs (7B)"] + (["accuracy (±1 SE)", "retention"] if toy else []) + ["agreement", "KL"]
    kinds = [k for k in first["accuracy"] if k != "overall"] if toy else []
    columns[4:4] = kinds
    for column in columns:
        table.add_column(column, justify="right" if column != "cell" else "left")
    # the reference row has a value in every column: the unreduced cost, its accuracies
    reference = ["unreduced (reference)", f"{recipe_cost('llava-1.5-7b', None, text_tokens=60).tflops:.2f}"]
    if toy and first.get("baseline_accuracy") is not None:
        per_kind = first.get("baseline_accuracies") or {}  # files written before it was stored lack it
        reference += [f"{first['baseline_accuracy']:.3f}", "1.000",
                      *[f"{per_kind[k]:.2f}" if k in per_kind else "not stored" for k in kinds]]
        table.add_row(*reference, "1.000", "0", style="dim")
    elif not toy:
        table.add_row(*reference, "1.000", "0", style="dim")
    for r in records:
        row = [r["cell"], f"{r.get('tflops_llava_1_5_7b', 0):.2f}"]
        if toy:
            row += [f"{r['accuracy']['overall']:.3f} ± {_standard_error(r, 'accuracy'):.3f}",
                    f"{r['accuracy_retention']:.3f}"]
            row += [f"{r['accuracy'][k]:.2f}" for k in kinds]
        row += [f"{r['answer_agreement']:.3f}", f"{r['kl']:.4f}"]
        table.add_row(*row)
    return table


def _standard_error(record: dict, metric: str) -> float:
    value = record["accuracy"]["overall"] if metric == "accuracy" else record[metric]
    n = record.get("questions") or record.get("images") or 1
    return (value * (1 - value) / n) ** 0.5


def plot_title(records: list[dict]) -> str:
    """The recipe and the overrides every cell shares (those the grid does not vary)."""
    fixed = [o for o in records[0].get("overrides", []) if all(o in r.get("overrides", []) for r in records)]
    return " ".join([records[0]["recipe"], *fixed])


def plot(records: list[dict], grids: list[str], path: Path) -> None:
    """Bars for named variants, a line for one grid axis, a heat-map for two; accuracies (or
    agreement) carry one standard error, and the unreduced model is the reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric = "accuracy" if "accuracy" in records[0] else "answer_agreement"
    label = ("accuracy on the toy test questions" if metric == "accuracy"
             else "answer agreement with the unreduced model")
    value = [r["accuracy"]["overall"] if metric == "accuracy" else r[metric] for r in records]
    error = [_standard_error(r, metric) for r in records]
    reference = records[0].get("baseline_accuracy") if metric == "accuracy" else 1.0
    n = records[0].get("questions", "?")
    figure, ax = plt.subplots(figsize=(7.5, 0.45 * len(records) + 1.8) if len(grids) != 1 else (6.5, 4.2))
    if len(grids) == 2:
        first = split_values(grids[0].partition("=")[2])
        second = split_values(grids[1].partition("=")[2])
        grid = np.array(value).reshape(len(first), len(second))
        figure.set_size_inches(max(5.5, 1.3 * len(second) + 3), max(3.5, 0.8 * len(first) + 2))
        image = ax.imshow(grid, cmap="viridis", vmin=min(grid.min(), reference or grid.min()),
                          vmax=max(grid.max(), reference or grid.max()), aspect="auto")
        ax.set_xticks(range(len(second)), second, rotation=30 if max(map(len, second)) > 6 else 0, ha="right"
                      if max(map(len, second)) > 6 else "center")
        ax.set_yticks(range(len(first)), first)
        ax.set_xlabel(grids[1].partition("=")[0])
        ax.set_ylabel(grids[0].partition("=")[0])
        for (i, j), v in np.ndenumerate(grid):
            red, green, blue, _ = image.cmap(image.norm(v))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(j, i, f"{v:.3f}\n±{error[i * len(second) + j]:.3f}", ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
        bar = figure.colorbar(image, label=label)
        if reference is not None:
            bar.ax.axhline(reference, color="red", linewidth=2)
            bar.ax.text(1.05, reference, " unreduced", transform=bar.ax.get_yaxis_transform(), va="center",
                        fontsize=8, color="red")
    elif len(grids) == 1:
        labels = split_values(grids[0].partition("=")[2])
        ax.errorbar(range(len(labels)), value, yerr=error, marker="o", capsize=3, label="reduced")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(grids[0].partition("=")[0])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    else:
        cells = [r["cell"] for r in records][::-1]
        ax.barh(cells, value[::-1], xerr=error[::-1], capsize=3, color="tab:blue")
        ax.set_xlabel(label)
    if reference is not None and len(grids) != 2:
        line = ax.axvline if len(grids) == 0 else ax.axhline
        line(reference, color="red", linestyle="--", linewidth=1, label=f"unreduced ({reference:.3f})")
        ax.legend(fontsize=8, loc="lower right")
    unreduced = f", unreduced {reference:.3f}" if reference is not None and len(grids) == 2 else ""
    ax.set_title(f"fico ablate {plot_title(records)} on {records[0]['model']} ({n} questions; ±1 SE{unreduced})",
                 fontsize=10)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)
    plt.close(figure)
