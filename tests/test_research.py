"""Research workflow: fico explain, provenance and fico show, fico ablate, generated docs."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

import fico
from fico.commands.cli import main
from fico.commands.explain import explanation, latex_to_text, render

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_explain_has_stages_formulas_parameters_and_bibtex():
    data = explanation(fico.load_recipe("ficoco_l"))
    stages = data["steps"][0]["stages"]
    assert [s["name"] for s in stages] == ["ficoco_l", "text_bridged", "self_preserving"]
    assert stages[0]["parameters"]["beta"] == 0.6 and "\\beta" in stages[0]["latex"][0]
    assert "β" in stages[0]["text"][0] and "\\" not in stages[0]["text"][0]
    assert data["steps"][0]["layers"] == list(range(4, 32))
    assert any("han2026ficoco" in b for b in data["bibtex"])
    markdown = render(data, "md")
    assert "$$" in markdown and "```bibtex" in markdown
    tex = render(data, "tex")
    assert "\\begin{equation}" in tex and "\\cite{han2026ficoco}" in tex


@pytest.mark.parametrize("name", [n for n in fico.bundled_recipes() if not n.startswith("budgets/")])
def test_every_formula_renders_as_plain_text(name, capsys):
    assert main(["explain", name]) == 0
    out = capsys.readouterr().out
    formula_lines = [line for line in out.splitlines() if line.startswith("      ")]
    assert formula_lines and not any("\\" in line for line in formula_lines)
    assert re.search(r"^@\w+\{", out, flags=re.M), "a BibTeX entry of the method's source"


def test_latex_to_text_nested_fraction():
    assert latex_to_text(r"\frac{x_j + \sum_{i} \alpha_{ij} x_i}{1 + \sum_{i} \alpha_{ij}}") == \
        "(x_j + Σ_{i} α_{ij} x_i)/(1 + Σ_{i} α_{ij})"
    assert latex_to_text(r"\frac{1}{N}") == "1/N"


@pytest.mark.parametrize("name,overrides", [("tome", ["r=16"]), ("ficoco_v", ["layers=[1,2]"]), ("fastv", []),
                                            ("evit", ["layers=[0,2]"])])
def test_provenance_rows_are_convex_for_merges_and_do_not_change_outputs(tiny_model, single_inputs, name, overrides):
    model = tiny_model()
    inputs = single_inputs()
    recipe = fico.load_recipe(name, overrides)
    with torch.no_grad():
        with fico.apply(model, recipe):
            plain = model(**inputs).logits
        with fico.apply(model, recipe, provenance=True) as run:
            tracked = model(**inputs).logits
    assert torch.equal(plain, tracked)
    for step in run.trace.steps:
        rows = step.sources[0].sum(-1)
        original = step.positions_out[0] >= 0  # EViT's fused tokens (-1) carry their raw weights
        # merges leave convex mixes of the originals; pruning leaves rows of the identity
        assert torch.allclose(rows[original], torch.ones_like(rows[original]), atol=1e-6)
        assert len(step.discarded[0]) == step.removed


def test_provenance_tome_matches_source_tracking(tiny_model, single_inputs):
    """ToMe's own trace_source: each final token covers the originals merged into it; sizes agree."""
    model = tiny_model()
    with torch.no_grad(), fico.apply(model, fico.load_recipe("tome", ["r=40", "layers=[0,1]"]), provenance=True) as run:
        model.model.get_image_features(pixel_values=single_inputs()["pixel_values"])
    sources = run.trace.steps[-1].sources[0]
    covered = (sources > 0).sum(-1)  # originals per token
    assert covered.sum() == 577 and covered.max() > 1


def test_show_writes_a_png(tmp_path):
    out = tmp_path / "show.png"
    assert main(["show", "tome", "r=16", "--model", "embedded", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "show_fastv.png"
    assert main(["show", "fastv", "--model", "embedded", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000


def test_ablate_grid_is_resumable_and_plots(tmp_path, capsys):
    out, png = tmp_path / "cells.jsonl", tmp_path / "grid.png"
    args = ["ablate", "fastv", "--grid", "ratio=0.25,0.75", "--grid", "filter=ficoco_l,{name: bipartite_matching}",
            "--model", "embedded", "--images", "1", "--out", str(out), "--plot", str(png)]
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["cell"] for r in records] == [
        "ratio=0.25 filter=ficoco_l", "ratio=0.25 filter={name: bipartite_matching}",
        "ratio=0.75 filter=ficoco_l", "ratio=0.75 filter={name: bipartite_matching}"]
    assert records[0]["overrides"][1] == "steps.0.filter={name: ficoco_l}"
    assert records[1]["overrides"][1] == "steps.0.filter={name: bipartite_matching}"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(args) == 0  # every cell is done: nothing re-runs, nothing is appended
    assert len(out.read_text().splitlines()) == 4


def test_ablate_resumes_only_cells_measured_under_the_same_conditions(tmp_path, capsys, monkeypatch):
    from fico.errors import ResultsFileError

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "grid.jsonl"
    grid = ["--grid", "k=1,3"]
    assert main(["ablate", "fastv", *grid, "--model", "embedded", "--images", "1", "--out", str(out)]) == 0
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["conditions"]["images"] for r in first} == {1} and first[0]["conditions"]["model"] == "embedded"
    # other conditions: refused with the difference named, nothing appended
    assert main(["ablate", "fastv", *grid, "--model", "embedded", "--images", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds cells measured under other conditions (images: 2 now, 1 in the file)" in err
    assert len(out.read_text().splitlines()) == 2
    with pytest.raises(ResultsFileError, match=r"dtype: 'bfloat16' now, 'float32' in the file"):
        from fico.commands.ablate import ablate

        ablate("fastv", ["k=1,3"], None, "embedded", 1, out, dtype="bfloat16")
    # a changed recipe (a base override here) is a different cell: measured again, not served
    assert main(["ablate", "fastv", "ratio=0.75", *grid, "--model", "embedded", "--images", "1",
                 "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and lines[2]["overrides"] == ["ratio=0.75", "k=1"]
    # without --out, each set of conditions gets its own file
    for images in ("1", "2"):
        assert main(["ablate", "fastv", "--grid", "k=1", "--model", "embedded", "--images", images]) == 0
    assert len(list(tmp_path.glob("ablate-fastv-embedded-*.jsonl"))) == 2


def test_ablate_paper_variants_load():
    from fico.commands.ablations import PAPER_TABLES

    for recipe, variants in PAPER_TABLES.items():
        for label, overrides in variants:
            fico.load_recipe(recipe, overrides)


def test_paper_variants_match_the_documented_one_liners():
    from fico.commands.ablations import PAPER_TABLES

    documented = (DOCS / "ficoco.md").read_text()
    for recipe, variants in PAPER_TABLES.items():
        for label, overrides in variants:
            if overrides:
                line = f"fico run {recipe} " + " ".join(f'"{o}"' if " " in o else o for o in overrides)
                assert line in documented, line


def test_component_docs_are_current():
    from fico.commands.docgen import main as docgen

    assert docgen(["--check"]) == 0


def test_methods_page_examples_run(tiny_model, single_inputs, tmp_path):
    from fico import embedded

    lines = re.findall(r"^    (fico run .*)$", (DOCS / "methods.md").read_text(), flags=re.M)
    assert len(lines) == 3
    clip = tmp_path / "clip"  # a tiny stand-in for the page's saved CLIP-L
    embedded.save_clip_checkpoint(clip)
    model = tiny_model(dtype=torch.float32)
    for line in lines:
        words = shlex.split(line)
        overrides, options = [], iter(words[3:])
        for word in options:
            if word.startswith("--"):
                next(options)  # the model and prompt options take a value
            else:
                overrides.append(f"text_encoder={clip}" if word.startswith("text_encoder=") else word)
        recipe = fico.load_recipe(words[2], overrides + (["r=16"] if words[2] == "tome" else []))
        with torch.no_grad(), fico.apply(model, recipe) as run:
            model(**single_inputs(torch.float32), **recipe.instruction_inputs(["what is the color ?"]))
        assert run.trace.steps


def _panels_by_offset(trace, image_start, patches=576):
    """What fico show drew before tokens carried their layout: position - offset on a 24 x 24 grid
    (right whenever every image feature reaches the decoder, as here)."""
    import numpy as np

    panels = []
    for step in trace.steps:
        offset = 1 if step.site == "vision" else image_start
        cells = {pos: pos - offset for pos in range(offset, offset + patches)}
        sources, after = step.sources[0], step.positions_out[0].tolist()
        moves = []
        for pos in step.discarded[0]:
            if pos in cells:
                weights = sources[:, pos]
                target = int(weights.argmax())
                destination = after[target] if float(weights[target]) > 0 else None
                moves.append((cells[pos], cells.get(destination) if destination is not None else None))
        owner = np.full(patches, -1)
        best = sources[:, list(cells)].max(0)
        owner[best.values.numpy() > 0] = best.indices.numpy()[best.values.numpy() > 0]
        panels.append((moves, owner.tolist()))
    return panels


@pytest.mark.parametrize("name,overrides", [("tome", ["r=16", "layers=[0,1]"]), ("fastv", [])])
def test_show_places_tokens_by_their_layout(tiny_model, single_inputs, name, overrides):
    from fico.commands.show import provenance_panels

    model, inputs = tiny_model(), single_inputs()
    with torch.no_grad(), fico.apply(model, fico.load_recipe(name, overrides), provenance=True) as run:
        model(**inputs)
    panels = provenance_panels(run.trace)
    image_start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    assert [(p["moves"], p["owner"].tolist()) for p in panels] == _panels_by_offset(run.trace, image_start)
    assert all(p["grid"] == (24, 24) and p["moves"] for p in panels)
