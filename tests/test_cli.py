"""`fico run` and `fico list` on the embedded model."""

from fico.cli import main


def test_run_prints_tokens_time_and_agreement(capsys):
    assert main(["run", "tome", "r=8", "--model", "embedded", "--repeats", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "tome: tokens per site and layer" in out
    assert "561" in out  # r=8: 577 -> 569 -> 561 ...
    assert "prefill (median of interleaved runs)" in out
    assert "next-token KL" in out


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
