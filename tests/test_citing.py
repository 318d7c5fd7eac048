"""What a researcher pastes into a paper: `fico explain --format tex`, the BibTeX, the formulas.

The LaTeX is checked two ways: compiled with pdflatex when the machine has it, and always
by a strict check of the snippet (what pdflatex rejects in text mode: unescaped special
characters, non-ASCII, unbalanced braces, commands outside article + amsmath/amssymb).
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import fico
from fico.citations import BIBTEX
from fico.commands.explain import TEX_PACKAGES, explanation, render, summary, tex_escape
from fico.recipe import bundled_recipes

ROOT = Path(__file__).resolve().parent.parent
RECIPES = [name for name in bundled_recipes() if not name.startswith("budgets/")] + ["budgets/ficoco_vl_1.5t"]

# Commands a snippet may use: LaTeX's article class and the packages it declares.
TEXT_COMMANDS = {"paragraph", "subparagraph", "textbf", "texttt", "cite", "begin", "end", "textbackslash",
                 "textasciitilde", "textasciicircum", "textless", "textgreater", "textbar", "ldots", "&", "%",
                 "$", "#", "_", "{", "}", "'", '"'}
MATH_COMMANDS = {"frac", "sum", "max", "min", "arg", "operatorname", "mathrm", "mathbb", "text", "bar", "tilde",
                 "cdot", "leftarrow", "in", "ge", "le", "geq", "leq", "infty", "varnothing", "lVert", "rVert",
                 "quad", "qquad", ",", ";", " ", "!", "{", "}", "\\", "left", "right", "top", "alpha", "beta",
                 "gamma", "delta", "epsilon", "lambda", "mu", "tau", "sigma", "times", "rightarrow", "approx",
                 "pm", "log", "exp", "sqrt", "mathcal", "lfloor", "rfloor", "lceil", "rceil", "cap", "cup",
                 "setminus", "subseteq", "neq", "ne", "prod", "det", "min", "langle", "rangle", "mid", "hat",
                 "emptyset", "odot", "propto", "ldots", "cdots", "vert", "Vert", "|", "Big", "big", "Bigg", "bmod",
                 "mathbf", "#", "ne", "notin", "cos", "sin", "sim", "rho", "theta", "eta", "pi", "omega", "nu", "xi",
                 "phi", "psi", "chi", "kappa", "zeta"}


def strict_tex_problems(tex: str) -> list[str]:
    """What pdflatex would reject, found without a TeX engine."""
    problems = []
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    if any(ord(c) > 127 for c in body):
        problems.append(f"non-ASCII characters: {sorted({c for c in body if ord(c) > 127})}")
    parts = re.split(r"(\\begin\{equation\}.*?\\end\{equation\}|\$[^$]*\$)", body, flags=re.S)
    for index, part in enumerate(parts):
        math = index % 2 == 1
        inner = part
        depth = 0
        for match in re.finditer(r"\\.|[{}]", inner):
            token = match.group()
            depth += {"{": 1, "}": -1}.get(token, 0)
            if depth < 0:
                problems.append(f"unbalanced '}}' in {part[:60]!r}")
                break
        if depth > 0:
            problems.append(f"unbalanced '{{' in {part[:60]!r}")
        commands = set(re.findall(r"\\([A-Za-z]+|.)", inner))
        allowed = MATH_COMMANDS | {"begin", "end"} if math else TEXT_COMMANDS
        unknown = commands - allowed
        if unknown:
            problems.append(f"commands outside {', '.join(TEX_PACKAGES)}: {sorted(unknown)} in {part[:60]!r}")
        if not math:
            bare = re.sub(r"\\.", "", inner)
            for char in "_^&%#":
                if char in bare:
                    problems.append(f"unescaped {char!r} in text: {part[:80]!r}")
    return problems


@pytest.mark.parametrize("name", RECIPES)
def test_tex_snippet_passes_the_strict_check(name):
    tex = render(explanation(fico.load_recipe(name)), "tex")
    assert strict_tex_problems(tex) == []


def test_the_strict_check_catches_what_broke_pdflatex():
    assert strict_tex_problems(r"\texttt{self_preserving}")
    assert strict_tex_problems(r"vision_aware=received")
    assert strict_tex_problems("x \u00d7 y")
    assert strict_tex_problems(r"\textbf{a")
    assert strict_tex_problems(r"\usepackage{foo}")
    assert not strict_tex_problems(r"\texttt{self\_preserving} $a_i$")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no TeX engine on this machine (strict check above)")
@pytest.mark.parametrize("name", RECIPES)
def test_tex_snippet_compiles(name, tmp_path):
    tex = render(explanation(fico.load_recipe(name)), "tex")
    document = ("\\documentclass{article}\\usepackage{" + ",".join(TEX_PACKAGES) + "}\n\\begin{document}\n"
                + tex + "\n\\end{document}\n")
    (tmp_path / "snippet.tex").write_text(document)
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "snippet.tex"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stdout.splitlines() if line.startswith("!")]
    assert result.returncode == 0 and not errors, errors or result.stdout[-2000:]


def test_tex_escape_covers_prose():
    assert tex_escape("a_b & 50% #1 {x} ~^") == r"a\_b \& 50\% \#1 \{x\} \textasciitilde{}\textasciicircum{}"
    assert tex_escape("1.5× faster — λ") == r"1.5$\times$ faster --- $\lambda$"


def test_formulas_read_as_written():
    drop = render(explanation(fico.load_recipe("fastv")), "tex")
    assert "X^T \\leftarrow X^T" not in drop and "X \\leftarrow (x_j)_{j \\in T}" in drop
    for name in ("tome", "evit"):
        tex = render(explanation(fico.load_recipe(name)), "tex")
        equations = re.findall(r"\\begin\{equation\}\n(.*?)\n\\end\{equation\}", tex, flags=re.S)
        assert equations and not any(e.rstrip().endswith(",") for e in equations), equations
    ficoco_v = render(explanation(fico.load_recipe("ficoco_v")), "tex")
    assert "\\tilde s" in ficoco_v and "\\operatorname{top}_r(\\tilde s)" in ficoco_v  # the local penalty


@pytest.mark.parametrize("key", sorted(BIBTEX))
def test_bibtex_entries_are_complete(key):
    entry = BIBTEX[key]
    for field in ("title", "author", "year", "eprint"):
        assert re.search(rf"^\s*{field}\s*=\s*\{{.+\}}", entry, flags=re.M), (key, field)
    venue = "booktitle" if entry.startswith("@inproceedings") else "journal"
    assert re.search(rf"^\s*{venue}\s*=\s*\{{.+\}}", entry, flags=re.M), (key, venue)
    assert "others" not in entry
    assert entry.count("{") == entry.count("}")


def test_ficoco_has_its_nine_authors():
    authors = re.search(r"author\s*=\s*\{(.*)\}", BIBTEX["han2026ficoco"]).group(1).split(" and ")
    assert [a.split(",")[0] for a in authors] == ["Han", "Liu", "Zhang", "Ding", "Chen", "Chen", "Wang", "Yan",
                                                    "Huang"]
    assert "doi = {10.1609/aaai.v40i6.42460}" in re.sub(r"\s+", " ", BIBTEX["han2026ficoco"])


def test_no_doc_points_outside_the_repository():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text()
        assert "shared/" not in text and "../" not in text, path
    assert (ROOT / "docs" / "ficoco-spec.md").is_file()


def test_every_summary_is_a_whole_sentence():
    registry = fico.default_registry()
    for stage, components in registry.components.items():
        for name, cls in components.items():
            text = summary(cls)
            assert text.endswith((".", "...")) and ".. math" not in text, (stage, name, text)
