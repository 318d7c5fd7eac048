"""``fico leaderboard``: every bundled method on fico-toy at equal budgets, with standard errors.

Each bundled method runs at each visual-token budget it has a variant for
(``budgets/NAME_192``, ``_128``, ``_64``: the field's protocol), at each of the FiCoCo paper's
FLOPs budgets it has one for (``budgets/NAME_1.5t`` ... ``_4.2t``: LLaVA-1.5-7B's TFLOPs,
solved on the toy for the same fraction of its unreduced cost), or, with neither, at its own
defaults (PruMerge's adaptive count). A configuration the toy cannot run (a budget its depth
cannot reach) is checked against the config first and listed with the reason. Every other
configuration answers the same toy test questions (six per image); per configuration:

- accuracy per question type and overall;
- **retention**: the field's "relative accuracy", :math:`\\frac{1}{6}\\sum_t a_t / a^0_t` over
  the question types t, against the unreduced model's :math:`a^0_t`;
- **agreement**: the share of questions answered as the unreduced model answers them;
- the prefill's FLOPs (the cost model on the token counts a prefill recorded).

Standard errors come from a paired bootstrap over images (every configuration and the
unreduced model resampled with the same images, a question's six siblings together), so a
difference between two methods has its own error: the report says which methods trail the
best of their budget, and which beat random pruning, by more than two standard errors.
"""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import RecipeError

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

TOKEN_BUDGETS = ("192", "128", "64")
FLOPS_BUDGETS = ("1.5", "2.4", "3.3", "4.2")
BOOTSTRAP = 1000  # resamples of the test images
SEPARATED = 2.0  # a difference is reported when above this many standard errors


@dataclass(frozen=True)
class Configuration:
    method: str  # the bundled recipe
    budget: str  # "192", "1.5t", or "default"
    recipe: str  # what runs: the budget variant or the method


def configurations(methods: list[str], tokens: list[str], flops: list[str]) -> list[Configuration]:
    """Each method at each of its budget variants among ``tokens`` and ``flops`` (TFLOPs), or at
    its defaults where it has none of them."""
    from ..recipe import bundled_recipes

    bundled = set(bundled_recipes())
    out = []
    for method in methods:
        if method not in bundled:
            raise RecipeError(f"fico leaderboard: {method!r} is not a bundled recipe")
        variants = [Configuration(method, t, f"budgets/{method}_{t}") for t in tokens
                    if f"budgets/{method}_{t}" in bundled]
        variants += [Configuration(method, f"{f}t", f"budgets/{method}_{f}t") for f in flops
                     if f"budgets/{method}_{f}t" in bundled]
        out += variants or [Configuration(method, "default", method)]
    return out


def bundled_methods() -> list[str]:
    from ..recipe import bundled_recipes

    return [name for name in bundled_recipes() if "/" not in name]


def test_questions(images: int, first: int = 0):
    """The toy's test set: images, question texts, answers, one row per image of six."""
    from ..toy.data import TEST_SEEDS, example

    pictures, questions, answers = [], [], []
    for seed in range(TEST_SEEDS.start + first, TEST_SEEDS.start + first + images):
        ex = example(seed)
        for q in ex.questions:
            pictures.append(ex.image)
            questions.append(q.text)
            answers.append(q.answer)
    return pictures, questions, answers


def answers_of(model, processor, recipe, pictures, questions) -> tuple[torch.Tensor, object]:
    """The answer token of every question (greedy, one word), and the trace of one prefill."""
    from contextlib import nullcontext

    from .. import apply
    from ..toy.evaluate import answer_logits

    with torch.inference_mode(), apply(model, recipe) if recipe is not None else nullcontext() as run:
        guesses = answer_logits(model, processor, pictures, questions, recipe=recipe).argmax(-1)
        trace = None
        if run is not None:  # the prefill of the first question, for its cost
            answer_logits(model, processor, pictures[:1], questions[:1], recipe=recipe)
            trace = run.trace
    return guesses, trace


def retention(correct: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Mean over question types of accuracy / the unreduced accuracy; ``correct`` and ``base``
    are ``(..., images, types)``. A type the unreduced model answers no question of right (in
    a small or resampled set) has no ratio and is left out of that mean."""
    reference = base.float().mean(-2)
    defined = reference > 0
    ratios = torch.where(defined, correct.float().mean(-2) / reference.clamp_min(1e-9), 0.0)
    return ratios.sum(-1) / defined.sum(-1).clamp_min(1)


def leaderboard(methods: list[str] | None = None, tokens: list[str] = TOKEN_BUDGETS,
                flops: list[str] = FLOPS_BUDGETS, images: int = 300, threads: int = 2, model: str = "toy",
                console: "Console | None" = None) -> dict:
    """Run every configuration on the toy's first ``images`` test images; the JSON-ready report."""
    from dataclasses import replace

    from rich.progress import Progress

    from ..adapters import check_recipe
    from ..cost.model import TokenCounts, model_spec, prefill_cost
    from ..loading import load_recipe
    from ..models import load_model
    from ..toy.data import QUESTION_TYPES, prompt

    if model != "toy":
        raise RecipeError("fico leaderboard: the leaderboard is measured on fico-toy (--model toy)")
    torch.set_num_threads(threads)
    chosen = configurations(methods or bundled_methods(), list(tokens), list(flops))
    network, processor = load_model("toy")
    spec = replace(model_spec(network), name="toy")
    pictures, questions, truths = test_questions(images)
    truth = torch.tensor(processor.tokenizer.convert_tokens_to_ids(truths))
    first = processor(images=pictures[:1], text=[prompt(questions[0])], return_tensors="pt")["input_ids"]
    text_tokens = first.shape[1] - spec.patches  # the first question's prompt, whose prefill is costed
    recipes, refused = {}, []
    for c in chosen:
        try:
            recipe = load_recipe(c.recipe, budget_for=(spec, text_tokens))
            check_recipe(recipe, network.config)
        except RecipeError as error:
            refused.append({"method": c.method, "budget": c.budget, "recipe": c.recipe, "reason": _reason(str(error))})
            continue
        recipes[c] = recipe
    types = len(QUESTION_TYPES)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("leaderboard", total=len(recipes) + 1)
        base_guess, _ = answers_of(network, processor, None, pictures, questions)
        progress.advance(task)
        runs = {}
        for configuration, recipe in recipes.items():
            guesses, trace = answers_of(network, processor, recipe, pictures, questions)
            runs[configuration] = (guesses, trace)
            progress.advance(task)
    base_correct = (base_guess == truth).view(images, types)
    unreduced_counts = TokenCounts.unreduced(spec, text_tokens)
    unreduced_cost = prefill_cost(spec, unreduced_counts, "full").tflops
    unreduced_language = prefill_cost(spec, unreduced_counts, "llm-viewer").tflops
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(images, (BOOTSTRAP, images), generator=generator)  # shared: the errors are paired

    def resampled(x):  # (images, types) -> (BOOTSTRAP, images, types)
        return x[index]

    base_boot = resampled(base_correct)
    entries, boot_retention = [], {}
    for configuration, (guesses, trace) in runs.items():
        correct = (guesses == truth).view(images, types)
        agree = (guesses == base_guess).view(images, types)
        correct_boot = resampled(correct)
        boot = retention(correct_boot, base_boot)
        boot_retention[configuration] = boot
        counts = TokenCounts.from_trace(trace, spec)
        cost = prefill_cost(spec, counts, "full").tflops
        language_cost = prefill_cost(spec, counts, "llm-viewer").tflops
        accuracy = {kind: correct[:, i].float().mean().item() for i, kind in enumerate(QUESTION_TYPES)}
        accuracy["overall"] = correct.float().mean().item()
        accuracy_se = {kind: correct_boot[..., i].float().mean(-1).std().item()
                       for i, kind in enumerate(QUESTION_TYPES)}
        accuracy_se["overall"] = correct_boot.float().mean((-1, -2)).std().item()
        recipe = recipes[configuration]
        entries.append({
            "method": configuration.method, "budget": configuration.budget, "recipe": configuration.recipe,
            "tflops": cost, "flops_fraction": cost / unreduced_cost,
            # the paper's budgets count the language model alone (LLM-Viewer): the fraction they solve for
            "llm_flops_fraction": language_cost / unreduced_language,
            "visual_tokens": trace.vision_features if trace is not None else None,
            "equivalent_tokens": trace.equivalent_tokens() if trace is not None and trace.visual else None,
            "accuracy": accuracy, "accuracy_se": accuracy_se,
            "retention": retention(correct, base_correct).item(), "retention_se": boot.std().item(),
            "agreement": agree.float().mean().item(),
            "agreement_se": resampled(agree).float().mean((-1, -2)).std().item(),
            "solved": recipe.budget.as_dict() if recipe.budget is not None else None,
        })
    _compare(entries, boot_retention, runs)
    base_accuracy = {kind: base_correct[:, i].float().mean().item() for i, kind in enumerate(QUESTION_TYPES)}
    base_accuracy["overall"] = base_correct.float().mean().item()
    return {
        "model": "toy", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {threads} threads, torch {torch.__version__}, CPU",
        "images": images, "questions": images * types, "bootstrap": BOOTSTRAP,
        "baseline": {"accuracy": base_accuracy, "tflops": unreduced_cost,
                     "accuracy_se": resampled(base_correct).float().mean((-1, -2)).std().item()},
        "results": entries, "refused": refused,
    }


def _compare(entries: list[dict], boot: dict, runs: dict) -> None:
    """Per budget: each method's retention against the best one's and random pruning's there,
    with the paired bootstrap's error of the difference."""
    ran = list(runs)
    by_budget: dict[str, list[int]] = {}
    for i, c in enumerate(ran):
        by_budget.setdefault(c.budget, []).append(i)
    for members in by_budget.values():
        best = max(members, key=lambda i: entries[i]["retention"])
        random = next((i for i in members if ran[i].method == "random"), None)
        for i in members:
            for label, other in (("vs_best", best), ("vs_random", random)):
                if other is None or other == i:
                    continue
                difference = boot[ran[i]] - boot[ran[other]]
                delta = entries[i]["retention"] - entries[other]["retention"]
                se = difference.std().item()
                entries[i][label] = {"against": ran[other].method, "difference": delta, "se": se,
                                     "separated": abs(delta) > SEPARATED * se}


def _cell(value: float, se: float) -> str:
    return f"{value:.3f} ± {se:.3f}"


def budget_order(budget: str) -> tuple:
    if budget == "default":
        return (2, 0.0)
    if budget.endswith("t"):
        return (1, -float(budget[:-1]))
    return (0, -float(budget))


def rows(report: dict) -> list[list[str]]:
    from ..toy.data import QUESTION_TYPES

    out = []
    for e in sorted(report["results"], key=lambda e: (budget_order(e["budget"]), -e["retention"])):
        notes = []
        if "vs_best" in e and e["vs_best"]["separated"]:
            notes.append(f"below {e['vs_best']['against']} ({e['vs_best']['difference']:+.3f} ± "
                         f"{e['vs_best']['se']:.3f})")
        if "vs_random" in e and e["vs_random"]["separated"]:
            word = "above" if e["vs_random"]["difference"] > 0 else "below"
            notes.append(f"{word} random ({e['vs_random']['difference']:+.3f} ± {e['vs_random']['se']:.3f})")
        out.append([e["budget"], e["method"], f"{e['llm_flops_fraction']:.3f}", f"{e['flops_fraction']:.3f}",
                    *[f"{e['accuracy'][t]:.2f}" for t in QUESTION_TYPES],
                    _cell(e["accuracy"]["overall"], e["accuracy_se"]["overall"]),
                    _cell(e["retention"], e["retention_se"]), _cell(e["agreement"], e["agreement_se"]),
                    "; ".join(notes) or "-"])
    return out


COLUMNS = ["budget", "method", "LLM FLOPs / unreduced", "all FLOPs / unreduced", "color", "shape", "count", "exists", "position", "digit",
           "overall ± SE", "retention ± SE", "agreement ± SE", "separated by > 2 SE"]


def markdown(report: dict, command: str) -> str:
    base = report["baseline"]
    lines = ["<!-- leaderboard:toy:begin -->",
             f"Measured {report['date']} on {report['machine']}: fico-toy on its first {report['images']} test images "
             f"({report['questions']} questions); standard errors from {report['bootstrap']} paired bootstrap "
             f"resamples of the images. By:", "", f"    {command}", "",
             f"Unreduced: overall {_cell(base['accuracy']['overall'], base['accuracy_se'])}, "
             + ", ".join(f"{k} {v:.2f}" for k, v in base["accuracy"].items() if k != "overall") + ".", "",
             "| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 3) + "---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(report)]
    worst = max(e["retention_se"] for e in report["results"])
    lines += ["", f"The largest standard error of a retention is {worst:.3f}."]
    if report.get("refused"):
        lines += ["", "Not run on fico-toy (refused before running, with fico's reason):", ""]
        lines += [f"- {r['recipe']}: {r['reason']}" for r in report["refused"]]
    lines += ["<!-- leaderboard:toy:end -->"]
    return "\n".join(lines)


def _reason(message: str) -> str:
    """A refusal without the recipe file's absolute path (it names the machine, not the reason)."""
    head, colon, rest = message.partition(".yaml: ")
    return rest if colon else message


def plot(report: dict, path: Path) -> None:
    """Accuracy against the prefill's FLOPs per method (±1 SE), the FiCoCo paper's Fig. 1 shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .results import save_figure

    figure, ax = plt.subplots(figsize=(9, 5.5))
    methods: dict[str, list[dict]] = {}
    for entry in report["results"]:
        methods.setdefault(entry["method"], []).append(entry)
    colours = matplotlib.colormaps["tab20"].colors  # 20 methods: the default cycle of 10 repeats colours
    for index, (method, entries) in enumerate(sorted(methods.items())):
        entries = sorted(entries, key=lambda e: e["tflops"])
        ax.errorbar([e["tflops"] * 1e3 for e in entries], [e["accuracy"]["overall"] for e in entries],
                    yerr=[e["accuracy_se"]["overall"] for e in entries], marker="os^Dv<>ph"[index % 9], capsize=3,
                    label=method, linestyle="-" if len(entries) > 1 else "none",
                    color=colours[(2 * index + index // 10) % len(colours)])
    base = report["baseline"]
    ax.axhline(base["accuracy"]["overall"], color="black", linestyle="--", linewidth=1, label="unreduced")
    ax.axvline(base["tflops"] * 1e3, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("prefill GFLOPs on fico-toy (cost model, full convention)")
    ax.set_ylabel(f"toy test accuracy (±1 SE, {report['questions']} questions)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("fico leaderboard: every bundled method at equal budgets", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path, dpi=120)
    plt.close(figure)


def main_leaderboard(args, console: "Console") -> int:
    from .bench import write_markdown
    from .console import Table
    from .results import write_whole

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    tokens = [t.strip() for t in args.tokens.split(",") if t.strip()] if args.tokens else []
    flops = [f.strip().removesuffix("t") for f in args.flops.split(",") if f.strip()] if args.flops else []
    report = leaderboard(methods, tokens, flops, args.images, args.threads, args.model, console)
    table = Table(title=f"fico-toy at equal budgets ({report['questions']} questions)")
    for column in COLUMNS:
        table.add_column(column)
    for row in rows(report):
        table.add_row(*row)
    console.print(table)
    for r in report["refused"]:
        console.print(f"not run: {r['recipe']}: {r['reason']}")
    if args.json:
        write_whole(Path(args.json), json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, Path(args.plot))
    if args.markdown:
        command = (f"fico leaderboard --images {args.images} --tokens {','.join(tokens)} "
                   f"--flops {','.join(flops)}" + (f" --methods {args.methods}" if args.methods else "")
                   + (f" --plot {args.plot}" if args.plot else "") + f" --markdown {args.markdown}")
        write_markdown(Path(args.markdown), markdown(report, command), "toy", "leaderboard")
    return 0
