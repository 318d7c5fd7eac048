"""Third-party components: a one-file plugin named by a recipe, and an installed entry point."""

import sys
import textwrap
from pathlib import Path

import torch

import fico

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


def test_one_file_plugin_referenced_from_a_recipe(tiny_model, batch_inputs):
    recipe = fico.load_recipe(PLUGINS / "random_prune.yaml", overrides=["ratio=0.25"])
    assert type(recipe.steps[0].filter).__name__ == "RandomFilter"
    model = tiny_model(dtype=torch.float32)
    inputs = batch_inputs(torch.float32)
    with torch.no_grad(), fico.apply(model, recipe) as run:
        logits = model(**inputs).logits
    assert run.trace.steps[0].removed == 144
    assert logits.shape[1] == inputs["input_ids"].shape[1] - 144
    # the plugin is the recipe's own: the default registry does not know it
    assert "random" not in fico.default_registry().names("filter")


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
