"""``fico explain``: a recipe as the paper's three stages, with formulas, parameters and BibTeX."""

from __future__ import annotations

import inspect
import re

from ..citations import BIBTEX
from ..cost.model import model_spec
from ..recipe import POINT_SITES, Recipe, recipe_name
from ..recipe.plan import equivalent_tokens, plan_recipe
from ..recipe.values import flatten_knobs, format_override, format_value
from ..signals import INSTRUCTION_SIGNALS

#: What a ``--format tex`` snippet needs in the preamble (nothing beyond these).
TEX_PACKAGES = ("amsmath", "amssymb")

GREEK = {name: symbol for name, symbol in zip(
    "alpha beta gamma delta epsilon lambda mu tau sigma rho theta eta pi omega nu xi phi psi chi kappa zeta".split(),
    "αβγδελμτσρθηπωνξφψχκζ")}
SYMBOLS = {r"\cdot": "·", r"\leftarrow": "←", r"\in": "∈", r"\ge": "≥", r"\le": "≤", r"\infty": "∞", r"\arg": "arg",
           r"\varnothing": "∅", r"\sum": "Σ", r"\max": "max", r"\lVert": "‖", r"\rVert": "‖", r"\;-\;": " - ",
           r"\qquad": "   ", r"\quad": "  ", r"\,": " ", r"\;": " ", r"\ ": " ", r"\{": "{", r"\}": "}",
           r"\left": "", r"\right": "", r"\top": "top", r"\notin": "∉", r"\cos": "cos", r"\sin": "sin",
           r"\sim": "~", r"\Bigg": "", r"\Big": "", r"\big": "", r"\bmod": "mod", r"\lfloor": "⌊", r"\rfloor": "⌋",
           r"\lceil": "⌈", r"\rceil": "⌉", r"\min": "min", r"\exp": "exp", r"\#": "#", r"\setminus": "∖",
           r"\cup": "∪", r"\cap": "∩", r"\neq": "≠", r"\ne": "≠", r"\times": "×", r"\approx": "≈", r"\pm": "±",
           r"\sqrt": "√", r"\ldots": "...", r"\cdots": "...", r"\mid": "|", r"\langle": "⟨", r"\rangle": "⟩"}
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


SITE_WHERE = {
    "vision": "inside CLIP layers, after the attention residual, before the MLP",
    "vision_output": "on the tokens leaving the feature layer ([CLS] included), before the projector",
    "pre_llm": "on the projector's outputs, per image, before the language model",
    "llm": "at the input of decoder layers (prefill)",
    "llm_mid": "inside decoder layers (prefill), after the attention residual, before the MLP, from that "
               "layer's own attention",
}


def where(step) -> str:
    """Where a step acts, in words."""
    text = SITE_WHERE[step.site]
    if step.site == "llm":
        text += (", from this layer's own q/k of its input" if step.signal_layer == "current"
                 else ", from the previous layer's attention")
    return text


def policies(step) -> list[str]:
    """The step's position, order and feature policies, in words."""
    out = []
    if step.site in ("llm", "llm_mid"):
        out.append("kept tokens keep their RoPE positions; decode continues the original numbering"
                   if step.positions == "keep" else
                   "positions are renumbered contiguously after the step; each decode step takes, in every layer, "
                   "the next position of that layer's own frame")
    if step.site in ("vision_output", "pre_llm"):
        out.append("the language model sees a shorter sequence, its positions contiguous")
        out.append("tokens reach it in their original order" if step.order == "original"
                   else "tokens reach it in the order the method emits them")
    if step.site == "vision_output" and step.cls_feature:
        out.append("[CLS] reaches the projector as an image feature")
    if step.required_signals() & INSTRUCTION_SIGNALS:
        out.append("reads the instruction (the model is called with instruction=...) through CLIP's text tower from "
                   + (f"text_encoder={step.text_encoder}" if step.text_encoder else
                      "text_encoder, not set: give text_encoder=DIR, a local CLIP checkpoint"))
    return out


def explanation(recipe: Recipe, model: str = "llava-1.5-7b") -> dict:
    """The recipe as data: steps with their stages, schedule and token counts, and citations."""
    plan = plan_recipe(recipe, model_spec(model).geometry())
    steps, keys = [], list(recipe.config.get("cite") or [])
    for step in recipe.steps:
        planned = plan.of(step)
        stages = []
        for component in (step.filter, step.correlator, step.compressor):
            keys += [k for k in component.cite if k not in keys]
            stages.append({"stage": component.stage, "name": component.name, "summary": summary(type(component)),
                           "parameters": _parameters(component), "latex": formulas(component),
                           "text": [latex_to_text(f) for f in formulas(component)], "cite": list(component.cite)})
        steps.append({
            "step": step.index, "site": step.site, "where": where(step), "policies": policies(step),
            "layers": [p.layer for p in planned],
            "schedule": {"rule": step.schedule.kind, "value": step.schedule.value,
                         "removed": [p.remove for p in planned], "tokens_in": [p.tokens_in for p in planned]},
            "proportional_attention": step.proportional_attention, "stages": stages,
        })
    keys = list(dict.fromkeys(keys))
    visual = [n for n in plan.llm.attention] if plan.features is not None else []
    equivalent = equivalent_tokens(visual, plan.llm.mlp[-1]) if visual else None
    return {"recipe": recipe.name, "equivalent_tokens": equivalent, "source": recipe.source, "description": recipe.description,
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


def tex_prose(text: str) -> str:
    """Prose as LaTeX: backtick-quoted code spans as ``\\texttt``, straight double quotes as LaTeX's
    opening and closing quotes, the rest escaped (:func:`tex_escape`)."""
    out = []
    for index, part in enumerate(str(text).split("`")):
        if index % 2:  # inside a backtick span (an unpaired backtick closes at the end)
            out.append(f"\\texttt{{{tex_escape(part)}}}")
            continue
        quoted = part.split('"')
        out.append("".join(tex_escape(piece) + ("" if i == len(quoted) - 1 else "``" if i % 2 == 0 else "''")
                           for i, piece in enumerate(quoted)))
    return "".join(out)


def _layers_text(step: dict) -> str:
    """``layers [4, 5]`` for layer sites; nothing for point sites, which act once."""
    return "" if step["site"] in POINT_SITES else f"layers {step['layers']}; "


def _tex(data: dict) -> str:
    """A LaTeX snippet that compiles under ``\\documentclass{article}`` with :data:`TEX_PACKAGES`."""
    code = lambda text: f"\\texttt{{{tex_escape(text)}}}"
    out = [f"% fico explain {data['recipe']} ({data['source']})",
           f"% needs \\usepackage{{{','.join(TEX_PACKAGES)}}}; the BibTeX entries are at the end",
           f"\\paragraph{{{tex_escape(data['recipe'])}}} {tex_prose(data['description'])}"]
    if data["knobs"]:
        words = [format_override(k, v) for k, v in flatten_knobs(data["knobs"]).items() if k != data["solved"]]
        out.append(f"Knobs: {', '.join(code(w) for w in words)}.")
    if data["budget"]:
        out.append(f"Budget: {tex_prose(data['budget'])}.")
    for step in data["steps"]:
        layers = "" if step["site"] in POINT_SITES else f", layers {', '.join(map(str, step['layers'])) or 'none'}"
        out.append(f"\\subparagraph{{Step {step['step']} ({tex_escape(step['site'])}{layers})}} "
                   f"{tex_prose(step['where'])}; schedule {code(step['schedule']['rule'])} = "
                   f"{code(format_value(step['schedule']['value']))}."
                   + "".join(f" {tex_prose(p[0].upper() + p[1:])}." for p in step["policies"]))
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
    features = data["image_features"]
    out.append(f"image features reaching the LLM on {data['model']}: "
               f"{features if features is not None else 'chosen per image (adaptive)'}")
    if data["equivalent_tokens"] and any(s["site"] in ("llm", "llm_mid") for s in data["steps"]):
        e = data["equivalent_tokens"]
        out.append(f"visual tokens averaged over decoder layers: {e['at_input']:.1f} at each layer's input "
                   f"(PyramidDrop's count), {e['after_reduction']:.1f} after each layer's reduction (SparseVLM's); "
                   f"{e['at_output']:.0f} reach the output")
    for step in data["steps"]:
        removed = step["schedule"]["removed"]
        head = (f"step {step['step']}: {step['site']} site, {step['where']}; {_layers_text(step)}"
                f"{step['schedule']['rule']} = {format_value(step['schedule']['value'])} "
                f"(removes {removed[0] if step['site'] in POINT_SITES and len(removed) == 1 else removed})")
        out.append(f"### {head}" if md else f"\n{head}")
        for policy in step["policies"]:
            out.append(f"- {policy}" if md else f"  {policy}")
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
