"""Third-party components: a one-file plugin named by a recipe, and an installed entry point."""

import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fico

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


def test_one_file_plugin_referenced_from_a_recipe(tiny_model, batch_inputs):
    recipe = fico.load_recipe(PLUGINS / "checkerboard_prune.yaml", overrides=["ratio=0.25"])
    assert type(recipe.steps[0].filter).__name__ == "Checkerboard"
    model = tiny_model(dtype=torch.float32)
    inputs = batch_inputs(torch.float32)
    with torch.no_grad(), fico.apply(model, recipe) as run:
        logits = model(**inputs).logits
    assert run.trace.steps[0].removed == 144
    assert logits.shape[1] == inputs["input_ids"].shape[1] - 144
    # the plugin is the recipe's own: the default registry does not know it
    assert "checkerboard" not in fico.default_registry().names("filter")


def test_entry_point_plugin_is_registered_like_a_builtin(tmp_path, monkeypatch):
    (tmp_path / "fico_ep_demo.py").write_text(textwrap.dedent('''
        import fico
        from fico.selection import split_by_scores, mask_scores

        class Norm(fico.Filter):
            "Discard the candidates with the smallest hidden-state norm."
            name = "ep_norm"
            def split(self, state, r):
                return split_by_scores(mask_scores(-state.hidden.norm(dim=-1), state.candidate), r)

        @fico.hookimpl
        def fico_filters():
            return [Norm]
    '''))
    dist = tmp_path / "fico_ep_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fico-ep-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fico]\nep_norm = fico_ep_demo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = fico.Registry()
    assert "ep_norm" in registry.names("filter")
    assert "bipartite_matching" in registry.names("filter")
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - {site: vision, layers: [0], remove: 4, filter: ep_norm, correlate: none, compress: drop}\n")
    recipe = fico.load_recipe(path, registry=registry)
    assert recipe.steps[0].filter.name == "ep_norm"
    sys.modules.pop("fico_ep_demo", None)


def test_a_non_component_from_a_plugin_is_reported(tmp_path):
    plugin = tmp_path / "bad_plugin.py"
    plugin.write_text("import fico\n@fico.hookimpl\ndef fico_filters():\n    return [dict]\n")
    path = tmp_path / "r.yaml"
    path.write_text("plugins: [bad_plugin.py]\nsteps:\n  - {site: vision, remove: 1, filter: x, correlate: none, compress: drop}\n")
    try:
        fico.load_recipe(path)
    except fico.RecipeError as error:
        assert "not a fico.Filter subclass" in str(error) and str(path) in str(error)
    else:
        raise AssertionError("expected a RecipeError")


CENTROID = '''
import fico
from fico.selection import mask_scores, split_by_scores


class Centroid(fico.Filter):
    r"""Discard the candidates closest to the candidates' mean.

    .. math:: s_i = -\\lVert x_i - \\bar x \\rVert_2
    """

    name = "centroid"

    def split(self, state, r):
        mean = state.hidden.mean(1, keepdim=True)
        scores = -(state.hidden - mean).norm(dim=-1)
        return split_by_scores(mask_scores(scores, state.candidate), r, targets=state.candidate)


class WrongShapes(fico.Filter):
    "Returns a split that discards one token fewer than asked."

    name = "wrong_shapes"

    def split(self, state, r):
        split = split_by_scores(mask_scores(-state.hidden.norm(dim=-1), state.candidate), r)
        split.discarded = split.discarded[:, 1:]
        return split


class BareTensor(fico.Filter):
    "Returns the scores instead of a Split."

    name = "bare_tensor"

    def split(self, state, r):
        return -state.hidden.norm(dim=-1)


class Raises(fico.Filter):
    "Reads a signal it never asked for."

    name = "raises"

    def split(self, state, r):
        return state.signals["keys"]


@fico.hookimpl
def fico_filters():
    return [Centroid, WrongShapes, BareTensor, Raises]
'''


def _plugin(tmp_path):
    path = tmp_path / "centroid_filter.py"
    path.write_text(CENTROID)
    return path


def test_a_plugin_file_swaps_into_a_bundled_recipe_from_the_command_line(tmp_path, capsys):
    from fico.commands.cli import main

    plugin = _plugin(tmp_path)
    swap = "steps.0.filter={name: centroid}"
    assert main(["run", "fastv", swap, "--plugin", str(plugin), "--model", "embedded", "--repeats", "1",
                 "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "steps[0].filter: centroid instead of attention_rank" in out
    assert main(["explain", "fastv", swap, "--plugin", str(plugin)]) == 0
    out = capsys.readouterr().out
    assert "fastv modified (steps[0].filter: centroid instead of attention_rank)" in out
    assert "last input token" not in out  # the unmodified recipe's description is not shown as what runs
    # the same through an override, and through the Python API
    recipe = fico.load_recipe("fastv", [swap, f"plugins=[{plugin}]"])
    assert recipe.steps[0].filter.name == "centroid" and recipe.plugin_files == [plugin.resolve()]
    assert fico.load_recipe("fastv", [swap], plugins=[plugin]).steps[0].filter.name == "centroid"


def test_without_the_plugin_the_swap_names_the_missing_component():
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.filter\.name: unknown filter 'centroid'; known: .*; a "
                                               r"component from a local file needs --plugin FILE"):
        fico.load_recipe("fastv", ["steps.0.filter={name: centroid}"])


@pytest.mark.parametrize("name,match", [
    ("wrong_shapes", r"filter 'wrong_shapes' \(centroid_filter\.py\), steps\[0\] at llm layer 2: Split\.discarded "
                     r"has shape \(2, 287\), expected \(2, 288\)"),
    ("bare_tensor", r"filter 'bare_tensor' \(centroid_filter\.py\), steps\[0\] at llm layer 2: split\(\) must "
                    r"return a fico\.Split, got Tensor"),
    ("raises", r"filter 'raises' \(centroid_filter\.py\), steps\[0\] at llm layer 2: raised KeyError at "
               r"centroid_filter\.py:\d+: 'keys'"),
])
def test_a_component_breaking_its_contract_is_named(tiny_model, batch_inputs, tmp_path, name, match):
    from test_integration import snapshot

    model = tiny_model(dtype=torch.float32)
    before = snapshot(model)
    recipe = fico.load_recipe("fastv", [f"steps.0.filter={{name: {name}}}"], plugins=[_plugin(tmp_path)])
    with torch.no_grad(), pytest.raises(fico.ComponentError, match=match):
        with fico.apply(model, recipe):
            model(**batch_inputs(torch.float32))
    assert snapshot(model)[:3] == before[:3]


def test_a_broken_component_is_one_line_on_the_command_line(tmp_path, capsys):
    from fico.commands.cli import main

    assert main(["run", "fastv", "steps.0.filter={name: wrong_shapes}", "--plugin", str(_plugin(tmp_path)),
                 "--model", "embedded", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: filter 'wrong_shapes'") and "Traceback" not in err
