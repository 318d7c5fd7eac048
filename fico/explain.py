"""``fico explain``: a recipe as the paper's three stages, with formulas, parameters and BibTeX."""

from __future__ import annotations

import inspect
import re

from .citations import BIBTEX
from .cost import model_spec
from .overrides import flatten_knobs, format_override, format_value
from .plan import plan_recipe
from .recipe import Recipe, recipe_name

#: What a ``--format tex`` snippet needs in the preamble (nothing beyond these).
TEX_PACKAGES = ("amsmath", "amssymb")

GREEK = {name: symbol for name, symbol in zip(
    "alpha beta gamma delta epsilon lambda mu tau sigma".split(), "αβγδελμτσ")}
SYMBOLS = {r"\cdot": "·", r"\leftarrow": "←", r"\in": "∈", r"\ge": "≥", r"\le": "≤", r"\infty": "∞", r"\arg": "arg",
           r"\varnothing": "∅", r"\sum": "Σ", r"\max": "max", r"\lVert": "‖", r"\rVert": "‖", r"\;-\;": " - ",
           r"\qquad": "   ", r"\quad": "  ", r"\,": " ", r"\;": " ", r"\ ": " ", r"\{": "{", r"\}": "}",
           r"\left": "", r"\right": "", r"\top": "top"}
STAGE_TITLES = {"filter": "Filter: which tokens to discard", "correlator": "Correlate: where their information goes",
                "compressor": "Compress: how it is recycled"}


def summary(cls: type) -> str:
    """A component's one-line summary: the first paragraph of its docstring, cut at a
    sentence end (a paragraph that runs into a formula is not cut mid-sentence)."""
    doc = inspect.getdoc(cls) or ""
    first = doc.split("\n\n")[0].split(".. math::")[0].replace("\n", " ").strip()
    if not first or first.endswith((".", "!", "?")):
        return first
    end = max(first.rfind(". "), first.rfind("? "), first.rfind("! "))
    return first[:end + 1] if end > 0 else first.rstrip(" :,;") + " ..."


def formulas(component) -> list[str]:
    """The ``.. math::`` blocks of a component's docstring, one line each."""
    found, lines = [], (inspect.getdoc(type(component)) or "").splitlines()
    for index, line in enumerate(lines):
        if line.strip().startswith(".. math::"):
            block = [line.strip()[len(".. math::"):].strip()]
            for follow in lines[index + 1:]:
                if not follow.strip() or not follow.startswith(" "):
                    break
                block.append(follow.strip())
            found.append(" ".join(part for part in block if part))
    return found


def _group(text: str, start: int) -> tuple[str, int]:
    """The brace group opening at ``text[start]`` (skipping spaces) and the index after it."""
    while text[start] == " ":
        start += 1
    depth = 0
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start + 1:index], index + 1
    raise ValueError(f"unbalanced braces in {text!r}")


def _fractions(text: str) -> str:
    """``\\frac{a}{b}`` -> ``(a)/(b)``, nested groups included."""
    while (start := text.find("\\frac")) >= 0:
        numerator, after = _group(text, start + len("\\frac"))
        denominator, end = _group(text, after)
        top, bottom = _fractions(numerator), _fractions(denominator)
        top = top if re.fullmatch(r"\w+", top) else f"({top})"
        bottom = bottom if re.fullmatch(r"\w+", bottom) else f"({bottom})"
        text = text[:start] + f"{top}/{bottom} " + text[end:]
    return text


def latex_to_text(latex: str) -> str:
    """A terminal rendering of the LaTeX subset the docstrings use."""
    text = _fractions(latex)
    text = re.sub(r"\\(?:operatorname|mathrm|text|mathbb)\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\bar\s*(\w)", lambda m: m.group(1) + "\u0304", text)
    text = re.sub(r"\\tilde\s*(\w)", lambda m: m.group(1) + "\u0303", text)
    text = re.sub(r"\\begin\{cases\}(.*?)\\end\{cases\}",
                  lambda m: "{ " + m.group(1).replace("\\\\", ";").replace("&", " if ") + " }", text)
    for name, symbol in sorted(SYMBOLS.items(), key=lambda item: -len(item[0])):
        text = text.replace(name, symbol)
    for name, symbol in GREEK.items():
        text = re.sub(rf"\\{name}(?![a-zA-Z])", symbol, text)
    return re.sub(r"\s+", " ", text).strip()


def _parameters(component) -> dict:
    return {recipe_name(k): v for k, v in vars(component).items() if not k.startswith("_")}


def explanation(recipe: Recipe, model: str = "llava-1.5-7b") -> dict:
    """The recipe as data: steps with their stages, schedule and token counts, and citations."""
    plan = plan_recipe(recipe, model_spec(model).geometry())
    steps, keys = [], list(recipe.config.get("cite") or [])
    for step in recipe.steps:
        site_plan = plan.vision if step.site == "vision" else plan.llm
        planned = [p for p in site_plan.steps.values() if p.step is step]
        stages = []
        for component in (step.filter, step.correlator, step.compressor):
            keys += [k for k in component.cite if k not in keys]
            stages.append({"stage": component.stage, "name": component.name, "summary": summary(type(component)),
                           "parameters": _parameters(component), "latex": formulas(component),
                           "text": [latex_to_text(f) for f in formulas(component)], "cite": list(component.cite)})
        steps.append({
            "step": step.index, "site": step.site,
            "where": ("inside CLIP layers, after the attention residual, before the MLP" if step.site == "vision"
                      else "at the input of decoder layers (prefill), from the previous layer's attention"),
            "layers": [p.layer for p in planned],
            "schedule": {"rule": step.schedule.kind, "value": step.schedule.value,
                         "removed": [p.remove for p in planned], "tokens_in": [p.tokens_in for p in planned]},
            "proportional_attention": step.proportional_attention, "stages": stages,
        })
    keys = list(dict.fromkeys(keys))
    return {"recipe": recipe.name, "source": recipe.source, "description": recipe.description,
            "changes": list(recipe.changes), "knobs": recipe.knobs, "model": model,
            "solved": recipe.budget.knob if recipe.budget is not None else None,
            "budget": recipe.budget.describe() if recipe.budget is not None else None, "image_features": plan.features, "steps": steps,
            "bibtex": [BIBTEX[k] for k in keys if k in BIBTEX]}


def knob_text(knobs: dict, solved: str | None = None) -> str:
    """Knobs as ``key=value`` words that can be pasted back as overrides; a knob a budget
    solves (``solved``) is shown as such, since the budget, not an override, sets it."""
    words = [format_override(k, v) for k, v in flatten_knobs(knobs).items() if k != solved]
    if solved is not None:
        value = flatten_knobs(knobs).get(solved)
        words.append(f"({solved} solved by the budget: {format_value(value)})")
    return " ".join(words)


def parameter_text(parameters: dict) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in parameters.items()) or "no parameters"


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}
_TEX_UNICODE = {"×": r"$\times$", "—": "---", "–": "--", "≥": r"$\geq$", "≤": r"$\leq$", "…": r"\ldots{}",
                "’": "'", "‘": "`", "“": "``", "”": "''", "→": r"$\rightarrow$", "·": r"$\cdot$",
                "≈": r"$\approx$", "∈": r"$\in$", "±": r"$\pm$", "é": r"\'e", "ö": r'\"o', "ü": r'\"u',
                **{symbol: f"$\\{name}$" for name, symbol in GREEK.items()}}


def tex_escape(text: str) -> str:
    """Prose as LaTeX text: special characters escaped, non-ASCII spelled as LaTeX (or ``?``)."""
    out = []
    for char in str(text):
        if char in _TEX_SPECIAL:
            out.append(_TEX_SPECIAL[char])
        elif char in _TEX_UNICODE:
            out.append(_TEX_UNICODE[char])
        elif ord(char) < 128:
            out.append(char)
        else:
            out.append("?")
    return "".join(out)


def _tex(data: dict) -> str:
    """A LaTeX snippet that compiles under ``\\documentclass{article}`` with :data:`TEX_PACKAGES`."""
    code = lambda text: f"\\texttt{{{tex_escape(text)}}}"
    out = [f"% fico explain {data['recipe']} ({data['source']})",
           f"% needs \\usepackage{{{','.join(TEX_PACKAGES)}}}; the BibTeX entries are at the end",
           f"\\paragraph{{{tex_escape(data['recipe'])}}} {tex_escape(data['description'])}"]
    if data["knobs"]:
        words = [format_override(k, v) for k, v in flatten_knobs(data["knobs"]).items() if k != data["solved"]]
        out.append(f"Knobs: {', '.join(code(w) for w in words)}.")
    if data["budget"]:
        out.append(f"Budget: {tex_escape(data['budget'])}.")
    for step in data["steps"]:
        layers = ", ".join(map(str, step["layers"])) or "none"
        out.append(f"\\subparagraph{{Step {step['step']} ({tex_escape(step['site'])}, layers {layers})}} "
                   f"{tex_escape(step['where'])}; schedule {code(step['schedule']['rule'])} = "
                   f"{code(format_value(step['schedule']['value']))}.")
        for stage in step["stages"]:
            cites = f"~\\cite{{{','.join(stage['cite'])}}}" if stage["cite"] else ""
            out.append(f"\\textbf{{{tex_escape(STAGE_TITLES[stage['stage']])}}} ({code(stage['name'])}, "
                       f"{code(parameter_text(stage['parameters']))}){cites}:")
            out += [f"\\begin{{equation}}\n{f}\n\\end{{equation}}" for f in stage["latex"]]
    out.append("% BibTeX\n" + "\n".join("% " + line for entry in data["bibtex"] for line in entry.splitlines()))
    return "\n".join(out)


def render(data: dict, fmt: str) -> str:
    """``text`` (terminal), ``md`` (Markdown with $$ math) or ``tex`` (a LaTeX snippet)."""
    if fmt == "tex":
        return _tex(data)
    out = []
    md = fmt == "md"
    out.append(f"## {data['recipe']}" if md else f"{data['recipe']} ({data['source']})")
    out.append(data["description"])
    out.append(("**knobs**: " if md else "knobs: ") + (knob_text(data["knobs"], data["solved"]) or "none"))
    if data["budget"]:
        out.append(("**budget**: " if md else "budget: ") + data["budget"])
    out.append(f"image features reaching the LLM on {data['model']}: {data['image_features']}")
    for step in data["steps"]:
        head = (f"step {step['step']}: {step['site']} site, {step['where']}; layers {step['layers']}; "
                f"{step['schedule']['rule']} = {format_value(step['schedule']['value'])} "
                f"(removes {step['schedule']['removed']})")
        out.append(f"### {head}" if md else f"\n{head}")
        for stage in step["stages"]:
            params = parameter_text(stage["parameters"])
            cites = f" [{', '.join(stage['cite'])}]" if stage["cite"] else ""
            title = STAGE_TITLES[stage["stage"]]
            out.append(f"- **{title}**: `{stage['name']}` ({params}){cites}" if md
                       else f"  {title}: {stage['name']} ({params}){cites}")
            for latex, text in zip(stage["latex"], stage["text"]):
                out.append(f"\n  $$ {latex} $$\n" if md else f"      {text}")
    out.append("\n### BibTeX\n```bibtex" if md else "\nBibTeX:")
    out += data["bibtex"]
    if md:
        out.append("```")
    return "\n".join(out)
