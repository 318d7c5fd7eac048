"""Output a reader can trust: no value cut, no empty cell where a value belongs, formulas
that define their symbols, LaTeX without raw Markdown, citations only where math is."""

import re

import pytest

from fico.commands.cli import main


def cells(text):
    """The cells of every table body line of rich's box drawing."""
    return [[cell.strip() for cell in line.strip().strip("│").split("│")] for line in text.splitlines()
            if line.strip().startswith("│")]


def test_piped_tables_never_cut_a_value(monkeypatch, capsys):
    monkeypatch.delenv("COLUMNS", raising=False)  # stdout is captured: not a terminal
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    assert "signal=cls_attention, receivers=0" in out  # pastes back as written


def test_a_narrow_terminal_folds_values_instead_of_cutting_them():
    from rich.console import Console

    from fico.commands.console import Table

    console = Console(width=30, record=True, file=open("/dev/null", "w"))
    table = Table()
    table.add_column("parameters")
    table.add_row("signal=cls_attention_fullwidth_of_the_next_layer")
    console.print(table)
    text = console.export_text()
    assert "…" not in text and "".join(row[0] for row in cells(text)) == "signal=cls_attention_fullwidth_of_the_next_layer"


@pytest.mark.parametrize("argv", [["cost", "toy"], ["cost", "toy", "fastv"], ["cost", "llava-1.5-7b", "pdrop"]])
def test_cost_tables_have_a_value_in_every_cell(argv, capsys):
    assert main(argv) == 0
    rows = cells(capsys.readouterr().out)
    assert rows and all(all(cell for cell in row) for row in rows), rows


def test_the_ablate_reference_row_has_every_value():
    from fico.commands.ablate import summary

    accuracy = {"color": 1.0, "digit": 0.5, "overall": 0.75}
    record = {"cell": "r=8", "recipe": "tome", "model": "toy", "images": 2, "questions": 12,
              "tflops_llava_1_5_7b": 2.5, "accuracy": accuracy, "accuracy_retention": 1.0,
              "baseline_accuracy": 0.75, "baseline_accuracies": accuracy, "answer_agreement": 1.0, "kl": 0.0}
    from rich.console import Console

    console = Console(width=300, record=True, file=open("/dev/null", "w"))
    console.print(summary([record]))
    rows = cells(console.export_text())
    reference = next(row for row in rows if row[0].startswith("unreduced"))
    assert all(reference), reference
    from fico.cost.model import recipe_cost

    assert reference[1] == f"{recipe_cost('llava-1.5-7b', None, text_tokens=60).tflops:.2f}"  # the unreduced 7B cost


def test_explain_defines_every_symbol_it_uses(capsys):
    assert main(["explain", "ficoco_l", "steps.0.filter.c=1"]) == 0
    out = capsys.readouterr().out
    assert out.index("s̃_i =") < out.index("S = top_r(s̃)")
    assert out.index("J_i = {") < out.index("I_j = { i ∈ S : j ∈ J_i }")


def test_point_sites_print_no_layers(capsys):
    assert main(["explain", "visionzip"]) == 0
    head = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step 0"))
    assert "layers" not in head and "(removes 513)" in head
    assert main(["explain", "visionzip", "--format", "tex"]) == 0
    assert "Step 0 (vision\\_output)}" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["sparsevlm", "fitprune", "visionzip", "ficoco_vl", "prumerge_plus"])
def test_tex_output_has_no_raw_backticks_or_straight_quotes(name, capsys):
    assert main(["explain", name, "--format", "tex"]) == 0
    # prose only: \texttt{...} holds code (a knob as an override), where quotes are the code's own
    body = [re.sub(r"\\texttt\{[^}]*\}", "", line) for line in capsys.readouterr().out.splitlines()
            if not line.startswith("%")]
    assert not any('"' in line or re.search(r"(?<!`)`(?!`)", line) for line in body), \
        [line for line in body if '"' in line or "`" in line]


@pytest.mark.parametrize("name,own", [("dart", "wen2025dart"), ("cdpruner", "zhang2025cdpruner")])
def test_trivial_stages_cite_nothing(name, own, capsys):
    assert main(["explain", name]) == 0
    out = capsys.readouterr().out
    for other in ("chen2024fastv", "han2026ficoco", "liang2022evit"):
        assert other not in out
    assert own in out


def test_an_adaptive_count_that_kept_everything_is_said(capsys, monkeypatch):
    """PruMerge+ with many neighbours keeps all 577 tokens on the toy and still changes the
    answers (its kNN merge rewrites kept tokens): the run says so."""
    monkeypatch.delenv("COLUMNS", raising=False)  # one line per cell, to read the note whole
    assert main(["run", "prumerge_plus", "neighbors=8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "kept all 577 tokens (577 -> 577)" in out and "still rewrites the kept tokens" in out


def test_the_ablate_plot_title_names_the_fixed_overrides():
    from fico.commands.ablate import plot_title

    records = [{"recipe": "fastv", "overrides": ["k=3", "ratio=0.25"]}, {"recipe": "fastv", "overrides": ["k=3", "ratio=0.75"]}]
    assert plot_title(records) == "fastv k=3"


def test_show_says_how_many_steps_it_drew(tmp_path, capsys):
    out = tmp_path / "show.png"
    assert main(["show", "tome", "r=16", "--model", "embedded", "--out", str(out), "--panels", "2"]) == 0
    assert "2 of 24 reducing steps (--panels 24 draws all)" in capsys.readouterr().out


def test_ctrl_c_is_one_line_and_results_files_stay_whole(tmp_path, monkeypatch, capsys):
    import json

    import fico.commands.results as results
    from fico.commands import ablate

    out = tmp_path / "cells.jsonl"
    conditions = {"model": "toy"}
    results.append_result(out, {"cell": "a", "recipe_digest": "x"}, conditions)
    original = results.Path.write_text

    def interrupted(self, text, *args, **kwargs):
        original(self, text[: len(text) // 2])  # half of the file written, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(results.Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        results.append_result(out, {"cell": "b", "recipe_digest": "y"}, conditions)
    monkeypatch.undo()
    assert [json.loads(line)["cell"] for line in out.read_text().splitlines()] == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["cells.jsonl"]  # no temporary left behind

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablate, "ablate", stop)
    assert main(["ablate", "fastv", "--grid", "ratio=0.25,0.5"]) == 130
    assert capsys.readouterr().err.strip() == "fico ablate: interrupted"
