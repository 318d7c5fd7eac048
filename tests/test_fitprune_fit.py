"""FitPrune's schedule fitted on any model (fico.fitting.fitprune) equals its official
procedure; tables by depth; adaptive steps inside the decoder."""

import json

import pytest
import reference_wave2 as ref
import torch

import fico
from fico.filters.cross_self import _lowest_within_mass
from fico.fitting.fitprune import FlopsModel, fit_fitprune, table_for


def _samples(processor, seeds=(0, 1, 2)):
    from fico import embedded

    prompts = ["USER: <image> what is the color of the circle ? ASSISTANT:", "USER: <image> how many objects ? ASSISTANT:",
               "USER: <image> is there a square ? ASSISTANT:"]
    out = []
    for seed in seeds:
        inputs = embedded.example_inputs(processor, prompts=[prompts[seed % 3]], seeds=[seed])
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.float64)
        out.append({k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    return out


def test_the_fitting_equals_the_official_procedure(tiny_model, processor, ratio=0.6):
    """Every bisection step (alpha, whether it reached the target, the table) equals a
    line-by-line port of statistical_analysis.py on a 4-layer model, float64."""
    model = tiny_model()
    samples = _samples(processor)
    fit = fit_fitprune(model, samples, ratio)
    with torch.no_grad():
        expected = ref.fitprune_fit(model, [(s["input_ids"], s["pixel_values"]) for s in samples], ratio)
    assert [(t["alpha"], t["reached"], t["remove"]) for t in fit.tried] == expected
    assert (fit.alpha, fit.reaches_budget, fit.remove) == expected[-1]  # the last alpha tried, as printed
    assert sum(fit.remove) > 0 and len(fit.remove) == 4
    assert fit.after_each_layer[-1] == fit.visual_tokens - sum(fit.remove)


def test_a_fitted_table_runs_as_fitprune(tiny_model, processor, tmp_path):
    from fico.commands.fit import fitted_recipe

    model = tiny_model()
    fit = fit_fitprune(model, _samples(processor, (0, 1)), 0.6)
    path = tmp_path / "fitted.yaml"
    path.write_text(fitted_recipe({70: fit}, "tiny", 4))
    recipe = fico.load_recipe(path)
    inputs = _samples(processor, (3,))[0]
    with torch.no_grad(), fico.apply(model, recipe) as run:
        model(**inputs)
    removed = [s.removed for s in run.trace.steps if s.site == "llm_mid"]
    assert removed == [r for r in fit.remove if r]
    with pytest.raises(fico.RecipeError, match=r"no count list for a step at 2 layers.*lists for 4 or 6 or 32 layers"):
        fico.apply(tiny_model(llm_layers=2), recipe)


def test_the_flops_forecast_is_the_official_one():
    flops = FlopsModel(hidden=4096, q_width=4096, kv_width=4096, ffn=11008, layers=32)
    # rest_flops(tk, layer) of the official script
    tk, layer = 300, 5
    official = (tk * 4096 ** 2 + 3 * 11008 * 4096 * tk) + ((tk * 4096 * 4096 * 3 + tk * tk * 4096 + tk * 4096 * tk
                                                            + tk * 4096 * 4096) + (4096 * 11008 * tk * 3)) * (31 - layer)
    assert flops.rest(tk, layer) == official
    # no sample removes anything: the target is reached only where nothing is asked
    unchanged = [([576] * 32, [0] * 32)]
    assert table_for(unchanged, flops, 0.0) == (True, [0] * 32)
    assert table_for(unchanged, flops, 0.5) == (False, [0] * 32)


def test_the_official_tables_meet_their_own_targets():
    """On LLaVA-1.5-7B's widths the shipped tables for ratios 50-90 reduce the forecast FLOPs
    to within 0.5 points below their target: the rule fico fits with is the one they were
    fitted with. Those for 10-40 fall short (6.4%, 15.3%, 27.9%, 38.8%): the official script
    prints the last alpha it tried, which misses wherever that one did."""
    import yaml

    from fico.cost.model import model_spec
    from fico.recipe.reading import resolve_path

    flops = FlopsModel.of(model_spec("llava-1.5-7b"))
    tables = yaml.safe_load(resolve_path("fitprune").read_text())["tables"]["remove"]
    achieved = {}
    for ratio in (10, 20, 30, 40, 50, 55, 60, 70, 80, 90):
        table, entering, left = tables[ratio][32], [], 576
        for count in table:
            entering.append(left)
            left -= count
        cost = sum(flops.attention(n) + flops.after_attention(n - r) for n, r in zip(entering, table))
        achieved[ratio] = 1 - cost / flops.unreduced(576)
    for ratio in (50, 55, 60, 70, 80, 90):
        assert ratio / 100 - 0.0055 < achieved[ratio] < ratio / 100, (ratio, achieved[ratio])
    assert [round(achieved[r], 3) for r in (10, 20, 30, 40)] == [0.064, 0.153, 0.279, 0.388]


def test_lowest_within_mass_is_the_official_loop():
    torch.manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(2, 12, ()))
        scores = torch.rand(1, n, dtype=torch.float64)
        candidate = torch.rand(1, n) > 0.2
        values = scores[0][candidate[0]]
        if values.numel() == 0:
            continue
        reference_mass = float(values.sum()) * float(torch.rand(()) * 1.2)
        alpha = float(torch.rand(()))
        got = _lowest_within_mass(scores, candidate, (1 - alpha) * reference_mass)[0]
        # the official loop over the candidates, ascending
        order = torch.argsort(values, stable=True)
        count = values.numel() - 1
        for i in range(values.numel()):
            if values.sum() - values[order[:i]].sum() < reference_mass - reference_mass * alpha:
                count = max(i - 1, 0)
                break
        indices = candidate[0].nonzero()[:, 0]
        assert set(indices[order[:count]].tolist()) == set(got.nonzero()[:, 0].tolist())


def test_an_adaptive_decoder_step_runs_each_sample_as_alone(tiny_model, processor, tmp_path):
    """keep: adaptive inside the decoder: each sample removes what the filter chooses for it,
    the batch runs ragged, and each sample's logits equal its own run."""
    from fico import embedded

    model = tiny_model()
    path = tmp_path / "rule.yaml"
    path.write_text("steps:\n  - {site: llm_mid, layers: all, keep: adaptive, correlate: none, compress: drop,\n"
                    "     filter: {name: retained_attention_mass, alpha: 0.3, cross_mass: [0.5, 0.5, 0.5, 0.5],\n"
                    "              self_mass: [1.0, 1.0, 1.0, 1.0]}}\n")
    recipe = fico.load_recipe(path)
    inputs = embedded.example_inputs(processor, prompts=["USER: <image> what is the color of the circle ? ASSISTANT:",
                                                         "USER: <image> how many objects ? ASSISTANT:"], seeds=[1, 2])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.float64)
    with torch.no_grad(), fico.apply(model, recipe) as run:
        batched = model(**inputs).logits[:, -1]
    alone, removed = [], []
    for index in range(2):
        one = {k: v[index:index + 1] for k, v in inputs.items()}
        width = int(one["attention_mask"].sum())
        one = {k: (v[:, -width:] if k != "pixel_values" else v) for k, v in one.items()}
        with torch.no_grad(), fico.apply(model, recipe) as single:
            alone.append(model(**one).logits[:, -1])
        removed.append([s.removed for s in single.trace.steps])
    assert removed[0] != removed[1]  # the samples chose differently: a ragged batch
    assert (batched - torch.cat(alone)).abs().max() < 1e-8
    assert run.trace.ghosts


def test_lists_by_depth_are_checked(tmp_path):
    path = tmp_path / "r.yaml"
    base = "steps:\n  - {site: llm_mid, layers: all, filter: cross_self_attention, correlate: none, compress: drop, "
    path.write_text(base + "remove: {4: [1, 2, 3]}}\n")
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.remove: lists by depth need \{layers: \[count, \.\.\.\]\} "
                                               r"with one non-negative count per layer"):
        fico.load_recipe(path)
    path.write_text(base + "remove: {four: [1, 2, 3, 4]}}\n")
    with pytest.raises(fico.RecipeError, match=r"lists by depth need"):
        fico.load_recipe(path)
    path.write_text(base + "remove: {4: [1, 2, 3, 4], 2: [5, 5]}}\n")
    recipe = fico.load_recipe(path)
    from fico.recipe.plan import Geometry, plan_recipe

    for depth, expected in ((4, [1, 2, 3, 4]), (2, [5, 5])):
        plan = plan_recipe(recipe, Geometry(24, 577, 23, True, depth))
        assert [p.remove for p in plan.llm.mid_steps.values()] == expected
    with pytest.raises(fico.RecipeError, match=r"no count list for a step at 6 layers, as it runs on this model; the recipe has lists for 2 or 4"):
        plan_recipe(recipe, Geometry(24, 577, 23, True, 6))


def test_adaptive_counts_stay_out_of_the_vision_tower(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - {site: vision, layers: [2], keep: adaptive, filter: iqr_outliers, correlate: none, "
                    "compress: drop}\n")
    from fico.recipe.plan import Geometry, plan_recipe

    with pytest.raises(fico.RecipeError, match=r"'adaptive' counts are for the vision_output, pre_llm, llm and "
                                               r"llm_mid sites, not the vision site"):
        plan_recipe(fico.load_recipe(path), Geometry(24, 577, 23, True, 4))


def test_fico_fit_writes_a_recipe_that_runs(tmp_path, capsys):
    from fico.commands.cli import main

    out = tmp_path / "fitted.yaml"
    assert main(["fit", "fitprune", "--model", "embedded", "--samples", "1", "--reduction-ratio", "60",
                 "--json", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    fitted = json.loads(printed[:printed.rindex("}") + 1])
    assert list(fitted) == ["60"] and len(fitted["60"]["remove"]) == 32
    assert main(["run", str(out), "--model", "embedded", "--repeats", "1", "reduction_ratio=60"]) == 0
    assert main(["fit", "fitprune", "--model", "embedded", "--reduction-ratio", "120"]) == 2
    assert "--reduction-ratio takes percentages in [0, 100)" in capsys.readouterr().err


@pytest.mark.parametrize("params,match", [
    ("alpha: 2, cross_mass: [1.0], self_mass: [1.0]", r"alpha must be in \[0, 1\], got 2"),
    ("alpha: 0.5, cross_mass: [1.0, 1.0], self_mass: [1.0]", r"cross_mass and self_mass need one value per layer"),
])
def test_bad_values_of_the_fitting_rule_name_the_key(tmp_path, params, match):
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - {site: llm_mid, layers: all, keep: adaptive, correlate: none, compress: drop,\n"
                    f"     filter: {{name: retained_attention_mass, {params}}}}}\n")
    with pytest.raises(fico.RecipeError, match=match):
        fico.load_recipe(path)
