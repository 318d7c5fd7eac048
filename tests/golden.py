"""The golden record: what every bundled recipe does to a fixed batch, before and after a refactor.

For every bundled recipe (budget variants included) on two models, the trained toy and the
embedded random model (both LLaVA-1.5's geometry, float64), it records

* the logits of one forward of a fixed left-padded batch of two images and prompts,
* ``run.trace`` of that forward (counts per layer and every step, seconds left out),
* a cached ``generate()`` of three greedy tokens: the sequences and each step's logits.

Logits are kept as a SHA-256 of their bytes (the bitwise check) and, for the readout when
they differ, the last position's row, the sum and the absolute sum (``golden.safetensors``).
Bits depend on the machine (its SIMD kernels and thread count), so the record carries the
platform it was made on: on that platform every tensor must be bitwise equal; elsewhere the
traces and generated tokens must be equal and the values within float64 round-off.

Rewrite after an intended change of behaviour (never to make a refactor pass)::

    .venv/bin/python -m tests.golden --write
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

import fico
from fico import embedded

HERE = Path(__file__).resolve().parent / "golden"
RECORD, VALUES = HERE / "golden.json", HERE / "golden.safetensors"
MODELS = ("toy", "embedded")
NEW_TOKENS = 3
THREADS = 2  # fixed, so a machine with more cores still reproduces the recording's bits


def platform_key() -> dict:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "threads": THREADS}


def build(name: str):
    """The model, its fixed batch and the instruction texts of that batch."""
    if name == "toy":
        from fico.toy import model as toy
        from fico.toy.data import example, prompt

        model, processor = toy.load(dtype=torch.float64)
        questions = ["what color is the circle ?", "how many objects are there ?"]
        images = [example(seed).image for seed in (1, 2)]
        batch = processor(images=images, text=[prompt(q) for q in questions], return_tensors="pt", padding=True)
    else:
        model = embedded.build_model(seed=0, dtype=torch.float64)
        processor = embedded.build_processor()
        questions = ["what is the color of the circle ?", "how many objects ?"]
        batch = embedded.example_inputs(processor, prompts=[f"USER: <image> {q} ASSISTANT:" for q in questions],
                                        seeds=[1, 2])
    batch["pixel_values"] = batch["pixel_values"].to(torch.float64)
    return model, batch, questions


def trace_record(trace) -> dict:
    return {"vision": trace.vision, "vision_features": trace.vision_features, "llm": trace.llm,
            "llm_mlp": trace.llm_mlp, "visual": trace.visual,
            "steps": [[s.site, s.layer, s.tokens_in, s.tokens_out, s.removed] for s in trace.steps]}


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def measure(model, batch, questions, recipe_name: str, clip_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The record of one recipe on one model: JSON-able facts and the tensors for the readout."""
    overrides = [f"text_encoder={clip_dir}"] if "cdpruner" in recipe_name else []
    recipe = fico.load_recipe(recipe_name, overrides)
    instruction = recipe.instruction_inputs(questions)
    with torch.no_grad(), fico.apply(model, recipe) as run:
        logits = model(**batch, **instruction).logits
        trace = trace_record(run.trace)
        out = model.generate(**batch, **instruction, max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        generate_trace = trace_record(run.trace)
    steps = torch.stack(list(out.logits))
    facts = {"logits": digest(logits), "logits_shape": list(logits.shape), "trace": trace,
             "generate_trace": generate_trace, "sequences": digest(out.sequences),
             "new_tokens": out.sequences[:, batch["input_ids"].shape[1]:].tolist(), "generate_logits": digest(steps)}
    values = {"last": logits[:, -1].clone(), "sums": torch.stack([logits.sum(), logits.abs().sum()]),
              "generate_logits": steps.clone()}
    return facts, values


def outcome(model, batch, questions, recipe_name: str, clip_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """:func:`measure`, or the refusal (a recipe whose schedule does not fit the model is part
    of the behaviour too), its message with the checkout's path left out."""
    try:
        return measure(model, batch, questions, recipe_name, clip_dir)
    except fico.FicoError as error:
        root = str(Path(fico.__file__).resolve().parent.parent)
        return {"error": f"{type(error).__name__}: {str(error).replace(root, '<root>')}"}, {}


def cases() -> list[tuple[str, str]]:
    return [(model, recipe) for model in MODELS for recipe in fico.bundled_recipes()]


def record_all(progress=None) -> tuple[dict, dict[str, torch.Tensor]]:
    torch.set_num_threads(THREADS)
    facts, values = {"platform": platform_key(), "cases": {}}, {}
    with tempfile.TemporaryDirectory() as clip_dir:
        embedded.save_clip_checkpoint(clip_dir, vision_width=64)
        for model_name in MODELS:
            model, batch, questions = build(model_name)
            for recipe_name in fico.bundled_recipes():
                key = f"{model_name}/{recipe_name}"
                facts["cases"][key], case_values = outcome(model, batch, questions, recipe_name, clip_dir)
                values.update({f"{key}/{k}": v for k, v in case_values.items()})
                if progress:
                    progress(key)
    return facts, values


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["--write"]:
        sys.exit("usage: python -m tests.golden --write   (records tests/golden/; see the module docstring)")
    from safetensors.torch import save_file

    facts, values = record_all(progress=lambda key: print(key, flush=True))
    HERE.mkdir(exist_ok=True)
    # one line per case: a diff of the record names the cases that changed
    cases = ",\n".join(f" {json.dumps(key)}: {json.dumps(value, sort_keys=True)}"
                        for key, value in sorted(facts["cases"].items()))
    RECORD.write_text(f'{{"platform": {json.dumps(facts["platform"], sort_keys=True)},\n"cases": {{\n{cases}\n}}}}\n')
    save_file(values, VALUES)
    print(f"wrote {RECORD} and {VALUES} ({len(facts['cases'])} cases)")


if __name__ == "__main__":
    main()
