"""Bad input gets a RecipeError naming the recipe and key, and never a half-modified model."""

import re

import pytest
import torch
from test_integration import snapshot

import fico


def write(tmp_path, text, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
name: custom
r: 8
steps:
  - site: {site}
    layers: {layers}
    {schedule}
    filter: {filter}
    correlate: {correlate}
    compress: {compress}
"""


def recipe_text(site="vision", layers="all", schedule="remove: ${r}", filter="bipartite_matching",
                correlate="key_similarity", compress="weighted_average"):
    text = BASE.format(site=site, layers=layers, schedule=schedule, filter=filter, correlate=correlate,
                       compress=compress)
    # a knob no step reads is itself an error; these recipes test the step's own checks
    return text if "${r}" in schedule else text.replace("r: 8\n", "", 1)


@pytest.mark.parametrize("text,match", [
    (recipe_text(filter="bipartite_matchin"), r"steps\[0\]\.filter\.name: unknown filter 'bipartite_matchin'; "
                                              r"known: .*attention_rank.*did you mean 'bipartite_matching'"),
    (recipe_text(correlate="{name: key_similarity, target: 2}"),
     r"steps\[0\]\.correlate\.target: 'key_similarity' has no parameter 'target'.*did you mean 'targets'"),
    (recipe_text(correlate="{name: key_similarity, targets: two}"),
     r"steps\[0\]\.correlate\.targets: expected int, got 'two'"),
    (recipe_text(compress="{name: weighted_average, size_weighted: 3}"),
     r"steps\[0\]\.compress\.size_weighted: expected bool"),
    (recipe_text(filter="{name: attention_rank, signal: cls_attn}"), r"unknown signal 'cls_attn'"),
    (recipe_text(schedule="remove: -3"), r"steps\[0\]\.remove: must be a non-negative integer, got -3"),
    (recipe_text(schedule="keep_ratio: 0"), r"steps\[0\]\.keep_ratio: must be in \(0, 1\]"),
    (recipe_text(schedule="remove_ratio: 1.5"), r"steps\[0\]\.remove_ratio: must be in \[0, 1\]"),
    (recipe_text(schedule="remove: 2\n    keep_ratio: 0.5"), r"give exactly one of"),
    (recipe_text(layers="[-1]"), r"steps\[0\]\.layers: layer indices are 0-based"),
    (recipe_text(site="decoder"), r"steps\[0\]\.site: must be one of vision, vision_output, pre_llm, llm, llm_mid"),
    (recipe_text(compress="fuse"), r"'fuse' needs a correlator that gives fused, but 'key_similarity' gives shares"),
    (recipe_text().replace("    compress: weighted_average\n", ""), r"steps\[0\]\.compress: missing"),
    (recipe_text().replace("site:", "sitee: vision\n    site:"), r"steps\[0\]\.sitee: unknown step key.*'site'"),
    ("name: x\nsteps: []\n", r"steps: a recipe needs a non-empty list of steps"),
    ("name: x\nr: 2\nplugins: [missing.py]\n" + recipe_text()[recipe_text().index("steps"):], r"no such plugin file"),
    ("name: x\n" + recipe_text()[recipe_text().index("steps"):], r"steps\[0\]\.remove: Interpolation key 'r' not found$"),
])
def test_recipe_errors_name_source_and_key(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(fico.RecipeError, match=match) as info:
        fico.load_recipe(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name,overrides,match", [
    ("tome", ["rr=3"], r"override 'rr': the recipe has no knob 'rr'; its knobs: r, layers; did you mean 'r'\?$"),
    ("ficoco_vl", ["v.rr=3"], r"no knob 'v.rr'; its knobs: v.r, v.layers, .*did you mean 'v.r'\?$"),
    ("ficoco_v", ["lambda=abc"], r"steps\[0\]\.filter\.lambda: expected float, got 'abc' \(from \$\{lambda\}\)"),
    ("ficoco_l", ["layers=[2,3]", "k=99"], r"override 'k': the recipe no longer uses knob 'k': what read it "
                                           r"\(layers\) is overridden"),
    ("ficoco_vl", ["l.layers=[2]", "l.k=3"], r"override 'l.k': the recipe no longer uses knob 'l.k'"),
    ("fastv", ["steps.2.filter=none"], r"override 'steps.2.filter': the recipe has 1 step\(s\), steps.0 to steps.0"),
    ("fastv", ["k=["], r"override 'k': cannot parse value '\['"),
    ("tome", ["r"], r"override 'r' is not of the form key=value"),
    ("tome", ["r=-1"], r"steps\[0\]\.remove: must be a non-negative integer, got -1 \(from \$\{r\}\)"),
    ("tome", ["r=1.5"], r"steps\[0\]\.remove: must be a non-negative integer"),
    ("fastv", ["ratio=2"], r"steps\[0\]\.remove_ratio: must be in \[0, 1\], got 2 \(from \$\{ratio\}\)"),
    ("fastv", ["k=-1"], r"layer indices are 0-based"),
    ("evit", ["keep_rate=0"], r"keep_ratio: must be in \(0, 1\]"),
    ("evit", ["fuse=maybe"], r"condition must be true or false"),
    ("evit", ["layers=[1,1]"], r"a layer is listed twice"),
    ("fastv", ["steps.0.filter.signal=cls"], r"unknown signal 'cls'"),
])
def test_override_errors(name, overrides, match):
    with pytest.raises(fico.RecipeError, match=match):
        fico.load_recipe(name, overrides=overrides)


def test_each_suggestion_is_given_once(capsys):
    from fico.commands.cli import main

    assert main(["run", "fastv", "kk=3"]) == 2
    assert capsys.readouterr().err.lower().count("did you mean") == 1


def test_an_override_to_the_value_a_knob_has_is_accepted():
    """Pasting back every printed knob must work, also where an explicit value replaced a knob's reader."""
    recipe = fico.load_recipe("ficoco_l", ["layers=[2,3]", "k=4"])
    assert recipe.steps[0].layers == [2, 3]


@pytest.mark.parametrize("overrides", ["k=3", "k=3 ratio=0.25", "k=3;ratio=0.25", ["k=3", "ratio=0.25"]])
def test_overrides_as_one_string_or_a_list(overrides):
    recipe = fico.load_recipe("fastv", overrides=overrides)
    assert recipe.knobs["k"] == 3 and recipe.steps[0].layers == [3]


def test_overrides_of_another_type_are_a_clear_error():
    with pytest.raises(fico.RecipeError, match=r"overrides: expected a list of 'key=value' strings"):
        fico.load_recipe("fastv", overrides=3)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: broken\nsteps:\n  - site: vision\n    layers: [1, 2\n    remove: 2\n")
    with pytest.raises(fico.RecipeError, match=r"bad\.yaml:\d+:\d+: YAML syntax error: ") as info:
        fico.load_recipe(path)
    assert "\n" not in str(info.value)


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, recipe_text().replace("name: custom", "name: custom\nname: again"))
    with pytest.raises(fico.RecipeError, match=r"the key 'name' appears twice"):
        fico.load_recipe(path)


def test_yml_suffix_gets_a_suggestion(tmp_path):
    with pytest.raises(fico.RecipeError, match=r"fastv\.yml: no such recipe file; .*the bundled recipe is named 'fastv'"):
        fico.load_recipe(tmp_path / "recipes" / "fastv.yml")
    write(tmp_path, recipe_text(), name="mine.yaml")
    with pytest.raises(fico.RecipeError, match=r"did you mean '.*mine\.yaml'"):
        fico.load_recipe(tmp_path / "mine.yml")


def test_unknown_recipe_name_suggests():
    with pytest.raises(fico.RecipeError, match=r"no bundled recipe.*bundled: .*fastv.*did you mean 'fastv'"):
        fico.load_recipe("fastvv")


@pytest.mark.parametrize("name,overrides,match", [
    ("tome", ["layers=[4]"], r"steps\[0\]\.layers: layer 4 is out of range: the vision site of this model has layers 0\.\.3"),
    ("fastv", ["k=4"], r"layer 4 is out of range: the llm site of this model has layers 0\.\.3"),
    ("fastv", ["k=0"], r"cannot reduce at layer 0: its signals come from the previous layer"),
    ("evit", ["layers=[0]", "steps.0.keep_ratio=null", "+steps.0.remove=600"], None),
])
def test_model_dependent_errors_leave_model_untouched(tiny_model, name, overrides, match):
    model = tiny_model(dtype=torch.float32)
    before = snapshot(model)
    if match is None:  # schedule removing more tokens than exist
        path_overrides = [o for o in overrides if not o.startswith(("steps", "+"))]
        recipe = fico.load_recipe(name, path_overrides)
        recipe.steps[0].schedule = fico.Schedule("remove", 600)
        match = r"steps\[0\]\.remove: removes 600 tokens at vision layer 0, where only 576 reducible tokens are left"
    else:
        recipe = fico.load_recipe(name, overrides)
    with pytest.raises(fico.RecipeError, match=match):
        fico.apply(model, recipe)
    assert snapshot(model)[:3] == before[:3]


def test_llm_schedule_larger_than_visual_tokens(tiny_model, tmp_path):
    model = tiny_model(dtype=torch.float32)
    path = write(tmp_path, recipe_text(site="llm", layers="[2]", schedule="remove: 577",
                                       filter="{name: attention_rank, signal: last_query_attention}",
                                       correlate="none", compress="drop"))
    with pytest.raises(fico.RecipeError, match=r"removes 577 tokens at llm layer 2, where only 576"):
        fico.apply(model, fico.load_recipe(path))


def test_signal_the_site_cannot_give(tiny_model, tmp_path):
    model = tiny_model(dtype=torch.float32)
    before = snapshot(model)
    path = write(tmp_path, recipe_text(site="llm", layers="[2]", filter="{name: attention_rank, signal: cls_attention}",
                                       correlate="none", compress="drop"))
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]: the llm site cannot give the signal\(s\) cls_attention"):
        fico.apply(model, fico.load_recipe(path))
    path = write(tmp_path, recipe_text(filter="{name: attention_rank, signal: last_query_attention}",
                                       correlate="none", compress="drop"), name="vision.yaml")
    with pytest.raises(fico.RecipeError, match=r"vision site cannot give the signal\(s\) last_query_attention"):
        fico.apply(model, fico.load_recipe(path))
    assert snapshot(model)[:3] == before[:3]


def test_two_steps_on_one_layer(tiny_model, tmp_path):
    model = tiny_model(dtype=torch.float32)
    text = recipe_text(layers="[1]")
    text += text[text.index("  - site"):]
    with pytest.raises(fico.RecipeError, match=r"steps\[1\]\.layers: layer 1 of the vision site is already reduced by steps\[0\]"):
        fico.apply(model, fico.load_recipe(write(tmp_path, text)))


def test_unsupported_model_names_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(fico.UnsupportedModelError, match=r"LlamaForCausalLM.*supported: .*transformers\.LlavaForConditionalGeneration"):
        fico.apply(model, fico.load_recipe("fastv"))
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_runtime_error_on_inputs_embeds_with_llm_steps(tiny_model, single_inputs):
    model = tiny_model(dtype=torch.float32)
    inputs = single_inputs(torch.float32)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with fico.apply(model, fico.load_recipe("fastv")), pytest.raises(ValueError, match="pass input_ids"):
        model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_a_recipe_file_key_no_step_reads_is_an_error_naming_file_key_and_knob(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("base: fastv\nratioo: 0.3\nfoo_bar: 1\n")
    with pytest.raises(fico.RecipeError, match=re.escape(f"{path}: ratioo: no step reads this key") + r".*did you "
                       r"mean 'ratio'\?"):
        fico.load_recipe(path)


def test_a_new_knob_that_a_step_reads_is_accepted(tmp_path):
    path = tmp_path / "new_knob.yaml"
    path.write_text("base: fastv\nname: fastv_keep\nkeep: 100\nsteps:\n  - site: llm\n    layers: ['${k}']\n"
                    "    keep: ${keep}\n    filter: {name: attention_rank, signal: last_query_attention}\n"
                    "    correlate: none\n    compress: drop\n")
    recipe = fico.load_recipe(path, ["keep=50"])
    assert recipe.knobs["keep"] == 50 and recipe.steps[0].schedule.value == 50


def test_conflicting_overrides_are_an_error():
    with pytest.raises(fico.RecipeError, match=r"override 'k' is given twice, as k=2 and k=3"):
        fico.load_recipe("fastv", ["k=2", "k=3"])
    assert fico.load_recipe("fastv", ["k=3", "k=3"]).knobs["k"] == 3  # the same value twice says one thing


def test_a_bad_knob_value_names_the_override_first():
    with pytest.raises(fico.RecipeError, match=r"fastv.yaml: override 'k': steps\[0\]\.layers: .*got \['two'\] "
                                               r"\(from \$\{k\}\)"):
        fico.load_recipe("fastv", ["k=two"])
