"""``fico bench``: recipes side by side with the unreduced model, measured.

For each recipe, on the same inputs: accuracy per question type and its retention (on the
trained toy model), fidelity to the unreduced model (answer agreement, KL of the answer
distribution), prefill latency (median of interleaved repeated runs after a warm-up),
decode time per token, peak memory and the most memory fico's own work adds
(:mod:`fico.benchmarks.memory`: always on CUDA, with ``--memory`` on the CPU, where it
profiles one more prefill per configuration; otherwise the cost model's estimate, labelled
so), the time spent in fico's own stages as a share of prefill, and the theoretical FLOPs
with the measured speedup divided by the FLOPs speedup.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from ..benchmarks.memory import prefill_memory
from ..benchmarks.shaped import architecture
from ..cost.model import TokenCounts, model_spec, prefill_cost
from ..errors import RecipeError
from ..loading import load_recipe
from ..models import RUNNABLE, check_recipes, image_size_of, load_model, model_source, torch_dtype
from ..recipe import Recipe
from .console import Table
from .results import save_figure, write_whole
from .timing import READABLE_SPREAD, Spread, WorkTime

BUDGETS = ("4.2", "3.3", "2.4", "1.5")


@dataclass
class BenchModel:
    name: str
    model: object
    processor: object | None
    inputs: dict  # the timed prompt
    instruction: str = "What is in the image?"  # its question, for methods that read it
    image_size: tuple[int, int] | None = None  # where the visual-token count depends on it (LLaVA-NeXT)


#: Built-in names ``fico bench --model`` takes, beside the runnable models.
BENCH_MODELS = {"shaped": "LLaVA-1.5's layer and token counts at CLIP 512 / Llama 1024 widths, random weights",
                "shaped-7b": "LLaVA-1.5-7B's real widths and depths, random weights (about 14 GB in float16; for a GPU)",
                "shaped-next": "LLaVA-NeXT's token counts (a 672 x 672 image: 5 CLIP passes, 2928 visual tokens) at "
                               "CLIP 512 / Llama 1024 widths, random weights",
                "shaped-next-7b": "LLaVA-NeXT-7B's real widths and depths on a 672 x 672 image, random weights "
                                  "(about 14 GB in float16; for a GPU)",
                "shaped-qwen2.5-vl": "Qwen2.5-VL-7B's depths and token counts (an 896 x 1120 image: 5120 patches, "
                                     "1280 visual tokens) at tower 320 / decoder 512 widths, random weights",
                **RUNNABLE}
#: the shaped models: built from their architecture with random weights, timed on a random prompt
SHAPED = ("shaped", "shaped-7b", "shaped-next", "shaped-next-7b", "shaped-qwen2.5-vl")


def load_bench_model(which: str, dtype: str = "float32", attn: str = "sdpa", device: str = "cpu") -> BenchModel:
    """A shaped model (:data:`SHAPED`: LLaVA-1.5's or LLaVA-NeXT's layer and token counts,
    random weights), or any model ``fico run`` takes: ``toy`` (the trained fico-toy),
    ``embedded``, ``embedded-next``, a local checkpoint directory."""
    from ..adapters import family_of
    from ..toy.data import example

    which = model_source(which, BENCH_MODELS)
    if which in SHAPED:
        from ..benchmarks import shaped

        kind = torch_dtype(dtype)
        if which == "shaped-qwen2.5-vl":
            model = shaped.build_shaped_qwen2_5_vl(dtype=kind, attn_implementation=attn).to(device)
            inputs = shaped.shaped_qwen_inputs(model, dtype=kind)
            return BenchModel(which, model, None, {k: v.to(device) for k, v in inputs.items()},
                              image_size=shaped.QWEN_IMAGE_SIZE)
        if which in ("shaped-7b", "shaped-next-7b"):
            build = shaped.build_shaped_7b if which == "shaped-7b" else shaped.build_shaped_next_7b
            model = build(dtype=kind, attn_implementation=attn, device=device)
        else:
            build = shaped.build_shaped_model if which == "shaped" else shaped.build_shaped_next_model
            model = build(dtype=kind, attn_implementation=attn).to(device)
        if which.startswith("shaped-next"):
            inputs, size = shaped.shaped_next_inputs(model, dtype=kind), shaped.NEXT_IMAGE_SIZE
        else:
            inputs, size = shaped.shaped_inputs(dtype=kind), None
        return BenchModel(which, model, None, {k: v.to(device) for k, v in inputs.items()}, image_size=size)
    model, processor = load_model(which, dtype, attn)
    model = model.to(device)
    ex = example(10_000_000)
    question = ex.questions[0].text if which == "toy" else BenchModel.instruction
    text = family_of(model).prompt(question, 1, processor)
    inputs = processor(images=[ex.image], text=[text], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype(dtype))
    size = image_size_of(inputs, model.config)
    size = tuple(size) if size is not None else None
    return BenchModel(which, model, processor, {k: v.to(device) for k, v in inputs.items()}, question, size)


def expand(recipes: list[str], budgets: list[str] | None, tokens: list[str] | None = None) -> list[str]:
    """Recipe names, or their ``budgets/NAME_Bt`` (TFLOPs) or ``budgets/NAME_T`` (visual
    tokens) variants for each budget."""
    if not budgets and not tokens:
        return list(recipes)
    from ..recipe import bundled_recipes

    bundled = set(bundled_recipes())
    out = []
    for name in recipes:
        for variant in [f"budgets/{name}_{b}t" for b in budgets or ()] + [f"budgets/{name}_{t}" for t in tokens or ()]:
            if variant not in bundled:
                raise RecipeError(f"{variant}: no such bundled budget variant; bundled for {name}: "
                                  f"{', '.join(n for n in sorted(bundled) if n.startswith(f'budgets/{name}_')) or 'none'}")
            out.append(variant)
    return out


def _prefill(model, inputs) -> float:
    start = time.perf_counter()
    model(**inputs, logits_to_keep=1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def with_instruction(inputs: dict, recipe: Recipe | None, instruction: str) -> dict:
    """``inputs`` plus the instruction text, for a recipe that reads it."""
    return inputs if recipe is None else {**inputs, **recipe.instruction_inputs([instruction])}


def measure_latency(model, inputs, recipes: dict[str, Recipe | None], reps: int, progress=None,
                    instruction: str = BenchModel.instruction) -> dict:
    """Interleaved prefill timings: {name: {"prefill": [...], "stage": [...], "work": [...]}}
    (warm-up excluded): the prefill, the stages, and every span of fico's work (signals and
    stages, :meth:`fico.ReductionRun.work`)."""
    from .. import apply

    times = {name: {"prefill": [], "stage": [], "work": [], "trace": None} for name in recipes}
    task = progress.add_task("prefill timing", total=(reps + 1) * len(recipes)) if progress else None
    for rep in range(reps + 1):
        for name, recipe in recipes.items():
            if recipe is None:
                seconds, stage, work = _prefill(model, inputs), 0.0, 0.0
            else:
                with apply(model, recipe) as run:
                    run.sync_stage_timing = True
                    run.work_probe = probe = WorkTime()
                    seconds = _prefill(model, with_instruction(inputs, recipe, instruction))
                stage, work = run.trace.stage_seconds, probe.seconds
                times[name]["trace"] = run.trace
            if rep:  # the first round warms up
                times[name]["prefill"].append(seconds)
                times[name]["stage"].append(stage)
                times[name]["work"].append(work)
            if progress:
                progress.advance(task)
    return times


def measure_decode(model, inputs, recipes: dict[str, Recipe | None], tokens: int = 16,
                   reps: int = 5, instruction: str = BenchModel.instruction) -> dict[str, list[float]]:
    """Seconds per decoded token for each configuration: (generate(1 + tokens) - generate(1))
    / tokens, medians of ``reps`` rounds that interleave the configurations (measured one
    after another, the first configuration ran consistently faster on a shared VM)."""
    from contextlib import nullcontext

    from .. import apply

    def generate(n: int, recipe: Recipe | None) -> float:
        start = time.perf_counter()
        model.generate(**with_instruction(inputs, recipe, instruction), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False)
        return time.perf_counter() - start

    per_token: dict[str, list[float]] = {name: [] for name in recipes}
    for rep in range(reps + 1):
        for name, recipe in recipes.items():
            with apply(model, recipe) if recipe is not None else nullcontext():
                seconds = (generate(1 + tokens, recipe) - generate(1, recipe)) / tokens
            # the first round warms up; a round where the longer generate was not slower says
            # nothing about decoding (the machine was busier during the shorter one): NaN, which
            # keeps round i of every configuration at index i for the interleaved ratios
            if rep:
                per_token[name].append(seconds if seconds > 0 else float("nan"))
    return per_token


#: why a decode time per token can be missing (measure_decode gave every round NaN)
DECODE_UNREADABLE = ("in no round did the longer generate() take longer than generate() of one token: the machine "
                     "was too busy to time decoding")
DECODE_SKIPPED = "decoding was not timed (--decode-tokens 0)"


def _quotient(a: float | None, b: float | None) -> float | None:
    """``a / b``, None (unreadable) when either is unreadable or b is not above zero."""
    return None if a is None or b is None or b <= 0 else a / b


def answer_distribution(bm: BenchModel, recipe: Recipe | None, images: int) -> tuple[dict, torch.Tensor, list]:
    """Toy test set: per-type accuracy, next-token log-probabilities, question kinds."""
    from contextlib import nullcontext

    from .. import apply
    from ..toy.data import TEST_SEEDS, example
    from ..toy.evaluate import answer_logits

    pictures, questions, answers, kinds = [], [], [], []
    for seed in range(TEST_SEEDS.start, TEST_SEEDS.start + images):
        ex = example(seed)
        for q in ex.questions:
            pictures.append(ex.image)
            questions.append(q.text)
            answers.append(bm.processor.tokenizer.convert_tokens_to_ids(q.answer))
            kinds.append(q.kind)
    with apply(bm.model, recipe) if recipe is not None else nullcontext():
        logits = answer_logits(bm.model, bm.processor, pictures, questions, recipe=recipe)
    guesses = logits.argmax(-1)
    correct = (guesses == torch.tensor(answers)).tolist()
    accuracy = {}
    for kind in dict.fromkeys(kinds):
        picked = [ok for ok, k in zip(correct, kinds) if k == kind]
        accuracy[kind] = sum(picked) / len(picked)
    accuracy["overall"] = sum(correct) / len(correct)
    return accuracy, logits.log_softmax(-1), kinds


def measure_replay(model, counts: dict[str, TokenCounts], reps: int) -> dict[str, list[float]]:
    """Median seconds of the vanilla modules on each configuration's token counts, in
    interleaved rounds (see ``fico.benchmarks.replay``)."""
    from ..benchmarks.replay import replay_seconds

    seconds: dict[str, list[float]] = {name: [] for name in counts}
    for rep in range(reps + 1):
        for name, configuration in counts.items():
            elapsed = replay_seconds(model, configuration)
            if rep:
                seconds[name].append(elapsed)
    return seconds


def bench(recipes: list[str], model: str = "toy", budgets: list[str] | None = None, images: int = 100,
          reps: int = 7, threads: int = 2, console: Console | None = None, replay: bool = False,
          plugins: list[str] | None = None, tokens: list[str] | None = None, device: str = "cpu",
          dtype: str = "float32", decode_tokens: int = 16, measure_memory: bool = False) -> dict:
    """Run the benchmark and return the JSON-ready result."""
    console = console or Console()
    torch.set_num_threads(threads)
    names = expand(recipes, budgets, tokens)
    first = [load_recipe(name, plugins=plugins) for name in names]  # a bad recipe fails before the model loads
    if model_source(model, BENCH_MODELS) not in SHAPED:
        # and one that cannot run on this model too; a budget is solved for the model once it is loaded
        check_recipes([recipe for recipe in first if recipe.budget is None], model)
    bm = load_bench_model(model, dtype, device=device)
    spec = replace(model_spec(bm.model), name=bm.name)
    text_tokens = bm.inputs["input_ids"].shape[1] - spec.image(bm.image_size)[1]
    # a budget names a model; on another one it is solved for the same fraction of the unreduced cost
    loaded = {name: load_recipe(name, plugins=plugins, budget_for=(spec, text_tokens)) for name in names}
    configs = {"unreduced": None, **loaded}
    results = {}
    with torch.inference_mode(), Progress(console=console, transient=True) as progress:
        timings = measure_latency(bm.model, bm.inputs, configs, reps, progress, bm.instruction)
        if decode_tokens:
            decode = measure_decode(bm.model, bm.inputs, configs, tokens=decode_tokens, reps=reps,
                                    instruction=bm.instruction)
        else:
            decode = {name: [] for name in configs}
        counts = {name: TokenCounts.from_trace(timings[name]["trace"], spec, bm.image_size) if recipe is not None
                  else TokenCounts.unreduced(spec, text_tokens, bm.image_size) for name, recipe in configs.items()}
        replayed = measure_replay(bm.model, counts, reps) if replay else {}
        task = progress.add_task("accuracy, decode, memory", total=len(configs))
        base_logprobs = None
        for name, recipe in configs.items():
            entry = {"recipe": name}
            # the cost of what ran, from the token counts the timed prefill recorded
            full, viewer = prefill_cost(spec, counts[name], "full"), prefill_cost(spec, counts[name], "llm-viewer")
            entry.update(tflops=full.tflops, tflops_llm_viewer=viewer.tflops, kv_cache_mb=viewer.kv_cache_mb,
                         image_features=full.tokens["features"])
            prefill, stage = Spread.of(timings[name]["prefill"]), Spread.of(timings[name]["stage"])
            work = Spread.of(timings[name]["work"])
            per_token = Spread.of(decode[name], empty=DECODE_UNREADABLE if decode_tokens else DECODE_SKIPPED)
            entry.update(prefill_ms=prefill.scaled(1e3).median, prefill_spread_ms=prefill.scaled(1e3).as_dict(),
                         stage_share=_quotient(stage.median, prefill.median),
                         work_share=_quotient(work.median, prefill.median),
                         decode_ms_per_token=per_token.scaled(1e3).median,
                         decode_spread_ms=per_token.scaled(1e3).as_dict(),
                         measured_speedup_spread=Spread.ratio(timings["unreduced"]["prefill"],
                                                              timings[name]["prefill"]).as_dict(),
                         decode_speedup_spread=(Spread.ratio(decode["unreduced"], decode[name]) if decode_tokens
                                                else Spread.unreadable(DECODE_SKIPPED)).as_dict())
            on_cuda = next(bm.model.parameters()).device.type == "cuda"
            memory = prefill_memory(bm.model, with_instruction(bm.inputs, recipe, bm.instruction), recipe) \
                if measure_memory or on_cuda else None
            if memory is None:
                entry["memory_mb_estimate"] = (full.activations_gb * 1e3 + full.kv_cache_mb)
            else:
                entry.update(peak_memory_mb=memory.peak / 1e6, activation_peak_mb=memory.activations / 1e6,
                             work_peak_mb=None if memory.work is None else memory.work / 1e6)
            if bm.name == "toy":
                accuracy, logprobs, _ = answer_distribution(bm, recipe, images)
                entry["accuracy"] = accuracy
                entry["questions"] = logprobs.shape[0]
                if base_logprobs is None:
                    base_logprobs = logprobs
                entry["answer_agreement"] = (logprobs.argmax(-1) == base_logprobs.argmax(-1)).float().mean().item()
                entry["kl"] = torch.nn.functional.kl_div(logprobs, base_logprobs, log_target=True,
                                                         reduction="batchmean").item()
            if recipe is not None and recipe.budget is not None:
                entry["budget"] = recipe.budget.as_dict()
            results[name] = entry
            progress.advance(task)
    base = results["unreduced"]
    for entry in results.values():
        entry["flops_speedup"] = base["tflops"] / entry["tflops"]
        entry["measured_speedup"] = entry["measured_speedup_spread"]["median"]  # of interleaved pairs
        entry["speedup_ratio"] = _quotient(entry["measured_speedup"], entry["flops_speedup"])
        if "peak_memory_mb" in entry:
            # the most memory fico's work (signals, stages) adds, against the unreduced prefill's peak
            entry["work_peak_share"] = _quotient(entry["work_peak_mb"] or 0.0, base["peak_memory_mb"])
            # and against what the unreduced prefill allocates above its weights (stricter)
            entry["work_activation_share"] = _quotient(entry["work_peak_mb"] or 0.0, base["activation_peak_mb"])
        if replayed:
            # what the machine gives these token counts without any fico code, and fico's share of the gap
            entry["replay_ms"] = Spread.of(replayed[entry["recipe"]]).scaled(1e3).median
            entry["replay_speedup"] = _quotient(Spread.of(replayed["unreduced"]).scaled(1e3).median, entry["replay_ms"])
            entry["machine_ratio"] = _quotient(entry["replay_speedup"], entry["flops_speedup"])
            entry["fico_efficiency"] = _quotient(entry["measured_speedup"], entry["replay_speedup"])
        if "accuracy" in entry:
            entry["accuracy_retention"] = entry["accuracy"]["overall"] / base["accuracy"]["overall"]
    return {
        "model": bm.name, "architecture": architecture(bm.model), "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {threads} threads, torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ", CPU"),
        "timing": {"repeats": reps, "text_tokens": text_tokens, "flops_convention": "full", "dtype": dtype,
                   "device": device},
        "baseline": base,
        "results": [entry for name, entry in results.items() if name != "unreduced"],
    }


UNREADABLE = "*"


def _with_spread(spread: dict, digits: int) -> str:
    """``12.3 (11.9-12.8)``, marked when the spread is too wide to read the median, and
    ``unreadable`` when nothing could be measured."""
    if spread.get("median") is None:
        return "unreadable"
    mark = "" if Spread.from_dict(spread).readable else UNREADABLE
    return f"{spread['median']:.{digits}f} ({spread['q1']:.{digits}f}-{spread['q3']:.{digits}f}){mark}"


def _number(value: float | None, digits: int, scale: float = 1.0) -> str:
    return "unreadable" if value is None else f"{value * scale:.{digits}f}"


def budget_label(entry: dict) -> str:
    """What a budget variant's cost means on the model that ran."""
    budget = entry.get("budget")
    if not budget:
        return "-"
    if budget["solved_for"] in ("", budget["model"]):
        return f"{budget['budget_tflops']} TFLOPs"
    if budget["equal_cost"]:
        return f"{budget['solved_fraction']:.3f} x unreduced"
    return f"{budget['solved_fraction']:.3f} x unreduced, NOT equal-cost"


def report_rows(report: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """The columns, rows and footnotes every rendering of a report shares."""
    toy = "accuracy" in report["baseline"]
    replayed = "replay_ms" in report["baseline"]
    memory = "peak_memory_mb" in report["baseline"]
    budgets = any("budget" in e for e in report["results"])
    gflops = report["baseline"]["tflops"] < 1
    columns = ["recipe", "GFLOPs (full)" if gflops else "TFLOPs (full)", "FLOPs speedup",
               "measured speedup (IQR)", "measured / FLOPs", "prefill ms (IQR)", "decode ms/token (IQR)",
               "decode speedup (IQR)", "fico stages (% of prefill)", "fico signals + stages (% of prefill)"]
    if budgets:
        columns.insert(1, "budget")
    if replayed:
        columns += ["vanilla-module replay speedup", "replay / FLOPs", "measured / replay"]
    if memory:
        columns += ["peak MB", "fico work peak MB (% of unreduced peak)", "% of unreduced activations"]
    if toy:
        columns += ["accuracy (±1 SE)", "retention", "agreement", "KL"]
    rows, unreadable = [], False
    base = dict(report["baseline"], flops_speedup=1.0, speedup_ratio=1.0)
    for e in [base] + report["results"]:
        unit = 1e3 if gflops else 1
        row = [e["recipe"], f"{e['tflops'] * unit:.{1 if gflops else 3}f}", f"{e['flops_speedup']:.2f}"]
        if e is base:
            row += ["1.00", "1.00"]
        else:
            row += [_with_spread(e["measured_speedup_spread"], 2), _number(e["speedup_ratio"], 2)]
        row += [_with_spread(e["prefill_spread_ms"], 1), _with_spread(e["decode_spread_ms"], 2),
                "1.00" if e is base else _with_spread(e["decode_speedup_spread"], 2),
                _number(e["stage_share"], 1, 100), _number(e.get("work_share"), 1, 100)]
        unreadable |= any(cell.endswith(UNREADABLE) for cell in row)
        if budgets:
            row.insert(1, budget_label(e))
        if replayed:
            row += [_number(e["replay_speedup"], 2), _number(e["machine_ratio"], 2), _number(e["fico_efficiency"], 2)]
        if memory:
            row += [f"{e['peak_memory_mb']:.0f}"] + (["-", "-"] if e is base else [
                f"{e['work_peak_mb']:.1f} ({_number(e['work_peak_share'], 2, 100)}%)",
                _number(e["work_activation_share"], 1, 100)])
        if toy:
            p, n = e["accuracy"]["overall"], e.get("questions", 0)
            se = (p * (1 - p) / n) ** 0.5 if n else float("nan")
            row += [f"{p:.3f} ± {se:.3f}", f"{e.get('accuracy_retention', 1.0):.3f}",
                    f"{e.get('answer_agreement', 1.0):.3f}", f"{e.get('kl', 0.0):.4f}"]
        rows.append(row)
    notes = []
    reasons = {value["reason"] for e in [base] + report["results"] for value in e.values()
               if isinstance(value, dict) and value.get("reason")}
    if reasons:
        notes.append("unreadable: " + "; ".join(sorted(reasons)) + ".")
    if unreadable:
        notes.append(f"{UNREADABLE} the interquartile range is wider than {100 * READABLE_SPREAD:.0f}% of the "
                     "median: too wide to read that number or ratio; rerun with more --reps on a quieter machine.")
    return columns, rows, notes


def table(report: dict) -> Table:
    out = Table(title=f"fico bench on {report['model']} ({report['machine']}, {report['date']})")
    columns, rows, notes = report_rows(report)
    for column in columns:
        out.add_column(column, justify="right")
    for row in rows:
        out.add_row(*row)
    if notes:
        out.caption = " ".join(notes)
    return out


def _axis_unit(report: dict) -> tuple[float, str]:
    """TFLOPs for real models, GFLOPs for small ones (so the axis does not read 0.002)."""
    return (1e3, "GFLOPs") if report["baseline"]["tflops"] < 1 else (1.0, "TFLOPs")


def plot(report: dict, path: Path) -> None:
    """Accuracy against FLOPs per method (the paper's Fig. 1 shape, ±1 standard error) and
    prefill latency (median, interquartile bars) against FLOPs; the unreduced model is a
    reference line on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    toy = "accuracy" in report["baseline"]
    scale, unit = _axis_unit(report)
    figure, axes = plt.subplots(1, 2 if toy else 1, figsize=(12 if toy else 6.5, 4.6), squeeze=False)
    methods: dict[str, list[dict]] = {}
    for entry in report["results"]:
        method = entry["recipe"].split("/")[-1].rsplit("_", 1)[0] if "budget" in entry else entry["recipe"]
        methods.setdefault(method, []).append(entry)
    base = report["baseline"]

    def accuracy(e):
        p, n = e["accuracy"]["overall"], max(e.get("questions", 0), 1)
        return p, (p * (1 - p) / n) ** 0.5

    def latency(e):
        spread = e["prefill_spread_ms"]
        if spread.get("median") is None:
            return float("nan"), (0.0, 0.0)
        return spread["median"], (spread["median"] - spread["q1"], spread["q3"] - spread["median"])

    panels = [(latency, "prefill latency (ms; median, IQR bars)")]
    if toy:
        panels.insert(0, (accuracy, f"toy test accuracy (±1 SE, {base.get('questions', '?')} questions)"))
    for ax, (measure, label) in zip(axes[0], panels):
        for method, entries in methods.items():
            entries = sorted(entries, key=lambda e: e["tflops"])
            values = [measure(e) for e in entries]
            errors = [v[1] for v in values]
            yerr = list(zip(*errors)) if isinstance(errors[0], tuple) else errors
            ax.errorbar([e["tflops"] * scale for e in entries], [v[0] for v in values], yerr=yerr, marker="o",
                        capsize=3, label=method)
        reference, _ = measure(base)
        ax.axhline(reference, color="black", linestyle="--", linewidth=1, label="unreduced")
        ax.axvline(base["tflops"] * scale, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"{unit} (full prefill, cost model)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"fico bench, {report['model']} model ({report['architecture']})", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path, dpi=120)
    plt.close(figure)


def markdown(report: dict, command: str, block: str | None = None) -> str:
    """A results block for docs/benchmarks.md, with the speed requirements checked."""
    toy = "accuracy" in report["baseline"]
    replayed = "replay_ms" in report["baseline"]
    columns, rows, notes = report_rows(report)
    block = block or report["model"]
    lines = [f"<!-- bench:{block}:begin -->",
             f"Measured {report['date']} on {report['machine']}, model `{report['model']}` "
             f"({report['architecture']}, {report['timing'].get('dtype', 'float32')}), "
             f"{report['timing']['repeats']} interleaved repeats: medians with "
             f"interquartile ranges; speedups are medians of the ratios of interleaved pairs. By:", "",
             f"    {command}", "",
             "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if notes:
        lines += [""] + notes
    if not toy:
        lines += ["", "Requirements: fico's own stages at most 5% of the reduced prefill; measured speedup at least "
                  "0.95 of what the vanilla modules reach on the same token counts (`--replay`); the most memory a "
                  "span of fico's work (signals and stages) adds at most 10% of the unreduced prefill's peak "
                  "(`--memory`):", ""]
        for e in report["results"]:
            if e["stage_share"] is None:
                share = "not measured"
            else:
                share = "met" if e["stage_share"] <= 0.05 else f"missed by {100 * (e['stage_share'] - 0.05):.1f} points"
            line = (f"- `{e['recipe']}`: stages {_number(e['stage_share'], 1, 100)}% ({share}), with its signals "
                    f"{_number(e.get('work_share'), 1, 100)}%; measured / FLOPs speedup {_number(e['speedup_ratio'], 2)}")
            if replayed:
                if e["fico_efficiency"] is None:
                    efficiency = "not measured"
                else:
                    efficiency = ("met" if e["fico_efficiency"] >= 0.95
                                  else f"missed by {0.95 - e['fico_efficiency']:.2f}")
                line += (f"; measured / replay {_number(e['fico_efficiency'], 2)} ({efficiency}); the replay reaches "
                         f"{_number(e['machine_ratio'], 2)} of the FLOPs speedup")
            if "work_peak_share" in e:
                share = e["work_peak_share"]
                line += (f"; fico's work peak {_number(share, 2, 100)}% of the unreduced peak ("
                         + ("met" if share <= 0.10 else f"missed by {100 * (share - 0.10):.1f} points") + ")")
                above = e["peak_memory_mb"] / report["baseline"]["peak_memory_mb"] - 1
                # memory fico holds between its spans shows here, not in the work peak
                line += (f", the prefill's peak {100 * above:.1f}% above the unreduced one" if above > 0
                         else f", the prefill's peak {100 * -above:.1f}% below the unreduced one")
            lines.append(line)
    lines.append(f"<!-- bench:{block}:end -->")
    return "\n".join(lines)


def write_markdown(path: Path, block: str, model: str, kind: str = "bench") -> None:
    """Replace the ``<!-- kind:model:begin -->`` ... ``end`` block of ``path`` (or append it)."""
    begin, end = f"<!-- {kind}:{model}:begin -->", f"<!-- {kind}:{model}:end -->"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_whole(path, text)


def main_bench(args, console: Console) -> int:
    budgets = [b.strip() for b in args.budgets.split(",")] if args.budgets else None
    for b in budgets or ():
        if b not in BUDGETS:
            raise RecipeError(f"--budgets: bundled budgets are {', '.join(BUDGETS)}, got {b}")
    tokens = [t.strip() for t in args.tokens.split(",")] if args.tokens else None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"--device {args.device}: torch sees no CUDA device on this machine")
    report = bench(args.recipes, args.model, budgets, args.images, args.reps, args.threads, console, args.replay,
                   plugins=args.plugin, tokens=tokens, device=args.device, dtype=args.dtype,
                   decode_tokens=args.decode_tokens, measure_memory=args.memory)
    console.print(table(report))
    from ..cost.budget import BudgetSolution

    for entry in report["results"]:
        if entry.get("budget"):
            console.print(f"{entry['recipe']}: {BudgetSolution(**entry['budget']).describe()}", highlight=False,
                          soft_wrap=True)
    if args.json:
        write_whole(args.json, json.dumps(report, indent=2))
        console.print(f"JSON: {args.json}")
    if args.plot:
        plot(report, Path(args.plot))
        console.print(f"plot: {args.plot}")
    if args.markdown:
        import shlex
        import sys

        command = "fico bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] \
            else "fico bench " + " ".join(args.recipes)
        block = args.block or report["model"]
        write_markdown(Path(args.markdown), markdown(report, command, block), block)
        console.print(f"markdown: {args.markdown}")
    return 0
