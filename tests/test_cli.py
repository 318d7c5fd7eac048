"""`fico run` and `fico list` on the embedded model."""

import json
import re

import pytest

from fico.commands.cli import main


def test_run_prints_tokens_time_and_agreement(capsys):
    assert main(["run", "tome", "r=8", "--model", "embedded", "--repeats", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "tome: tokens per site and layer" in out
    assert "561" in out  # r=8: 577 -> 569 -> 561 ...
    assert "prefill, unreduced" in out and "IQR" in out and "n=1" in out
    assert "prefill speedup (interleaved pairs)" in out
    assert "next-token KL" in out


def test_run_lists_only_the_layers_that_change(capsys):
    assert main(["run", "fastv", "--model", "embedded", "--repeats", "1", "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"│ +(vision|llm) │", line)]
    assert len(rows) == 4  # vision 0-23 unchanged, llm 0-1, llm 2 (reduced), llm 3-31
    assert any("0-23" in row and "(unchanged)" in row for row in rows)
    assert main(["run", "fastv", "--model", "embedded", "--repeats", "1", "--max-new-tokens", "1",
                 "--all-layers"]) == 0
    out = capsys.readouterr().out
    assert sum(1 for line in out.splitlines() if re.match(r"│ +vision │", line)) == 24


def test_a_wide_spread_is_flagged():
    from fico.commands.timing import Spread, ratio_text

    steady = Spread.ratio([2.0, 2.02, 1.98, 2.01], [1.0, 1.0, 1.0, 1.0])
    noisy = Spread.ratio([1.0, 3.0, 1.2, 2.5], [1.0, 1.0, 1.0, 1.0])
    assert steady.readable and "too wide" not in ratio_text(steady)
    assert not noisy.readable and "spread too wide to read a ratio" in ratio_text(noisy)


@pytest.mark.parametrize("spelling", ["fp16", "float16", "half", "FP16"])
def test_one_dtype_spelling_set_for_every_command(spelling, capsys):
    assert main(["cost", "embedded", "fastv", "--dtype", spelling, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "float16"
    for command in (["run", "--dtype", spelling, "--help"], ["ablate", "fastv", "--dtype", spelling, "--help"]):
        with pytest.raises(SystemExit) as info:
            main(command)
        assert info.value.code == 0


def test_a_bad_dtype_lists_the_names(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--dtype", "fp8"])
    assert "unknown dtype 'fp8'; use one of float32, float16, bfloat16, float64" in capsys.readouterr().err


@pytest.mark.parametrize("model,match", [
    ("/path/that/does/not/exist", r"--model /path/that/does/not/exist: no such directory \(fico never downloads "
                                  r"models\); built-in: toy .*embedded"),
    ("embeded", r"--model embeded: no such built-in model or directory .*did you mean 'embedded'\?"),
])
def test_a_missing_model_is_named_and_the_hub_never_tried(model, match, capsys):
    assert main(["run", "fastv", "--model", model]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "huggingface" not in err.lower() and "Traceback" not in err


def test_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["run", "fastv", "--model", str(tmp_path)]) == 2
    assert "has no config.json, so it is not a checkpoint directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "internvl"}')
    assert main(["run", "fastv", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "a 'internvl' checkpoint; fico has adapters for llava" in err and "qwen2_5_vl" in err


def test_list_shows_components_and_recipes(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("bipartite_matching", "attention_rank", "key_similarity", "convergent", "weighted_average",
                 "fuse", "drop", "ficoco_v", "ficoco_l", "attention", "text_bridged", "self_preserving",
                 "tome", "evit", "fastv", "ficoco_vl"):
        assert name in out
    formulas = out[out.index("formulas"):]
    assert "compressor self_preserving:  x_j \\leftarrow" in formulas
    assert formulas.count(":  ") >= 13  # every component shows a formula


def test_bad_recipe_is_a_clean_error(capsys):
    assert main(["run", "fastv", "ratio=3"]) == 2
    captured = capsys.readouterr()
    assert "steps[0].remove_ratio: must be in [0, 1], got 3 (from ${ratio})" in captured.err
    assert captured.out == ""


WAVE2 = ["visionzip", "fastervlm", "hired", "vispruner", "prumerge", "prumerge_plus", "divprune", "random", "pool",
         "pdrop", "sparsevlm", "dart", "fitprune"]


@pytest.mark.parametrize("name", WAVE2)
def test_every_new_method_runs_from_the_command_line(name, capsys):
    # the embedded model has LLaVA-1.5's 24 vision and 32 decoder layers, so the official schedules fit as shipped
    assert main(["run", name, "--model", "embedded", "--repeats", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{name}: tokens per site and layer" in out and "next-token KL" in out
    if name in ("pdrop", "sparsevlm"):
        assert "visual tokens over decoder layers" in out


def test_new_methods_ablate_and_bench_from_the_command_line(tmp_path, capsys):
    grid = tmp_path / "grid.jsonl"
    assert main(["ablate", "dart", "--grid", "keep=64,128", "--model", "embedded", "--images", "1",
                 "--out", str(grid)]) == 0
    assert len(grid.read_text().splitlines()) == 2
    report = tmp_path / "bench.json"
    assert main(["bench", "visionzip", "divprune", "--tokens", "64", "--model", "embedded", "--images", "1",
                 "--reps", "1", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert [e["recipe"] for e in data["results"]] == ["budgets/visionzip_64", "budgets/divprune_64"]


def test_cdpruner_runs_ablates_and_benches_from_the_command_line(tmp_path, capsys):
    from fico import embedded

    clip = tmp_path / "clip"
    embedded.save_clip_checkpoint(clip, vision_width=64)
    assert main(["run", "cdpruner", f"text_encoder={clip}", "keep=32", "--model", "embedded", "--repeats", "1",
                 "--max-new-tokens", "2"]) == 0
    assert "image features per image" in capsys.readouterr().out
    grid = tmp_path / "grid.jsonl"
    assert main(["ablate", "cdpruner", f"text_encoder={clip}", "--grid", "relevance=negative,positive", "--model",
                 "embedded", "--images", "1", "--out", str(grid)]) == 0
    assert len(grid.read_text().splitlines()) == 2
    recipe = tmp_path / "cdpruner_clip.yaml"
    recipe.write_text(f"base: cdpruner\nname: cdpruner_clip\ntext_encoder: {clip}\nkeep: 64\n")
    report = tmp_path / "bench.json"
    assert main(["bench", str(recipe), "--model", "embedded", "--images", "1", "--reps", "1",
                 "--json", str(report)]) == 0
    assert [e["recipe"] for e in json.loads(report.read_text())["results"]] == [str(recipe)]
    # without a text tower it is a clear error naming the knob
    assert main(["run", "cdpruner", "--model", "embedded", "--repeats", "1"]) == 2
    assert "steps[0].text_encoder: the signal(s) instruction_similarity need CLIP's text tower" in \
        capsys.readouterr().err


@pytest.mark.parametrize("mixed,canonical", [
    (["explain", "fastv", "--format", "md", "k=3"], ["explain", "fastv", "k=3", "--format", "md"]),
    (["cost", "llava-1.5-7b", "--json", "fastv", "--text-tokens", "60", "k=3"],
     ["cost", "llava-1.5-7b", "fastv", "k=3", "--json", "--text-tokens", "60"]),
    (["explain", "--format", "md", "fastv", "k=3", "--model", "llava-1.5-7b", "ratio=0.25"],
     ["explain", "fastv", "k=3", "ratio=0.25", "--format", "md", "--model", "llava-1.5-7b"]),
])
def test_options_and_overrides_mix_in_any_order(mixed, canonical, capsys):
    assert main(canonical) == 0
    expected = capsys.readouterr().out
    assert main(mixed) == 0
    assert capsys.readouterr().out == expected
    assert "k=3" in expected or '"k": 3' in expected or "[3]" in expected


def test_help_and_usage_errors_do_not_import_torch():
    """fico --help and argument errors answer before any heavy import."""
    import subprocess
    import sys

    code = ("import sys, fico.commands.cli\n"
            "for argv in (['--help'], ['run', '--bogus'], ['cost', '--help']):\n"
            "    try:\n"
            "        fico.commands.cli.main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False False", done.stdout + done.stderr
    assert "COMMAND" in done.stdout and "unrecognized arguments: --bogus" in done.stderr


@pytest.mark.parametrize("argv,match", [
    (["run", "pdrop", "layers=[8,16,24]"], "layer 8 is out of range"),
    (["run", "fitprune", "reduction_ratio=50"], "no count list for a step at 6 layers"),
    (["run", "cdpruner", "--model", "embedded"], "need CLIP's text tower"),
    (["ablate", "pdrop", "layers=[8,16,24]", "--grid", "ratio=0.5,0.25"], "layer 8 is out of range"),
    (["show", "pdrop", "layers=[8,16,24]"], "layer 8 is out of range"),
    (["bench", "fastv", "budgets/pdrop_64", "--reps", "1"], "layer 8 is out of range"),
])
def test_a_recipe_that_cannot_run_on_the_model_fails_before_its_weights_load(argv, match, monkeypatch, capsys):
    import fico.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the recipe was checked against the config")

    import fico.commands.bench

    monkeypatch.setattr(fico.models, "load_model", no_loading)
    monkeypatch.setattr(fico.commands.bench, "load_model", no_loading)  # bench holds its own reference
    assert main(argv) == 2
    assert match in capsys.readouterr().err
