"""``fico eval``: the unreduced model and each recipe through lmms-eval, in one comparison table.

    fico eval RECIPE... --tasks T1,T2 [--model toy|embedded|DIR] [--budgets 4.2,3.3] [--tokens 192,128]
              [--limit N] [--batch-size B] [--include-path DIR] [--out DIR]

Each (configuration, task) cell runs lmms-eval's ``simple_evaluate`` in this process with
fico's lmms-eval model (:class:`fico.integrations.lmms_model.FicoLMM`) and the recipe
applied around every batch; the unreduced model is the same model with no recipe. A
finished cell is appended to ``OUT/results.jsonl`` with the conditions it ran under (the
model and its files, dtype, threads, versions, ``--limit``, the batch size, the toy tasks'
size or the ``--include-path`` folders' hash) and the hash of the recipe, so a rerun skips it (:mod:`fico.commands.results`). Then
``OUT/eval.json`` and ``OUT/eval.png`` (score against TFLOPs per method, per task: the
shape of the FiCoCo paper's Fig. 1) are written and the table printed: per task, each
configuration's score, its retention against the unreduced score, the TFLOPs of the
prefills that ran (from their recorded token counts) and the prefill time per prompt (a
question's choices share one prefill).

``fico_toy_vqa`` (answers generated) and ``fico_toy_vqa_mc`` (answers chosen by
log-likelihood) are fico's own tasks: their folders are written under ``OUT/tasks`` from
the toy's test images (nothing to download). Other tasks come from lmms-eval or from
``--include-path`` folders (``docs/evaluation.md``: stock tasks on local copies).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import statistics
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from ..errors import InputError
from ..integrations.lmms import TOY_IMAGES, TOY_TASKS, write_toy_task
from ..loading import load_recipe
from .console import Table
from .results import (append_result, conditions_key, measurement_conditions, read_results, recipe_digest, save_figure,
                      write_whole)
from .timing import Spread

UNREDUCED = "unreduced"
LMMS_MISSING = ("fico eval needs lmms-eval, which is not installed in this environment: run `make lmms` (it adds "
                "lmms-eval's pinned minimal set to .venv without replacing the CPU torch; docs/evaluation.md)")


def require_lmms() -> None:
    if importlib.util.find_spec("lmms_eval") is None:
        raise InputError(LMMS_MISSING)


def task_files_digest(folders: list[Path]) -> str:
    """A hash of the task files fico's and ``--include-path`` folders hold (YAML, Python,
    data), so results measured on other task files are not resumed."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def primary_metric(metrics: dict) -> tuple[str, float, float | None]:
    """The task's first metric (lmms-eval keeps the task's order): name, value, standard error."""
    for key, value in metrics.items():
        if key == "alias" or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        name, _, flt = key.partition(",")
        stderr = metrics.get(f"{name}_stderr,{flt}")
        return key, float(value), float(stderr) if isinstance(stderr, (int, float)) else None
    raise InputError(f"lmms-eval returned no numeric metric: {metrics}")


def evaluate(recipes: list[str], tasks: list[str], model: str = "toy", budgets: list[str] | None = None,
             tokens: list[str] | None = None, limit: int | None = None, batch_size: int = 8,
             include_paths: list[str] = (), out: str | Path | None = None, dtype: str = "float32",
             toy_images: int = TOY_IMAGES, convention: str = "llm-viewer", plugins: list[str] | None = None,
             threads: int | None = None, console: Console | None = None) -> dict:
    """Evaluate every (configuration, task) cell not yet in ``OUT/results.jsonl``; the report."""
    from ..cost.model import model_spec
    from ..models import model_source
    from .bench import expand

    require_lmms()
    console = console or Console()
    if not tasks:
        raise InputError("--tasks: name at least one task (fico_toy_vqa runs anywhere)")
    model_source(model)  # a bad --model is reported before anything runs
    names = expand(recipes, budgets, tokens)
    recipes_by_name = {name: load_recipe(name, plugins=plugins) for name in names}  # fail before running
    missing = [p for p in include_paths if not Path(p).is_dir()]
    if missing:
        raise InputError(f"--include-path {missing[0]}: no such directory")
    if threads is not None:
        torch.set_num_threads(threads)

    from importlib.metadata import version

    lmms_version = version("lmms-eval")

    toy = [t for t in tasks if t in TOY_TASKS]
    folders = [Path(p) for p in include_paths]
    # fico's toy tasks are a function of --toy-images; other task folders are hashed
    conditions = measurement_conditions(model, dtype, torch.get_num_threads(), limit=limit, batch_size=batch_size,
                                        toy_images=toy_images if toy else None,
                                        task_files=task_files_digest(folders) if folders else None,
                                        lmms_eval=lmms_version, convention=convention)
    out = Path(out) if out else Path(f"fico-eval-{Path(str(conditions['model'])).name}-{conditions_key(conditions)}")
    if toy:
        folders.append(out / "tasks")
        write_toy_task(out / "tasks", toy_images)
    results_path = out / "results.jsonl"
    done = read_results(results_path, conditions, "evaluation results")

    from lmms_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=[str(f) for f in folders] or None,
                               include_defaults=any(t not in TOY_TASKS for t in tasks))
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise InputError(f"--tasks: unknown task {unknown[0]!r} (fico's own: {', '.join(TOY_TASKS)}; others come "
                         f"from lmms-eval or an --include-path folder)")

    from ..models import check_recipes

    check_recipes(recipes_by_name.values(), model)  # before the weights load
    cells = [(configuration, task) for configuration in [UNREDUCED, *names] for task in tasks]
    records: dict[tuple[str, str], dict] = {}
    lm = None
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("evaluating", total=len(cells))
        for configuration, task in cells:
            label = f"{configuration} on {task}"
            digest = recipe_digest(recipes_by_name[configuration]) if configuration != UNREDUCED else UNREDUCED
            if (label, digest) in done:
                records[configuration, task] = done[label, digest]
                progress.advance(bar)
                continue
            progress.update(bar, description=label)
            if lm is None:
                lm = _model(model, dtype, batch_size, convention)
            recipe = None
            if configuration != UNREDUCED:
                recipe = recipes_by_name[configuration]
                if recipe.budget is not None:  # a budget names a model: solved on this one (as fico bench does)
                    recipe = load_recipe(configuration, plugins=plugins,
                                         budget_for=(model_spec(lm.model), recipe.budget.text_tokens))
            record = _evaluate_cell(lm, recipe, task, task_manager, limit, batch_size)
            record.update(cell=label, configuration=configuration, task=task, recipe_digest=digest,
                          budget=recipe.budget.as_dict() if recipe is not None and recipe.budget is not None else None)
            records[configuration, task] = append_result(results_path, record, conditions)
            progress.advance(bar)
    report = _report(records, [UNREDUCED, *names], tasks, model, conditions)
    write_whole(out / "eval.json", json.dumps(report, indent=2) + "\n")
    plot(report, out / "eval.png")
    report["out"] = str(out)
    return report


def _model(model: str, dtype: str, batch_size: int, convention: str):
    """One lmms-eval model for every cell: the recipe is set per cell, the weights load once."""
    from ..integrations.lmms_model import FicoLMM
    from ..models import load_model

    return FicoLMM(pretrained=model, dtype=dtype, batch_size=batch_size, convention=convention,
                   model=load_model(model, dtype, "sdpa"))


def _evaluate_cell(lm, recipe, task: str, task_manager, limit: int | None, batch_size: int) -> dict:
    from lmms_eval.evaluator import simple_evaluate

    lm.recipe, lm.statistics = recipe, []
    output = simple_evaluate(model=lm, tasks=[task], limit=limit, batch_size=batch_size, task_manager=task_manager,
                             log_samples=False)
    if output is None:
        raise InputError(f"lmms-eval returned no results for {task}")
    metrics = output["results"][task]
    metric, score, stderr = primary_metric(metrics)
    seen = [s for s in lm.statistics if s["task"] == task]
    if not seen:
        raise InputError(f"lmms-eval sent fico no request for {task}")
    return {"metric": metric, "score": score, "stderr": stderr,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "samples": len({s["doc_id"] for s in seen}), "requests": len(seen),
            "tflops": statistics.fmean(s["tflops"] for s in seen),
            "visual_tokens": statistics.fmean(s["visual_tokens"] for s in seen),
            "image_features": statistics.fmean(s["image_features"] for s in seen),
            "prefill_ms": prefill_ms([s["prefill_seconds"] for s in seen])}


def prefill_ms(seconds: list[float]) -> float | None:
    """Median prefill time in ms over the requests whose prefill was timed (None: none was)."""
    return Spread.of([s for s in seconds if s > 0]).scaled(1e3).median


def _report(records: dict, configurations: list[str], tasks: list[str], model: str, conditions: dict) -> dict:
    by_task = {}
    for task in tasks:
        base = records[UNREDUCED, task]["score"]
        rows = []
        for configuration in configurations:
            record = dict(records[configuration, task])
            record["retention"] = record["score"] / base if base else None
            for key in ("conditions", "conditions_key", "cell"):
                record.pop(key, None)
            rows.append(record)
        by_task[task] = rows
    return {"model": model, "conditions": conditions, "tasks": by_task}


def table(report: dict) -> list[Table]:
    """One table per task: score, retention, TFLOPs, prefill time, visual tokens."""
    tables = []
    for task, rows in report["tasks"].items():
        metric = rows[0]["metric"].split(",")[0]
        out = Table(title=f"{task} ({metric}, {rows[0]['samples']} samples) on {report['model']}")
        for column in ("configuration", "score", "retention", "TFLOPs", "prefill ms / prompt",
                       "visual tokens (layer avg)"):
            out.add_column(column, justify="left" if column == "configuration" else "right")
        for row in rows:
            score = f"{row['score']:.4f}" + (f" ± {row['stderr']:.4f}" if row.get("stderr") else "")
            retention = "-" if row["retention"] is None else f"{100 * row['retention']:.1f}%"
            name = row["configuration"]
            if row.get("budget") and not row["budget"].get("equal_cost", True):
                name += f" (not equal-cost: {100 * row['budget']['solved_fraction']:.0f}% of unreduced)"
            prefill = "unreadable" if row.get("prefill_ms") is None else f"{row['prefill_ms']:.1f}"
            out.add_row(name, score, retention, f"{row['tflops']:.4g}", prefill,
                        f"{row['visual_tokens']:.1f}")
        tables.append(out)
    return tables


def _method(row: dict) -> str:
    name = row["configuration"]
    return name.split("/")[-1].rsplit("_", 1)[0] if row.get("budget") or name.startswith("budgets/") else name


def plot(report: dict, path: Path) -> None:
    """Score against TFLOPs per method, one panel per task (±1 standard error where the task
    gives one); the unreduced score is a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    figure, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = report["tasks"][task]
        base = rows[0]
        methods: dict[str, list[dict]] = {}
        for row in rows[1:]:
            methods.setdefault(_method(row), []).append(row)
        for method, entries in methods.items():
            entries = sorted(entries, key=lambda e: e["tflops"])
            ax.errorbar([e["tflops"] for e in entries], [e["score"] for e in entries],
                        yerr=[e.get("stderr") or 0 for e in entries], marker="o", capsize=3, label=method)
        ax.axhline(base["score"], color="black", linestyle="--", linewidth=1, label=UNREDUCED)
        ax.axvline(base["tflops"], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"TFLOPs per prefill ({report['conditions'].get('convention', 'llm-viewer')}, what ran)")
        ax.set_ylabel(base["metric"].split(",")[0])
        ax.set_title(f"{task} on {report['model']}")
        ax.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path, dpi=120)
    plt.close(figure)


def main_eval(args, console: Console) -> int:
    budgets = [b.strip() for b in args.budgets.split(",")] if args.budgets else None
    tokens = [t.strip() for t in args.tokens.split(",")] if args.tokens else None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    report = evaluate(args.recipes, tasks, args.model, budgets, tokens, args.limit, args.batch_size,
                      args.include_path, args.out, args.dtype, args.toy_images, args.convention, args.plugin,
                      args.threads, console)
    for t in table(report):
        console.print(t)
    out = Path(report["out"])
    console.print(f"results: {out / 'results.jsonl'}\nJSON: {out / 'eval.json'}\nplot: {out / 'eval.png'}",
                  highlight=False)
    return 0


def main_toy_task(args, console: Console) -> int:
    require_lmms()
    for folder in write_toy_task(args.directory, args.images, args.first_image):
        console.print(f"wrote {folder}", highlight=False)
    console.print(f"use it with: --include_path {args.directory} --tasks {','.join(TOY_TASKS)}", highlight=False)
    return 0

