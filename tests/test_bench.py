"""fico bench: table, JSON with the required keys, plot, markdown block."""

import json

import torch

from fico.cli import main


def test_bench_json_plot_and_markdown(tmp_path, tiny_model, processor):
    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out, png, md = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    assert main(["bench", "fastv", "tome", "--model", str(tmp_path / "model"), "--reps", "1",
                 "--json", str(out), "--plot", str(png), "--markdown", str(md)]) == 0
    report = json.loads(out.read_text())
    assert [r["recipe"] for r in report["results"]] == ["fastv", "tome"]
    for entry in report["results"]:
        for key in ("recipe", "tflops", "flops_speedup", "measured_speedup", "stage_share", "prefill_ms",
                    "decode_ms_per_token"):
            assert key in entry
        assert entry["flops_speedup"] > 1
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "| fastv |" in md.read_text()


def test_budget_expansion():
    from fico.bench import expand

    assert expand(["tome", "fastv"], ["1.5", "3.3"]) == ["budgets/tome_1.5t", "budgets/tome_3.3t",
                                                         "budgets/fastv_1.5t", "budgets/fastv_3.3t"]
