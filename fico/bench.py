"""``fico bench``: recipes side by side with the unreduced model, measured.

For each recipe, on the same inputs: accuracy per question type and its retention (on the
trained toy model), fidelity to the unreduced model (answer agreement, KL of the answer
distribution), prefill latency (median of interleaved repeated runs after a warm-up),
decode time per token, peak memory (CUDA; on the CPU the cost model's estimate, labelled
so), the time spent in fico's own stages as a share of prefill, and the theoretical FLOPs
with the measured speedup divided by the FLOPs speedup.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .cost import TokenCounts, model_spec, prefill_cost
from .errors import RecipeError
from .models import RUNNABLE, load_model, model_source, torch_dtype
from .recipe import Recipe, load_recipe

BUDGETS = ("4.2", "3.3", "2.4", "1.5")


@dataclass
class BenchModel:
    name: str
    model: object
    processor: object | None
    inputs: dict  # the timed prompt


#: Built-in names ``fico bench --model`` takes, beside the runnable models.
BENCH_MODELS = {"shaped": "LLaVA-1.5's layer and token counts at CLIP 512 / Llama 1024 widths, random weights",
                **RUNNABLE}


def load_bench_model(which: str, dtype: str = "float32", attn: str = "sdpa") -> BenchModel:
    """``shaped`` (LLaVA-1.5's layer and token counts at reduced widths, random weights), or
    any model ``fico run`` takes: ``toy`` (the trained fico-toy), ``embedded``, a local
    checkpoint directory."""
    from .toy.data import example, prompt

    which = model_source(which, BENCH_MODELS)
    if which == "shaped":
        from .benchmarks.shaped import build_shaped_model, shaped_inputs

        model = build_shaped_model(dtype=torch_dtype(dtype), attn_implementation=attn)
        return BenchModel("shaped", model, None, shaped_inputs(dtype=torch_dtype(dtype)))
    model, processor = load_model(which, dtype, attn)
    ex = example(10_000_000)
    text = prompt(ex.questions[0].text) if which == "toy" else "USER: <image>\nWhat is in the image? ASSISTANT:"
    inputs = processor(images=[ex.image], text=[text], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype(dtype))
    return BenchModel(which, model, processor, dict(inputs))


def expand(recipes: list[str], budgets: list[str] | None) -> list[str]:
    """Recipe names, or their ``budgets/NAME_Bt`` variants for each budget."""
    if not budgets:
        return list(recipes)
    return [f"budgets/{name}_{budget}t" for name in recipes for budget in budgets]


def _prefill(model, inputs) -> float:
    start = time.perf_counter()
    model(**inputs, logits_to_keep=1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_latency(model, inputs, recipes: dict[str, Recipe | None], reps: int, progress=None) -> dict:
    """Interleaved prefill timings: {name: {"prefill": [...], "stage": [...]}} (warm-up excluded)."""
    from . import apply

    times = {name: {"prefill": [], "stage": [], "trace": None} for name in recipes}
    task = progress.add_task("prefill timing", total=(reps + 1) * len(recipes)) if progress else None
    for rep in range(reps + 1):
        for name, recipe in recipes.items():
            if recipe is None:
                seconds, stage = _prefill(model, inputs), 0.0
            else:
                with apply(model, recipe) as run:
                    seconds = _prefill(model, inputs)
                stage = run.trace.stage_seconds
                times[name]["trace"] = run.trace
            if rep:  # the first round warms up
                times[name]["prefill"].append(seconds)
                times[name]["stage"].append(stage)
            if progress:
                progress.advance(task)
    return times


def measure_decode(model, inputs, recipes: dict[str, Recipe | None], tokens: int = 16,
                   reps: int = 3) -> dict[str, float]:
    """Seconds per decoded token for each configuration: (generate(1 + tokens) - generate(1))
    / tokens, medians of ``reps`` rounds that interleave the configurations (measured one
    after another, the first configuration ran consistently faster on a shared VM)."""
    from contextlib import nullcontext

    from . import apply

    def generate(n: int) -> float:
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    per_token: dict[str, list[float]] = {name: [] for name in recipes}
    for rep in range(reps + 1):
        for name, recipe in recipes.items():
            with apply(model, recipe) if recipe is not None else nullcontext():
                seconds = (generate(1 + tokens) - generate(1)) / tokens
            if rep:  # the first round warms up
                per_token[name].append(max(seconds, 0.0))
    return {name: statistics.median(values) for name, values in per_token.items()}


def peak_memory_mb(model, inputs, recipe: Recipe | None) -> float | None:
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        return None
    from contextlib import nullcontext

    from . import apply

    torch.cuda.reset_peak_memory_stats()
    with apply(model, recipe) if recipe is not None else nullcontext():
        model(**inputs, logits_to_keep=1)
    return torch.cuda.max_memory_allocated() / 1e6


def answer_distribution(bm: BenchModel, recipe: Recipe | None, images: int) -> tuple[dict, torch.Tensor, list]:
    """Toy test set: per-type accuracy, next-token log-probabilities, question kinds."""
    from contextlib import nullcontext

    from . import apply
    from .toy.data import TEST_SEEDS, example
    from .toy.evaluate import answer_logits

    pictures, questions, answers, kinds = [], [], [], []
    for seed in range(TEST_SEEDS.start, TEST_SEEDS.start + images):
        ex = example(seed)
        for q in ex.questions:
            pictures.append(ex.image)
            questions.append(q.text)
            answers.append(bm.processor.tokenizer.convert_tokens_to_ids(q.answer))
            kinds.append(q.kind)
    with apply(bm.model, recipe) if recipe is not None else nullcontext():
        logits = answer_logits(bm.model, bm.processor, pictures, questions)
    guesses = logits.argmax(-1)
    correct = (guesses == torch.tensor(answers)).tolist()
    accuracy = {}
    for kind in dict.fromkeys(kinds):
        picked = [ok for ok, k in zip(correct, kinds) if k == kind]
        accuracy[kind] = sum(picked) / len(picked)
    accuracy["overall"] = sum(correct) / len(correct)
    return accuracy, logits.log_softmax(-1), kinds


def measure_replay(model, counts: dict[str, TokenCounts], reps: int) -> dict[str, float]:
    """Median seconds of the vanilla modules on each configuration's token counts, in
    interleaved rounds (see ``fico.benchmarks.replay``)."""
    from .benchmarks.replay import replay_seconds

    seconds: dict[str, list[float]] = {name: [] for name in counts}
    for rep in range(reps + 1):
        for name, configuration in counts.items():
            elapsed = replay_seconds(model, configuration)
            if rep:
                seconds[name].append(elapsed)
    return {name: statistics.median(values) for name, values in seconds.items()}


def bench(recipes: list[str], model: str = "toy", budgets: list[str] | None = None, images: int = 100,
          reps: int = 7, threads: int = 2, console: Console | None = None, replay: bool = False) -> dict:
    """Run the benchmark and return the JSON-ready result."""
    console = console or Console()
    torch.set_num_threads(threads)
    names = expand(recipes, budgets)
    loaded = {name: load_recipe(name) for name in names}
    bm = load_bench_model(model)
    spec = model_spec(bm.model)
    text_tokens = bm.inputs["input_ids"].shape[1] - spec.patches
    configs = {"unreduced": None, **loaded}
    results = {}
    with torch.inference_mode(), Progress(console=console, transient=True) as progress:
        timings = measure_latency(bm.model, bm.inputs, configs, reps, progress)
        decode = measure_decode(bm.model, bm.inputs, configs)
        counts = {name: TokenCounts.from_trace(timings[name]["trace"], spec) if recipe is not None
                  else TokenCounts.unreduced(spec, text_tokens) for name, recipe in configs.items()}
        replayed = measure_replay(bm.model, counts, reps) if replay else {}
        task = progress.add_task("accuracy, decode, memory", total=len(configs))
        base_logprobs = None
        for name, recipe in configs.items():
            entry = {"recipe": name}
            # the cost of what ran, from the token counts the timed prefill recorded
            full, viewer = prefill_cost(spec, counts[name], "full"), prefill_cost(spec, counts[name], "llm-viewer")
            entry.update(tflops=full.tflops, tflops_llm_viewer=viewer.tflops, kv_cache_mb=viewer.kv_cache_mb,
                         image_features=full.tokens["features"])
            prefill = statistics.median(timings[name]["prefill"])
            entry.update(prefill_ms=prefill * 1e3,
                         stage_share=statistics.median(timings[name]["stage"]) / prefill,
                         decode_ms_per_token=decode[name] * 1e3)
            memory = peak_memory_mb(bm.model, bm.inputs, recipe)
            if memory is None:
                entry["memory_mb_estimate"] = (full.activations_gb * 1e3 + full.kv_cache_mb)
            else:
                entry["peak_memory_mb"] = memory
            if bm.name == "toy":
                accuracy, logprobs, _ = answer_distribution(bm, recipe, images)
                entry["accuracy"] = accuracy
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
        entry["measured_speedup"] = base["prefill_ms"] / entry["prefill_ms"]
        entry["speedup_ratio"] = entry["measured_speedup"] / entry["flops_speedup"]
        if replayed:
            # what the machine gives these token counts without any fico code, and fico's share of the gap
            entry["replay_ms"] = replayed[entry["recipe"]] * 1e3
            entry["replay_speedup"] = base["replay_ms"] / entry["replay_ms"]
            entry["machine_ratio"] = entry["replay_speedup"] / entry["flops_speedup"]
            entry["fico_efficiency"] = entry["measured_speedup"] / entry["replay_speedup"]
        if "accuracy" in entry:
            entry["accuracy_retention"] = entry["accuracy"]["overall"] / base["accuracy"]["overall"]
    return {
        "model": bm.name, "architecture": architecture(bm.model), "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {threads} threads, torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU"),
        "timing": {"repeats": reps, "text_tokens": text_tokens, "flops_convention": "full"},
        "baseline": base,
        "results": [entry for name, entry in results.items() if name != "unreduced"],
    }


def architecture(model) -> str:
    """The model's depths and widths, e.g. ``CLIP 24 x 512 on 577 tokens, Llama 32 x 1024``."""
    vision, text = model.config.vision_config, model.config.text_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    return (f"CLIP {vision.num_hidden_layers} x {vision.hidden_size} on {tokens} tokens, "
            f"Llama {text.num_hidden_layers} x {text.hidden_size}")


def table(report: dict) -> Table:
    out = Table(title=f"fico bench on {report['model']} ({report['machine']}, {report['date']})")
    columns = ["recipe", "GFLOPs", "FLOPs x", "measured x", "ratio", "prefill ms", "decode ms/tok", "stages %"]
    toy = "accuracy" in report["baseline"]
    replayed = "replay_ms" in report["baseline"]
    if replayed:
        columns += ["replay x", "replay/FLOPs", "measured/replay"]
    if toy:
        columns += ["accuracy", "retention", "agree", "KL"]
    for column in columns:
        out.add_column(column, justify="right")
    for entry in [dict(report["baseline"], flops_speedup=1.0, measured_speedup=1.0, speedup_ratio=1.0)] + report["results"]:
        row = [entry["recipe"], f"{entry['tflops'] * 1e3:.1f}", f"{entry['flops_speedup']:.2f}",
               f"{entry['measured_speedup']:.2f}", f"{entry['speedup_ratio']:.2f}", f"{entry['prefill_ms']:.1f}",
               f"{entry['decode_ms_per_token']:.2f}", f"{100 * entry['stage_share']:.1f}"]
        if replayed:
            row += [f"{entry['replay_speedup']:.2f}", f"{entry['machine_ratio']:.2f}", f"{entry['fico_efficiency']:.2f}"]
        if toy:
            row += [f"{entry['accuracy']['overall']:.3f}", f"{entry.get('accuracy_retention', 1.0):.3f}",
                    f"{entry.get('answer_agreement', 1.0):.3f}", f"{entry.get('kl', 0.0):.4f}"]
        out.add_row(*row)
    return out


def plot(report: dict, path: Path) -> None:
    """Accuracy against TFLOPs per method (the paper's Fig. 1 shape) and latency against TFLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    toy = "accuracy" in report["baseline"]
    figure, axes = plt.subplots(1, 2 if toy else 1, figsize=(11 if toy else 6, 4.2), squeeze=False)
    methods: dict[str, list[dict]] = {}
    for entry in report["results"]:
        method = entry["recipe"].split("/")[-1].rsplit("_", 1)[0] if "budget" in entry else entry["recipe"]
        methods.setdefault(method, []).append(entry)
    base = report["baseline"]
    panels = [("prefill_ms", "prefill latency (ms)")]
    if toy:
        panels.insert(0, ("accuracy", "toy test accuracy"))
    for ax, (key, label) in zip(axes[0], panels):
        for method, entries in methods.items():
            entries = sorted(entries, key=lambda e: e["tflops"])
            ys = [e[key]["overall"] if key == "accuracy" else e[key] for e in entries]
            ax.plot([e["tflops"] for e in entries], ys, marker="o", label=method)
        y0 = base[key]["overall"] if key == "accuracy" else base[key]
        ax.scatter([base["tflops"]], [y0], marker="*", s=120, color="black", label="unreduced")
        ax.set_xlabel("TFLOPs (full prefill, cost model)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"fico bench, {report['model']} model")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(report: dict, command: str) -> str:
    """A results block for docs/benchmarks.md, with the speed requirements checked."""
    toy = "accuracy" in report["baseline"]
    replayed = "replay_ms" in report["baseline"]
    lines = [f"<!-- bench:{report['model']}:begin -->",
             f"Measured {report['date']} on {report['machine']}, model `{report['model']}` "
             f"({report['architecture']}, fp32), "
             f"{report['timing']['repeats']} interleaved repeats (medians), by:", "", f"    {command}", "",
             "| recipe | GFLOPs (full) | FLOPs speedup | measured speedup | measured / FLOPs | prefill ms | "
             "decode ms/token | fico stages (% of prefill) |"
             + (" vanilla-module replay speedup | replay / FLOPs | measured / replay |" if replayed else "")
             + (" accuracy | retention | agreement |" if toy else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if replayed else "")
             + ("---:|---:|---:|" if toy else "")]
    base = dict(report["baseline"], flops_speedup=1.0, measured_speedup=1.0, speedup_ratio=1.0)
    for e in [base] + report["results"]:
        row = (f"| {e['recipe']} | {e['tflops'] * 1e3:.1f} | {e['flops_speedup']:.2f} | {e['measured_speedup']:.2f} | "
               f"{e['speedup_ratio']:.2f} | {e['prefill_ms']:.1f} | {e['decode_ms_per_token']:.2f} | "
               f"{100 * e['stage_share']:.1f} |")
        if replayed:
            row += f" {e['replay_speedup']:.2f} | {e['machine_ratio']:.2f} | {e['fico_efficiency']:.2f} |"
        if toy:
            row += (f" {e['accuracy']['overall']:.3f} | {e.get('accuracy_retention', 1.0):.3f} | "
                    f"{e.get('answer_agreement', 1.0):.3f} |")
        lines.append(row)
    if not toy:
        lines += ["", "Requirements (issue: measured speedup >= 0.9 x FLOPs speedup; fico's stages <= 5% of the "
                  "reduced prefill):", ""]
        for e in report["results"]:
            speed = "met" if e["speedup_ratio"] >= 0.9 else f"missed by {0.9 - e['speedup_ratio']:.2f}"
            share = "met" if e["stage_share"] <= 0.05 else f"missed by {100 * (e['stage_share'] - 0.05):.1f} points"
            line = (f"- `{e['recipe']}`: speedup ratio {e['speedup_ratio']:.2f} ({speed}); "
                    f"stages {100 * e['stage_share']:.1f}% ({share})")
            if replayed:
                line += (f"; the vanilla modules on the same token counts reach {e['machine_ratio']:.2f} of the "
                         f"FLOPs speedup, fico {e['fico_efficiency']:.2f} of theirs")
            lines.append(line)
    lines.append(f"<!-- bench:{report['model']}:end -->")
    return "\n".join(lines)


def write_markdown(path: Path, block: str, model: str) -> None:
    begin, end = f"<!-- bench:{model}:begin -->", f"<!-- bench:{model}:end -->"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main_bench(args, console: Console) -> int:
    budgets = [b.strip() for b in args.budgets.split(",")] if args.budgets else None
    for b in budgets or ():
        if b not in BUDGETS:
            raise RecipeError(f"--budgets: bundled budgets are {', '.join(BUDGETS)}, got {b}")
    report = bench(args.recipes, args.model, budgets, args.images, args.reps, args.threads, console, args.replay)
    console.print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        console.print(f"JSON: {args.json}")
    if args.plot:
        plot(report, Path(args.plot))
        console.print(f"plot: {args.plot}")
    if args.markdown:
        import shlex
        import sys

        command = "fico bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] \
            else "fico bench " + " ".join(args.recipes)
        write_markdown(Path(args.markdown), markdown(report, command), report["model"])
        console.print(f"markdown: {args.markdown}")
    return 0
