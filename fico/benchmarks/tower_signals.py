"""What a [CLS]-free tower signal costs: a native-resolution tower's forward with and without a
recipe's ``attention_received`` capture, in interleaved rounds, medians.

The capture re-forms one full-attention block's attention over each image (every query row, a
band at a time) beside the SDPA kernel that block runs anyway, so its cost grows as ``N^2``
with the image's patches, against the tower's ``N`` (window blocks) and ``N^2`` (its four
full-attention blocks) cost::

    python -m fico.benchmarks.tower_signals            # shaped Qwen2.5-VL, an 896 x 1120 image
"""

from __future__ import annotations

import argparse
import statistics

import torch

from .replay import _timed


def tower_signal_share(model, inputs: dict, recipe, reps: int = 5) -> dict:
    """Median seconds of ``model``'s tower on ``inputs``' images alone and with ``recipe``
    applied (its pre_llm signals captured during the tower's forward), and their ratio minus
    one: what the signals add to the tower's own time."""
    from .. import apply

    tower, pixels, grid = model.model.visual, inputs["pixel_values"], inputs["image_grid_thw"]
    plain, captured = [], []
    with torch.inference_mode():
        for rep in range(reps + 1):  # a warm-up round first
            alone = _timed(lambda: tower(pixels, grid_thw=grid))
            with apply(model, recipe):
                with_signals = _timed(lambda: tower(pixels, grid_thw=grid))
            if rep:
                plain.append(alone)
                captured.append(with_signals)
    tower_s, with_s = statistics.median(plain), statistics.median(captured)
    return {"tower_s": tower_s, "with_signals_s": with_s, "signal_share": with_s / tower_s - 1,
            "rounds": reps}


def main(argv=None) -> int:
    from ..loading import load_recipe
    from . import shaped

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = shaped.build_shaped_qwen2_5_vl()
    inputs = shaped.shaped_qwen_inputs(model)
    recipe = load_recipe("budgets/fastervlm_cls_free_keep22")
    result = tower_signal_share(model, inputs, recipe, args.reps)
    print(f"shaped Qwen2.5-VL tower on an {shaped.QWEN_IMAGE_SIZE[0]} x {shaped.QWEN_IMAGE_SIZE[1]} image "
          f"(5120 patches), {args.threads} threads, median of {args.reps} interleaved rounds: "
          f"{result['tower_s'] * 1e3:.0f} ms alone, {result['with_signals_s'] * 1e3:.0f} ms with attention_received "
          f"(block {len(model.model.visual.blocks) - 1}): +{result['signal_share']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
