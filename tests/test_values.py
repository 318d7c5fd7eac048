"""Values fico prints are values fico accepts: layer ranges, knobs, parameters."""

import shlex

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fico
from fico.commands.explain import explanation, knob_text, render
from fico.recipe import bundled_recipes
from fico.recipe.values import format_value, parse_value


@pytest.mark.parametrize("typed", ["11:23", "11: 23", "11 :23", "'11:23'", '"11:23"'])
def test_a_layer_range_override_is_a_range_however_typed(typed):
    recipe = fico.load_recipe("ficoco_v", [f"layers={typed}"])
    assert recipe.steps[0].layers == "11:23"


def test_open_ranges():
    assert fico.load_recipe("tome", ["layers=:3"]).steps[0].layers == "0:3"
    assert fico.load_recipe("ficoco_l", ["layers=5:"]).steps[0].layers == "5:"


def test_a_layer_range_in_a_recipe_file_is_not_base_60(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - site: vision\n    layers: 11:23\n    remove: 2\n"
                    "    filter: bipartite_matching\n    correlate: key_similarity\n    compress: weighted_average\n")
    assert fico.load_recipe(path).steps[0].layers == "11:23"


@pytest.mark.parametrize("name", bundled_recipes())
def test_every_printed_knob_is_accepted_back(name, capsys):
    recipe = fico.load_recipe(name)
    solved = recipe.budget.knob if recipe.budget is not None else None
    text = knob_text(recipe.knobs, solved)
    if solved:  # the budget sets it; it is shown as solved, not as an override
        text, note = text.split(" (", 1)
        assert note.startswith(f"{solved} solved by the budget: ")
    words = shlex.split(text)
    again = fico.load_recipe(name, words)
    assert again.knobs == recipe.knobs
    assert [s.layers for s in again.steps] == [s.layers for s in recipe.steps]


@pytest.mark.parametrize("name", ["ficoco_v", "ficoco_vl", "evit", "budgets/ficoco_vl_1.5t"])
def test_explain_prints_knobs_that_paste_back(name):
    text = render(explanation(fico.load_recipe(name)), "text")
    line = next(line for line in text.splitlines() if line.startswith("knobs: "))
    words = shlex.split(line[len("knobs: "):].split(" (", 1)[0])
    assert fico.load_recipe(name, words).knobs == fico.load_recipe(name).knobs


@given(st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6)
                    | st.floats(allow_nan=False, allow_infinity=False, width=32)
                    | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
                    lambda inner: st.lists(inner, max_size=4), max_leaves=8))
def test_format_value_round_trips(value):
    assert parse_value(format_value(value)) == value


def test_component_parameters_print_as_values():
    text = render(explanation(fico.load_recipe("ficoco_v")), "text")
    assert "k=null" in text and "None" not in text
