"""What fico's work adds to memory, and the models that measure it at LLaVA-NeXT's token counts.

Signals that need every attention row are formed a band of query rows at a time (the full
``(B, H, N, N)`` never exists at once); the bands change no value. Every step's signals and
stages run inside :meth:`fico.ReductionRun.work`, where a benchmark's memory probe measures
them; the shaped NeXT model gives the processor's token counts.
"""

import contextlib

import pytest
import torch

import fico
import fico.adapters.attention as attention
from fico.adapters.attention import row_bands
from fico.benchmarks.memory import prefill_memory
from fico.benchmarks.shaped import NEXT_IMAGE_SIZE, build_shaped_next_model, shaped_next_inputs

# steps at every site, and every way a step forms an attention signal over all rows:
# FiCoCo-L's head-mean matrix at a decoder input, FitPrune's layers formed whole, FiCoCo-V's
# explicit CLIP attention, vision_output ([CLS] row) and pre_llm steps
RECIPES = ["ficoco_l", "fitprune", "ficoco_v", "fastv", "visionzip", "divprune", "pdrop", "sparsevlm"]


def test_row_bands_cover_every_row_once_within_the_budget():
    for rows, heads, keys, elements in [(10, 4, 10, 40), (7, 2, 3, 1), (3000, 32, 3000, 1 << 24), (5, 1, 5, 10 ** 9)]:
        bands = row_bands(rows, heads, keys, elements)
        assert [r for band in bands for r in range(rows)[band]] == list(range(rows))
        assert all(heads * (b.stop - b.start) * keys <= max(elements, heads * keys) for b in bands)
    assert len(row_bands(3000, 32, 3000)) > 1, "LLaVA-NeXT's full attention is banded by default"


@pytest.mark.parametrize("name", ["ficoco_l", "fitprune", "ficoco_vl"])
def test_banded_attention_signals_change_nothing(tiny_model, batch_inputs, monkeypatch, name):
    """One row per band against the whole matrix at once: the same tokens kept, the same logits."""
    model, batch = tiny_model(dtype=torch.float32, vision_layers=24, llm_layers=32), batch_inputs(torch.float32)
    recipe = fico.load_recipe(name)

    def run():
        with torch.no_grad(), fico.apply(model, recipe) as applied:
            logits = model(**batch).logits
        return logits, applied.trace.llm

    whole, whole_counts = run()
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 1)
    banded, banded_counts = run()
    assert banded_counts == whole_counts
    torch.testing.assert_close(banded, whole, rtol=1e-5, atol=1e-5)


class CountingProbe:
    """A memory probe that counts the spans of fico's work and checks they do not nest."""

    def __init__(self):
        self.spans, self.depth = 0, 0

    @contextlib.contextmanager
    def __call__(self):
        self.spans += 1
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


@pytest.mark.parametrize("name", RECIPES)
def test_every_step_runs_inside_a_span_of_work(tiny_model, single_inputs, name):
    model = tiny_model(dtype=torch.float32, vision_layers=24, llm_layers=32)
    recipe = fico.load_recipe(name)
    probe = CountingProbe()
    with torch.no_grad(), fico.apply(model, recipe) as run:
        run.work_probe = probe
        model(**single_inputs(torch.float32), **recipe.instruction_inputs(["what is the color of the circle ?"]))
    steps = len(run.trace.steps)
    assert steps and probe.spans >= steps, f"{probe.spans} spans for {steps} steps"
    assert probe.depth == 0


def test_span_peaks_read_the_allocators_running_total():
    """Allocation events carry the running total: the prefill's peak above its start, and each
    span's peak above the level where it began, exactly."""
    from fico.benchmarks.memory import SPAN, span_peaks

    def alloc(ts, total, size):
        return {"name": "[memory]", "ph": "i", "ts": ts, "args": {"Total Allocated": total, "Bytes": size,
                                                                  "Device Type": 0}}

    trace = {"traceEvents": [alloc(1, 100, 100), alloc(2, 300, 200), {"name": SPAN, "ph": "X", "ts": 3, "dur": 4},
                             alloc(4, 1300, 1000), alloc(5, 800, -500), alloc(6, 900, 100), alloc(8, 100, -800),
                             {"name": SPAN, "ph": "X", "ts": 9, "dur": 1}, alloc(11, 5000, 4900)]}
    assert span_peaks(trace) == (5000, [1000, 0])


def test_banding_lowers_the_work_peak_on_the_cpu(tiny_model, batch_inputs, monkeypatch):
    """FiCoCo-L's full attention signal: whole, its (B, H, N, N) logits and probabilities are
    the span's peak; in bands of a few rows, what remains is the (B, N, N) signal itself."""
    model, batch = tiny_model(dtype=torch.float32, vision_layers=24, llm_layers=32), batch_inputs(torch.float32)
    recipe = fico.load_recipe("ficoco_l")
    with torch.no_grad():
        unreduced = prefill_memory(model, batch)
        whole = prefill_memory(model, batch, recipe)
        monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 1 << 14)
        banded = prefill_memory(model, batch, recipe)
    b, n = batch["input_ids"].shape
    heads = model.config.text_config.num_attention_heads
    assert unreduced.work is None and unreduced.activations > 0 and unreduced.peak > unreduced.activations
    assert whole.work >= 2 * b * heads * n * n * 4, "the whole signal holds every head's logits and probabilities"
    assert banded.work < whole.work / 2
    assert banded.work >= b * n * n * 4, "the head-mean matrix itself"


def test_the_shaped_next_model_takes_the_processors_token_counts():
    """672 x 672: five CLIP passes (base + 2 x 2 crops), 576 + 48 x 48 + 48 = 2928 visual tokens,
    as LLaVA-NeXT's processor counts them; the model packs exactly that many."""
    model = build_shaped_next_model(vision_width=64, llm_width=64, llm_layers=1, vision_layers=2)
    inputs = shaped_next_inputs(model)
    assert NEXT_IMAGE_SIZE == (672, 672)
    assert inputs["pixel_values"].shape == (1, 5, 3, 336, 336)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2928
    with torch.no_grad(), fico.apply(model, fico.load_recipe("budgets/random_next_640")) as run:
        model(**inputs, logits_to_keep=1)
    assert run.trace.llm[0] == 640 + inputs["input_ids"].shape[1] - 2928


def test_what_a_layer_captured_is_released_once_read():
    """A step's captured q/k and attention are let go after the layer that reads them: at
    LLaVA-NeXT's 2992 tokens FitPrune's reduced prefill peaks above the unreduced one by less
    than one span of its work (it held every layer's head reductions until the forward ended:
    1.7 GB above it on this model)."""
    model = build_shaped_next_model(vision_width=64, llm_width=128, vision_layers=2)
    inputs = shaped_next_inputs(model)
    with torch.no_grad():
        unreduced = prefill_memory(model, inputs)
        reduced = prefill_memory(model, inputs, fico.load_recipe("fitprune"))
    assert reduced.peak <= unreduced.peak + reduced.work


def test_shaped_next_7b_has_llava_next_7bs_architecture():
    """llava-v1.6-vicuna-7b: LLaVA-1.5-7B's towers and projector, plus the 4096-wide newline."""
    from fico.benchmarks.shaped import build_shaped_7b, build_shaped_next_7b

    flat, model = build_shaped_7b(device="meta"), build_shaped_next_7b(device="meta")
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in flat.parameters()) + 4096
    assert model.config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert next(model.parameters()).dtype == torch.float16
