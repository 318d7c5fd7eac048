"""`fico run` and `fico list` on the embedded model."""

from fico.cli import main


def test_run_prints_tokens_time_and_agreement(capsys):
    assert main(["run", "tome", "r=8", "--repeats", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "tome: tokens per site and layer" in out
    assert "561" in out  # r=8: 577 -> 569 -> 561 ...
    assert "prefill (median of interleaved runs)" in out
    assert "next-token KL" in out


def test_list_shows_components_and_recipes(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("bipartite_matching", "attention_rank", "key_similarity", "convergent", "weighted_average",
                 "fuse", "drop", "tome", "evit", "fastv"):
        assert name in out


def test_bad_recipe_is_a_clean_error(capsys):
    assert main(["run", "fastv", "ratio=3"]) == 2
    assert "remove_ratio: must be in [0, 1]" in capsys.readouterr().out
