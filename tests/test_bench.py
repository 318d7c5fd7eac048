"""fico bench: table, JSON with the required keys, plot, markdown block."""

import json

import torch

from fico.commands.cli import main


def test_bench_json_plot_and_markdown(tmp_path, tiny_model, processor):
    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out, png, md = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    assert main(["bench", "fastv", "tome", "--model", str(tmp_path / "model"), "--reps", "1", "--replay",
                 "--json", str(out), "--plot", str(png), "--markdown", str(md)]) == 0
    report = json.loads(out.read_text())
    assert [r["recipe"] for r in report["results"]] == ["fastv", "tome"]
    for entry in report["results"]:
        for key in ("recipe", "tflops", "flops_speedup", "measured_speedup", "stage_share", "prefill_ms",
                    "decode_ms_per_token"):
            assert key in entry
        assert entry["flops_speedup"] > 1
        assert entry["replay_ms"] > 0 and entry["fico_efficiency"] > 0 and entry["machine_ratio"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "| fastv |" in md.read_text()


def test_budgets_on_another_model_are_solved_for_it_or_labelled(tmp_path, capsys):
    """budgets/*_1.5t name LLaVA-1.5-7B; on the toy they are solved for the same fraction of
    the toy's unreduced cost, or labelled as not equal-cost where that fraction is out of reach."""
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "tome", "fastv", "--budgets", "1.5", "--model", "toy", "--images", "1", "--reps", "1",
                 "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    tome, fastv = report["results"]
    assert tome["budget"]["solved_for"] == "toy" and tome["budget"]["equal_cost"]
    assert abs(tome["budget"]["solved_fraction"] - tome["budget"]["fraction"]) < 0.01
    assert fastv["budget"]["solved_for"] == "toy" and not fastv["budget"]["equal_cost"]
    assert "solved for toy" in printed and "NOT equal-cost" in printed
    for entry in report["results"]:
        spread = entry["prefill_spread_ms"]
        assert spread["q1"] <= spread["median"] <= spread["q3"] and "decode_speedup_spread" in entry
    assert "GFLOPs" in printed and png.read_bytes()[:4] == b"\x89PNG"


def test_budget_expansion():
    from fico.commands.bench import expand

    assert expand(["tome", "fastv"], ["1.5", "3.3"]) == ["budgets/tome_1.5t", "budgets/tome_3.3t",
                                                         "budgets/fastv_1.5t", "budgets/fastv_3.3t"]


def test_replay_runs_each_module_on_the_recorded_token_counts(tiny_model):
    from fico.benchmarks.replay import replay_seconds
    from fico.cost.model import TokenCounts

    model = tiny_model(dtype=torch.float32)
    layers = model.model.vision_tower.encoder.layers
    decoders = model.model.language_model.layers
    counts = TokenCounts(vision_in=[577, 577, 500, 400], vision_out=[577, 500, 400, 400], features=399,
                         llm=[430, 430, 200, 100], text_tokens=31)
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, out, tag=tag: seen.append((tag, a[0].shape[1] if a else None)))
             for tag, group in (("mlp", [layer.mlp for layer in layers]), ("decoder", decoders),
                                ("projector", [model.model.multi_modal_projector])) for m in group]
    hooks += [layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(("attention", kw["hidden_states"].shape[1])), with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            assert replay_seconds(model, counts) > 0
    finally:
        for hook in hooks:
            hook.remove()
    assert [n for tag, n in seen if tag == "attention"] == counts.vision_in
    assert [n for tag, n in seen if tag == "mlp"] == counts.vision_out
    assert [n for tag, n in seen if tag == "projector"] == [counts.features]
    assert [n for tag, n in seen if tag == "decoder"] == counts.llm


def test_a_machine_too_busy_to_time_is_reported_not_a_crash(tmp_path, tiny_model, processor, monkeypatch, capsys):
    """Every round's generate(1) slower than its generate(17), and prefills too fast to time
    (a virtual clock that only generate() advances): the bench finishes, and the figures it
    could not read are printed and stored as unreadable, with the reason."""
    import types

    import fico.commands.bench as bench

    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    clock = [0.0]
    load = bench.load_bench_model

    def busy_load(*args, **kwargs):
        loaded = load(*args, **kwargs)
        generate = loaded.model.generate

        def slow_short_generate(*a, max_new_tokens=1, **kw):
            clock[0] += 2.0 if max_new_tokens == 1 else 1.0
            return generate(*a, max_new_tokens=max_new_tokens, **kw)

        loaded.model.generate = slow_short_generate
        return loaded

    monkeypatch.setattr(bench, "load_bench_model", busy_load)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert main(["bench", "fastv", "--model", str(tmp_path / "model"), "--reps", "2", "--replay",
                 "--json", str(out), "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out
    entry = json.loads(out.read_text())["results"][0]
    assert entry["decode_ms_per_token"] is None and "too busy to time decoding" in entry["decode_spread_ms"]["reason"]
    assert entry["measured_speedup"] is None and entry["measured_speedup_spread"]["reason"]
    assert "unreadable" in printed and "too busy to time decoding" in printed
    assert "unreadable" in md.read_text()


def test_spreads_of_nothing_are_unreadable_not_errors():
    from fico.commands.timing import Spread, ratio_text

    assert Spread.of([]).show(" ms") == "unreadable (no measurements)"
    assert not Spread.of([float("nan")]).readable
    ratio = Spread.ratio([1.0, 2.0], [0.0, float("nan")])
    assert ratio.median is None and ratio_text(ratio).startswith("unreadable (")
    assert Spread.from_dict(Spread.of([1.0, 2.0]).as_dict()) == Spread.of([1.0, 2.0])


def test_bench_on_llava_next_replays_every_tower_pass(tmp_path):
    """A NeXT image's tower passes run as one batch in the replay, as in the model; the token
    counts come from the image's own size; decoding can be left untimed."""
    from fico import embedded_next

    directory = tmp_path / "next"
    embedded_next.build_model(crop=112, vision_layers=2, llm_layers=4).save_pretrained(directory)
    embedded_next.build_processor(crop=112).save_pretrained(directory)
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert main(["bench", "budgets/random_next_160", "fastv", "--model", str(directory), "--reps", "1", "--replay",
                 "--decode-tokens", "0", "--json", str(out), "--markdown", str(md)]) == 0
    report = json.loads(out.read_text())
    base, random_160, fastv = report["baseline"], *report["results"]
    assert random_160["image_features"] == 160 and base["image_features"] > 160
    assert random_160["flops_speedup"] > 1 and random_160["replay_ms"] > 0 and fastv["replay_ms"] > 0
    assert base["decode_ms_per_token"] is None and "decoding was not timed" in md.read_text()


def test_the_replay_batches_a_next_images_tower_passes():
    from fico import embedded_next
    from fico.benchmarks.replay import replay_seconds
    from fico.cost.model import TokenCounts

    model = embedded_next.build_model(crop=56, vision_layers=2, llm_layers=2)
    seen = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape[:2])))
             for layer in model.model.vision_tower.encoder.layers]
    counts = TokenCounts(vision_in=[17, 17], vision_out=[17, 12], features=40, llm=[50, 50], text_tokens=10,
                         projected=48, vision_passes=3)
    try:
        with torch.no_grad():
            assert replay_seconds(model, counts) > 0
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [(3, 17), (3, 12)]


def test_stage_growth_compares_two_reports(tmp_path):
    from fico.commands.growth import BLOCK, main as growth

    def report(model, tokens, stage_share, prefill_ms):
        return {"model": model, "date": "2026-12-05", "architecture": "a", "machine": "m",
                "baseline": {"image_features": tokens},
                "results": [{"recipe": "fastv", "stage_share": stage_share, "prefill_ms": prefill_ms},
                            {"recipe": "only_here", "stage_share": 0.1, "prefill_ms": 1.0}]}

    small, large, md = tmp_path / "small.json", tmp_path / "large.json", tmp_path / "b.md"
    small.write_text(json.dumps(report("shaped", 576, 0.01, 2000.0)))
    large.write_text(json.dumps({**report("shaped-next", 2928, 0.02, 5000.0), "results": [
        {"recipe": "fastv", "stage_share": 0.02, "prefill_ms": 5000.0}]}))
    md.write_text("# Benchmarks\n")
    assert growth([str(small), str(large), "--write", str(md)]) == 0
    text = md.read_text()
    assert f"<!-- bench:{BLOCK}:begin -->" in text and "5.08 x" in text
    assert "| fastv | 20.0 | 1.0 | 100.0 | 2.0 | 5.0 x |" in text and "only_here" not in text


def test_bench_on_a_qwen_checkpoint_counts_its_own_image_and_tower(tmp_path):
    """A Qwen2.5-VL checkpoint: the token counts come from the image's patch grid, the replay
    runs its whole tower, and fico's work (the attention_received capture included) is timed."""
    from fico import embedded_qwen

    directory = tmp_path / "qwen"
    embedded_qwen.build_model("qwen2.5-vl").save_pretrained(directory)
    embedded_qwen.build_processor("qwen2.5-vl").save_pretrained(directory)
    out = tmp_path / "bench.json"
    assert main(["bench", "budgets/vispruner_cls_free_keep22", "fastv", "--model", str(directory), "--reps", "1",
                 "--replay", "--memory", "--decode-tokens", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    base, vispruner, fastv = report["baseline"], *report["results"]
    assert base["image_features"] == 144  # the toy's 336 x 336 image: 24 x 24 patches, 12 x 12 merged
    assert vispruner["image_features"] == 32 and vispruner["tflops"] < base["tflops"]
    assert vispruner["work_share"] > vispruner["stage_share"] > 0  # the tower signal is fico's work too
    assert fastv["replay_ms"] > 0 and vispruner["work_peak_mb"] is not None


def test_the_shaped_qwen_model_has_qwen2_5_vl_7b_depths_and_a_1280_token_image():
    import inspect

    from fico.benchmarks import shaped
    from fico.cost.model import model_spec

    defaults = inspect.signature(shaped.build_shaped_qwen2_5_vl).parameters
    assert (defaults["vision_layers"].default, defaults["llm_layers"].default) == (32, 28)  # Qwen2.5-VL-7B's
    model = shaped.build_shaped_qwen2_5_vl(vision_layers=2, llm_layers=2)
    inputs = shaped.shaped_qwen_inputs(model)
    assert int((inputs["input_ids"] == shaped.IMAGE_TOKEN_ID).sum()) == 1280
    assert inputs["image_grid_thw"].tolist() == [[1, 64, 80]] and inputs["pixel_values"].shape == (5120, 1176)
    assert model_spec(model).image(shaped.QWEN_IMAGE_SIZE)[1] == 1280
    assert model.config.vision_config.fullatt_block_indexes == (7, 15, 23, 31)
