"""The ``fico`` command line.

Commands: ``run`` (a recipe against the unreduced model: tokens per site and layer, answers,
prefill time, fidelity), ``list`` (registered components and bundled recipes), ``cost``
(analytic FLOPs and memory), ``explain`` (a recipe as filter/correlate/compress with
formulas and BibTeX), ``ablate`` (a measured grid of knob values or stage swaps), ``show``
(where discarded tokens went, as a PNG), ``bench`` (recipes side by side, measured),
``eval`` (lmms-eval tasks), ``leaderboard`` (every method on fico-toy at equal budgets),
``fit`` (FitPrune's tables fitted on a model) and ``toy-task``. Options and ``key=value`` overrides may come
in any order. Without ``--model``, ``run`` uses the trained toy model (or the embedded
tiny LLaVA-1.5-shaped one).

Only the commands that need them import torch and the model code, so ``fico --help`` and
usage errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..cost.conventions import CONVENTIONS
from ..errors import RecipeError
from ..models import dtype_argument

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

DEFAULT_RECIPE = "fastv"
DESCRIPTION = ("Training-free token reduction for LLaVA-style models as filter -> correlate -> compress recipes. "
               "Options and key=value overrides may come in any order.")


def _token_counts(text: str):
    """``60`` or ``15,15,23`` (a list: costs are averaged over the lengths)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a comma list of integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values[0] if len(values) == 1 and "," not in text else values


def _image_size(text: str) -> tuple[int, int]:
    """``WxH`` (width by height, in pixels, as an image viewer says it) -> ``(height, width)``,
    the order transformers' ``image_sizes`` use."""
    width, sep, height = text.lower().partition("x")
    try:
        size = (int(height), int(width))
    except ValueError:
        size = None
    if not sep or size is None or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, such as 640x480, got {text!r}")
    return size


def _positive_int(text: str, least: int = 1, kind: str = "a positive integer") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {value}")
    return value


def _count(text: str) -> int:
    return _positive_int(text, 0, "an integer of 0 or more")


def _plugin_option(parser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE",
                        help="a local plugin file whose components the recipe or overrides may name (repeatable)")


def parse_arguments(parser: argparse.ArgumentParser, commands: dict[str, argparse.ArgumentParser],
                    argv: list[str]) -> argparse.Namespace:
    """The command's arguments, its options and positionals in any order.

    argparse's ``parse_args`` ends a run of positionals at the first option, so
    ``fico run fastv --plugin f.py k=3`` would reject ``k=3``. Its intermixed parser takes
    them in any order but not through subparsers: the command is found here and its own
    parser reads the rest intermixed.
    """
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)  # --help, no command, or an unknown one: argparse's own message
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fico", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run a recipe against the unreduced model")
    run.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help="bundled name or YAML path")
    run.add_argument("overrides", nargs="*", default=[], help="knob overrides, key=value")
    run.add_argument("--model", default=None,
                     help="toy (the trained fico-toy, the default when its weights are shipped), embedded (random "
                          "tiny LLaVA-1.5-shaped, the default otherwise), or a local checkpoint directory")
    run.add_argument("--image", default=None, help="image file (default: a generated picture)")
    run.add_argument("--seed", type=int, default=0, help="which generated test image")
    run.add_argument("--prompt", default=None, help="a question (default: the toy image's six questions)")
    run.add_argument("--max-new-tokens", type=int, default=None, help="default: 1 on the toy (one-word answers), 3 on the embedded model, else 8")
    run.add_argument("--repeats", type=_positive_int, default=7, help="timed prefill repetitions per configuration")
    run.add_argument("--dtype", type=dtype_argument(), default="float32",
                     help="float32 (default), float16, bfloat16, float64; aliases fp32, fp16, bf16, ...")
    run.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    run.add_argument("--all-layers", action="store_true", help="list every layer, not only those that change")
    _plugin_option(run)
    sub.add_parser("list", help="list registered components and bundled recipes")
    cost = sub.add_parser("cost", help="analytic prefill cost (FLOPs, KV cache, memory) of a recipe on a model")
    cost.add_argument("model", help="llava-1.5-7b, llava-1.5-13b, llava-next-7b, qwen2-vl-7b, qwen2.5-vl-7b, "
                                    "qwen3-vl-8b, embedded, embedded-next, embedded-qwen2-vl (-qwen2.5-vl, "
                                    "-qwen3-vl), toy, or a local checkpoint directory")
    cost.add_argument("recipe", nargs="?", default=None, help="bundled name or YAML path (default: unreduced)")
    cost.add_argument("overrides", nargs="*", default=[], help="knob overrides, key=value")
    cost.add_argument("--text-tokens", type=_token_counts, default=60,
                      help="text tokens in the prompt (default 60); a comma list averages over the lengths")
    cost.add_argument("--convention", choices=CONVENTIONS, default=None,
                      help="FLOPs convention (default: llm-viewer, the paper's LLM-only count; full, tower "
                           "included, for Qwen-VL, whose tower is 22-59%% of the prefill)")
    cost.add_argument("--dtype", type=dtype_argument(quantized=True), default="float16",
                      help="weight and KV-cache precision: float16 (default), bfloat16, float32, float64, int8, int4; "
                           "aliases fp16, bf16, ...")
    cost.add_argument("--image-size", type=_image_size, default=None, metavar="WxH",
                      help="the image's width x height, for models whose token count depends on it (LLaVA-NeXT: "
                           "its crops, base image and newlines; default: its largest resolution; Qwen-VL: its "
                           "patches after Qwen's resize; default 672x672)")
    cost.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _plugin_option(cost)
    explain = sub.add_parser("explain", help="a recipe as filter/correlate/compress with formulas and BibTeX")
    explain.add_argument("recipe")
    explain.add_argument("overrides", nargs="*", default=[])
    explain.add_argument("--format", choices=["text", "md", "tex"], default="text")
    explain.add_argument("--model", default="llava-1.5-7b", help="whose layers and token counts to show")
    _plugin_option(explain)
    ablate = sub.add_parser("ablate", help="a grid of knob values / stage swaps, each measured (resumable)")
    ablate.add_argument("recipe")
    ablate.add_argument("overrides", nargs="*", default=[], help="knob overrides for every cell, key=value")
    ablate.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (filter/correlate/compress swap a stage)")
    ablate.add_argument("--variants", default=None, help="'paper': the paper's ablation table for the recipe")
    ablate.add_argument("--model", default="toy", help="toy (accuracy), embedded or a checkpoint (fidelity)")
    ablate.add_argument("--images", type=int, default=50)
    ablate.add_argument("--dtype", type=dtype_argument(), default="float32")
    ablate.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ablate.add_argument("--out", default=None,
                        help="JSON-lines results; reruns resume cells measured under the same conditions (default: "
                             "a file named after the recipe, the model and those conditions)")
    ablate.add_argument("--plot", default=None, help="write a plot (bars, line or heat-map)")
    _plugin_option(ablate)
    show = sub.add_parser("show", help="draw where discarded tokens' information went (PNG)")
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*", default=[])
    show.add_argument("--image", default=None, help="image file (default: a generated toy image)")
    show.add_argument("--seed", type=int, default=0, help="which generated image")
    show.add_argument("--model", default="toy",
                      help="toy (default), embedded, embedded-next, embedded-qwen2-vl (-qwen2.5-vl, "
                           "-qwen3-vl), or a local checkpoint directory")
    show.add_argument("--out", default="fico-show.png")
    show.add_argument("--panels", type=int, default=5, help="reducing layers to draw at most")
    _plugin_option(show)
    bench = sub.add_parser("bench", help="recipes side by side with the unreduced model, measured")
    bench.add_argument("recipes", nargs="+", help="bundled names or YAML paths")
    bench.add_argument("--budgets", default=None, help="comma-separated TFLOPs budgets: use budgets/NAME_Bt variants")
    bench.add_argument("--tokens", default=None, help="comma-separated visual-token budgets (192,128,64): use "
                                                      "budgets/NAME_T variants")
    bench.add_argument("--model", default="toy", help="toy (default), shaped, shaped-7b (LLaVA-1.5-7B widths, random "
                                                      "weights; for a GPU), shaped-next, shaped-next-7b (LLaVA-NeXT's "
                                                      "token counts), embedded, embedded-next, or a local checkpoint "
                                                      "directory")
    bench.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    bench.add_argument("--dtype", type=dtype_argument(), default="float32")
    bench.add_argument("--images", type=int, default=100, help="toy test images (6 questions each)")
    bench.add_argument("--reps", type=_positive_int, default=7, help="timed prefill repetitions per configuration")
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--memory", action="store_true",
                       help="measure each prefill's peak memory and the most fico's work adds (always on CUDA; on "
                            "the CPU it profiles one more prefill per configuration)")
    bench.add_argument("--decode-tokens", type=_count, default=16,
                       help="tokens per timed decode (default 16); 0 times the prefill only")
    bench.add_argument("--json", default=None, help="write the results as JSON")
    bench.add_argument("--plot", default=None, help="write accuracy/latency against TFLOPs as an image")
    bench.add_argument("--replay", action="store_true",
                       help="also time the vanilla modules on each run's token counts: the speedup this machine "
                            "gives those counts without fico, and fico's efficiency against it")
    bench.add_argument("--markdown", default=None, help="update this markdown file's results block (docs/benchmarks.md)")
    bench.add_argument("--block", default=None, help="the results block's name in --markdown (default: the model)")
    _plugin_option(bench)
    evaluate = sub.add_parser("eval", help="the unreduced model and recipes on lmms-eval tasks, compared (resumable)")
    evaluate.add_argument("recipes", nargs="+", help="bundled names or YAML paths")
    evaluate.add_argument("--tasks", required=True, help="comma-separated lmms-eval tasks (fico_toy_vqa, "
                                                         "fico_toy_vqa_mc run offline anywhere)")
    evaluate.add_argument("--model", default="toy",
                          help="toy (default), embedded, embedded-next, embedded-qwen2-vl (-qwen2.5-vl, "
                           "-qwen3-vl), or a local checkpoint directory")
    evaluate.add_argument("--budgets", default=None, help="comma-separated TFLOPs budgets: budgets/NAME_Bt variants")
    evaluate.add_argument("--tokens", default=None, help="comma-separated visual-token budgets: budgets/NAME_T variants")
    evaluate.add_argument("--limit", type=int, default=None, help="the first N documents of each task")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--include-path", action="append", default=[], metavar="DIR",
                          help="a folder of local lmms-eval task YAMLs (repeatable)")
    evaluate.add_argument("--toy-images", type=int, default=50, help="toy test images in fico's tasks (6 questions each)")
    evaluate.add_argument("--dtype", type=dtype_argument(), default="float32")
    evaluate.add_argument("--convention", choices=CONVENTIONS, default="llm-viewer", help="FLOPs counting convention")
    evaluate.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    evaluate.add_argument("--out", default=None, help="results folder; reruns skip finished cells (default: a folder "
                                                      "named after the model and the conditions)")
    _plugin_option(evaluate)
    board = sub.add_parser("leaderboard", help="every bundled method on fico-toy at equal budgets, with standard errors")
    board.add_argument("--model", default="toy", help="toy (the leaderboard's model)")
    board.add_argument("--methods", default=None, help="comma-separated bundled methods (default: all)")
    board.add_argument("--tokens", default="192,128,64", help="visual-token budgets (budgets/NAME_T variants)")
    board.add_argument("--flops", default="1.5,2.4,3.3,4.2",
                       help="the FiCoCo paper's TFLOPs budgets on LLaVA-1.5-7B (budgets/NAME_Bt variants, solved on "
                            "the toy for the same fraction of its cost)")
    board.add_argument("--images", type=_positive_int, default=300, help="toy test images (6 questions each)")
    board.add_argument("--threads", type=_positive_int, default=2)
    board.add_argument("--json", default=None, help="write the report as JSON")
    board.add_argument("--plot", default=None, help="write accuracy against FLOPs per method as an image")
    board.add_argument("--markdown", default=None, help="update this markdown file's leaderboard block")
    fit = sub.add_parser("fit", help="fit a method's schedule on a model: FitPrune's per-layer tables")
    fit.add_argument("method", choices=["fitprune"])
    fit.add_argument("--model", default=None, help="toy (default), embedded..., or a local checkpoint directory")
    fit.add_argument("--reduction-ratio", default="70,80,90",
                     help="FLOPs reduction targets in percent, as FitPrune's reduction_ratio knob (default 70,80,90)")
    fit.add_argument("--samples", default="64",
                     help="calibration samples: a count (toy: training images; embedded: generated pictures) or a "
                          "JSON-lines file of {\"image\": PATH, \"text\": QUESTION} (default 64)")
    fit.add_argument("--count-as", default=None, metavar="MODEL",
                     help="count FLOPs with this model's widths (llava-1.5-7b: the official constants); same depth")
    fit.add_argument("--out", default=None, help="write a recipe extending fitprune with the fitted tables")
    fit.add_argument("--threads", type=_positive_int, default=None)
    fit.add_argument("--json", action="store_true", help="print JSON (each bisection step included)")
    fit.add_argument("--verbose", action="store_true", help="print each bisection step")
    toy_task = sub.add_parser("toy-task", help="write fico's toy VQA tasks for lmms-eval (--include_path DIR)")
    toy_task.add_argument("directory")
    toy_task.add_argument("--images", type=int, default=50, help="toy test images (6 questions each)")
    toy_task.add_argument("--first-image", type=int, default=0)
    args = parse_arguments(parser, sub.choices, sys.argv[1:] if argv is None else list(argv))
    from rich.console import Console

    from ..errors import FicoError
    from .console import output_console

    console = output_console()
    try:
        if args.command == "list":
            return list_components(console)
        if args.command == "cost":
            return show_cost(args, console)
        if args.command == "explain":
            from ..loading import load_recipe
            from .explain import explanation, render

            recipe = load_recipe(args.recipe, args.overrides, plugins=args.plugin)
            print(render(explanation(recipe, args.model), args.format))
            return 0
        if args.command == "ablate":
            from .ablate import ablate as run_ablation
            from .ablate import plot as plot_ablation
            from .ablate import summary

            records = run_ablation(args.recipe, args.grid, args.variants, args.model, args.images, args.out, console,
                                   overrides=args.overrides, plugins=args.plugin, dtype=args.dtype,
                                   threads=args.threads)
            console.print(summary(records))
            if args.plot:
                plot_ablation(records, [] if args.variants else args.grid, args.plot)
                console.print(f"plot: {args.plot}")
            return 0
        if args.command == "show":
            from ..loading import load_recipe
            from .show import show as draw_show

            path, drawn, total = draw_show(load_recipe(args.recipe, args.overrides, plugins=args.plugin), args.model,
                                           args.image, args.seed, args.out, args.panels)
            shown = f"all {total} reducing steps" if drawn == total else \
                f"{drawn} of {total} reducing steps (--panels {total} draws all)"
            console.print(f"wrote {path}: {shown} and the kept-token map")
            return 0
        if args.command == "bench":
            from .bench import main_bench

            return main_bench(args, console)
        if args.command == "eval":
            from .evaluation import main_eval

            return main_eval(args, console)
        if args.command == "leaderboard":
            from .leaderboard import main_leaderboard

            return main_leaderboard(args, console)
        if args.command == "fit":
            from .fit import main_fit

            return main_fit(args, console)
        if args.command == "toy-task":
            from .evaluation import main_toy_task

            return main_toy_task(args, console)
        return run_recipe(args, console)
    except (FicoError, OSError) as error:
        # stderr, unwrapped: the message names a file and a key path a user greps for or copies.
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {error}", highlight=False)
        return 2
    except KeyboardInterrupt:
        # results files are written whole or not at all (fico.commands.results), so stopping is safe
        print(f"fico {args.command}: interrupted", file=sys.stderr)
        return 130


def list_components(console: Console) -> int:
    import inspect

    from ..loading import load_recipe
    from ..recipe import bundled_recipes, recipe_name
    from ..recipe.values import format_value
    from ..registry import default_registry
    from .console import Table
    from .explain import formulas, knob_text, summary

    registry = default_registry()
    table = Table(title="registered components")
    for column in ("stage", "name", "parameters", "summary (with citation)"):
        table.add_column(column)
    formula_lines = []
    for stage in ("filter", "correlator", "compressor"):
        for name in registry.names(stage):
            cls = registry.components[stage][name]
            params = [f"{recipe_name(p.name)}=" + ("(required)" if p.default is p.empty else format_value(p.default))
                      for p in inspect.signature(cls.__init__).parameters.values()
                      if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
            table.add_row(stage, name, ", ".join(params), summary(cls))
            formula_lines += [f"[bold]{stage} {name}[/]:  {formula}" for formula in formulas(cls.__new__(cls))]
    console.print(table)
    console.print("[bold]formulas[/] (LaTeX, from each component's docstring)")
    for line in formula_lines:
        console.print(line, highlight=False, markup=True, soft_wrap=True)
    from .docgen import family_configs, family_support

    recipes = Table(title="bundled recipes")
    for column in ("recipe", "knobs", "runs on", "description"):
        recipes.add_column(column)
    configs = family_configs()
    for name in bundled_recipes():
        recipe = load_recipe(name)
        solved = recipe.budget.knob if recipe.budget is not None else None
        support = family_support(recipe, configs)
        runs_on = ", ".join(f"{family} ([CLS]-free)" if cell == "cls-free" else family
                            for family, cell in support.items() if not cell.startswith("no"))
        recipes.add_row(name, knob_text(recipe.knobs, solved), runs_on or "none as written", recipe.description)
    console.print(recipes)
    return 0


def show_cost(args, console: Console) -> int:
    from ..cost.model import model_spec, recipe_cost
    from ..loading import load_recipe
    from .console import Table

    recipe = load_recipe(args.recipe, overrides=args.overrides, plugins=args.plugin) if args.recipe else None
    spec = model_spec(args.model)
    if args.image_size is not None and not spec.depends_on_image_size:
        raise RecipeError(f"--image-size: {spec.name} gives every image {spec.patches} tokens whatever its size; "
                          f"the option is for models whose count depends on it (LLaVA-NeXT, Qwen-VL)")
    convention = args.convention or spec.default_convention
    report = recipe_cost(spec, recipe, args.text_tokens, convention, args.dtype, args.image_size)
    base = recipe_cost(spec, None, args.text_tokens, convention, args.dtype, args.image_size)
    if recipe is not None and recipe.budget is not None:
        report.schedule = dict(report.schedule or {}, budget=recipe.budget.as_dict())
    if args.json:
        print(report.to_json())
        return 0
    if recipe is not None and recipe.budget is not None:
        console.print(recipe.budget.describe(), highlight=False)
    texts = (f"{report.text_tokens} text tokens" if isinstance(report.text_tokens, int)
             else f"averaged over {len(report.text_tokens)} text lengths {report.text_tokens}")
    passes, _, grids = spec.image(args.image_size)
    if hasattr(spec, "patch_grid"):  # a native-resolution tower
        from ..cost.native import DEFAULT_IMAGE

        (height, width), (h, w) = args.image_size or DEFAULT_IMAGE, spec.patch_grid(args.image_size)
        vision = sum(e["flops"] for e in base.per_layer if e["site"] in ("vision", "merger")) / 1e12
        share = f"; tower and mergers {vision:.3f} TFLOPs, {vision / base.tflops:.0%} of the unreduced prefill" \
            if convention == "full" else ""
        console.print(f"a {width}x{height} image: resized to {w * spec.patch_size}x{h * spec.patch_size}, {h}x{w} "
                      f"patches of {spec.patch_size} px, {grids[0][0]}x{grids[0][1]} = {base.tokens['features']} "
                      f"visual tokens after the 2 x 2 merger{share}", highlight=False)
    elif grids is not None:
        (height, width) = args.image_size or max(spec.grid_pinpoints, key=lambda size: spec.image(size)[1])
        console.print(f"a {width}x{height} image: {passes} CLIP passes (base image + {passes - 1} crops), "
                      f"{grids[0][0]}x{grids[0][1]} base cells + {grids[1][0]}x{grids[1][1]} unpadded cells + "
                      f"{grids[1][0]} newlines = {base.tokens['features']} visual tokens", highlight=False)
    table = Table(title=f"prefill cost of {report.recipe or 'the unreduced model'} on {report.model} "
                        f"({report.convention}, {texts}, {report.dtype})")
    for column in ("", "reduced", "unreduced") if recipe else ("", "value"):
        table.add_column(column, justify="right")
    rows = [("TFLOPs", f"{report.tflops:.4f}", f"{base.tflops:.4f}"),
            ("KV cache (MB)", f"{report.kv_cache_mb:.1f}", f"{base.kv_cache_mb:.1f}"),
            ("weights (GB)", f"{report.weights_gb:.2f}", f"{base.weights_gb:.2f}"),
            ("activations (GB)", f"{report.activations_gb:.3f}", f"{base.activations_gb:.3f}"),
            ("memory (GB)", f"{report.memory_gb:.2f}", f"{base.memory_gb:.2f}"),
            ("image features", str(report.tokens["features"]), str(base.tokens["features"])),
            ("LLM tokens per layer", _runs(report.tokens["llm"]), _runs(base.tokens["llm"]))]
    if recipe is not None and any(s.site in ("llm", "llm_mid") for s in recipe.steps):
        from ..recipe.plan import equivalent_tokens, plan_recipe

        plan = plan_recipe(recipe, spec.geometry(args.image_size))
        rows.append(("visual tokens over decoder layers", equivalent_text(
            equivalent_tokens(plan.llm.attention, plan.llm.mlp[-1])), f"{base.tokens['features']} at every layer"))
    for row in rows:
        table.add_row(*(row if recipe else row[:2]))
    console.print(table)
    return 0


def equivalent_text(equivalent: dict) -> str:
    """Progressive schedules' 'equivalent tokens', both ways the papers count them."""
    return (f"{equivalent['after_reduction']:.1f} averaged after each layer's reduction (SparseVLM's count), "
            f"{equivalent['at_input']:.1f} at each layer's input (PyramidDrop's); {equivalent['at_output']:.0f} "
            f"reach the output")


def adaptive_notes(plan, trace) -> list[str]:
    """What to say when a step that chooses its own count per image reduced nothing (as many
    tokens left it as entered): the output can still differ, because its compress stage may
    rewrite the kept tokens (PruMerge+'s kNN merge does, as its official code does)."""
    notes = []
    for step in [p.step for p in plan.chosen_by_data()]:
        kept_all = [r for r in trace.steps if r.site == step.site and r.tokens_out >= r.tokens_in]
        if kept_all:
            notes.append(f"{step.where} chooses its count per image and kept all {kept_all[0].tokens_in} tokens "
                         f"({kept_all[0].tokens_in} -> {kept_all[0].tokens_out}) for {len(kept_all)} image(s): no "
                         f"reduction, but its compress stage ({step.compressor.name}) still rewrites the kept tokens, "
                         f"so the answers can differ from the unreduced model's")
    return notes


def layer_table(trace, title: str, all_layers: bool = False):
    """Tokens per site and layer; unless ``all_layers``, runs of unchanged layers share one row."""
    from .console import Table

    table = Table(title=title)
    for column in ("site", "layer", "tokens in", "tokens out"):
        table.add_column(column, justify="right")
    rows = trace.rows()
    index = 0
    while index < len(rows):
        site, layer, n_in, n_out = rows[index]
        end = index
        if not all_layers and n_in == n_out:
            while end + 1 < len(rows) and rows[end + 1][0] == site and rows[end + 1][2] == n_in == rows[end + 1][3]:
                end += 1
        last = rows[end][1]
        label = str(layer) if last == layer else f"{layer}-{last}"
        table.add_row(site, label, str(n_in), str(n_out) + ("" if n_in != n_out or last == layer else " (unchanged)"),
                      style="bold" if n_in != n_out else "")
        index = end + 1
    return table


def _runs(values: list[int]) -> str:
    """``[636, 636, 348, 348]`` as ``636 x2, 348 x2``."""
    out, start = [], 0
    for index in range(1, len(values) + 1):
        if index == len(values) or values[index] != values[start]:
            out.append(f"{values[start]} x{index - start}" if index - start > 1 else str(values[start]))
            start = index
    return ", ".join(out)


def _questions(args, family, processor):
    """(images, prompts, questions, true answers or None) for the run, prompts in the format of
    the model's ``family``."""
    from PIL import Image

    from .. import embedded
    from ..toy.data import TEST_SEEDS, example

    if args.model == "toy" and not args.image:
        ex = example(TEST_SEEDS.start + args.seed)
        if args.prompt:
            return [ex.image], [family.prompt(args.prompt, 1, processor)], [args.prompt], None
        return ([ex.image] * len(ex.questions), [family.prompt(q.text, 1, processor) for q in ex.questions],
                [q.text for q in ex.questions], [q.answer for q in ex.questions])
    image = Image.open(args.image).convert("RGB") if args.image else embedded.example_image(args.seed)
    if args.prompt:
        question = args.prompt
        text = args.prompt if "<image>" in args.prompt else family.prompt(args.prompt, 1, processor)
    else:
        question = "what is the color of the circle ?" if args.model.startswith("embedded") else "Describe the image."
        text = family.prompt(question, 1, processor)
    return [image], [text], [question], None


def run_recipe(args, console: Console) -> int:
    import time

    import torch

    from .. import apply
    from ..adapters import family_of
    from ..cost.model import TokenCounts, model_spec, prefill_cost, recipe_cost
    from ..loading import load_recipe
    from ..models import check_recipes, image_size_of, load_model, torch_dtype
    from .console import Table
    from .timing import Spread, ratio_text

    recipe = load_recipe(args.recipe, overrides=args.overrides, plugins=args.plugin)
    if args.model is None:
        from ..toy.model import WEIGHTS

        args.model = "toy" if (WEIGHTS / "config.json").is_file() else "embedded"
    dtype = torch_dtype(args.dtype)
    check_recipes([recipe], args.model)  # before minutes of loading weights
    model, processor = load_model(args.model, args.dtype, args.attn)
    images, prompts, questions, truths = _questions(args, family_of(model), processor)
    max_new = args.max_new_tokens or (1 if args.model == "toy" else 3 if args.model.startswith("embedded") else 8)

    def encode(pictures, texts):
        inputs = dict(processor(images=pictures, text=texts, return_tensors="pt", padding=True))
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs

    timed, batch = encode(images[:1], prompts[:1]), encode(images, prompts)
    timed_instruction, batch_instruction = recipe.instruction_inputs(questions[:1]), recipe.instruction_inputs(questions)

    def prefill(**instruction):
        start = time.perf_counter()
        model(**timed, **instruction, logits_to_keep=1)
        return time.perf_counter() - start

    times = {"vanilla": [], "reduced": []}
    with torch.inference_mode():
        prefill()  # warm-up
        with apply(model, recipe):
            prefill(**timed_instruction)
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            times["vanilla"].append(prefill())
            with apply(model, recipe):
                times["reduced"].append(prefill(**timed_instruction))
        base_logits = model(**batch, logits_to_keep=1).logits[:, -1].float()
        base_tokens = model.generate(**batch, max_new_tokens=max_new, do_sample=False)
        with apply(model, recipe) as run:
            logits = model(**batch, **batch_instruction, logits_to_keep=1).logits[:, -1].float()
            tokens = model.generate(**batch, **batch_instruction, max_new_tokens=max_new, do_sample=False)
            model(**timed, **timed_instruction, logits_to_keep=1)  # the trace shows this prefill
        trace = run.trace

    prompt_length = batch["input_ids"].shape[1]
    decode = processor.tokenizer.batch_decode
    base_answers = [a.strip() for a in decode(base_tokens[:, prompt_length:], skip_special_tokens=True)]
    answers = [a.strip() for a in decode(tokens[:, prompt_length:], skip_special_tokens=True)]
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), base_logits.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()

    console.print(layer_table(trace, f"{recipe.name}: tokens per site and layer (last prefill)", args.all_layers))

    qa = Table(title="answers")
    for column in ("question", "truth", "unreduced", recipe.name):
        qa.add_column(column)
    for index, question in enumerate(questions):
        truth = truths[index] if truths else "-"
        qa.add_row(question, truth, base_answers[index], answers[index])
    console.print(qa)

    vanilla, reduced = Spread.of(times["vanilla"]).scaled(1e3), Spread.of(times["reduced"]).scaled(1e3)
    speedup = Spread.ratio(times["vanilla"], times["reduced"])
    summary = Table(title="reduced vs unreduced model", show_header=False)
    names = {"toy": "fico-toy (trained on synthetic VQA)", "embedded": "embedded tiny LLaVA-1.5-shaped (random)",
             "embedded-next": "embedded tiny LLaVA-NeXT-shaped (random)",
             **{f"embedded-{f}": f"embedded tiny {f} (random)" for f in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")}}
    summary.add_row("model", names.get(args.model, args.model))
    summary.add_row("recipe", f"{recipe.source} {' '.join(args.overrides)}")
    summary.add_row("what it does", recipe.description)
    if recipe.budget is not None:
        summary.add_row("budget", recipe.budget.describe())
    spec = model_spec(args.model if args.model.startswith("embedded-qwen") else model)
    image_size = image_size_of(timed, model.config)  # where the model's count depends on the image's size
    ran = prefill_cost(spec, TokenCounts.from_trace(trace, spec, image_size), "llm-viewer")
    unreduced = recipe_cost(spec, None, ran.text_tokens, "llm-viewer", image_size=image_size)
    summary.add_row("cost of what ran (llm-viewer)", f"{unreduced.tflops * 1e3:.2f} -> {ran.tflops * 1e3:.2f} GFLOPs "
                    f"({unreduced.tflops / ran.tflops:.2f}x), KV cache {unreduced.kv_cache_mb:.2f} -> "
                    f"{ran.kv_cache_mb:.2f} MB (float16)")
    summary.add_row("image features per image", str(trace.vision_features or "unchanged"))
    for note in adaptive_notes(run.plan, trace):
        summary.add_row("note", note)
    equivalent = trace.equivalent_tokens()
    if equivalent and any(s.site in ("llm", "llm_mid") for s in trace.steps):
        summary.add_row("visual tokens over decoder layers", equivalent_text(equivalent))
    summary.add_row("prefill, unreduced", vanilla.show(" ms"))
    summary.add_row("prefill, reduced", reduced.show(" ms"))
    summary.add_row("prefill speedup (interleaved pairs)", ratio_text(speedup))
    summary.add_row("time in fico stages", f"{trace.stage_seconds * 1e3:.2f} ms")
    agree = sum(a == b for a, b in zip(answers, base_answers))
    summary.add_row("answers equal to the unreduced model's", f"{agree} of {len(answers)}")
    if truths:
        summary.add_row("correct (unreduced -> reduced)", f"{sum(a == t for a, t in zip(base_answers, truths))} -> "
                        f"{sum(a == t for a, t in zip(answers, truths))} of {len(truths)}")
    summary.add_row("next-token KL(unreduced || reduced)", f"{kl:.4g}")
    console.print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
