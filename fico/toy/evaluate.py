"""Accuracy of a (possibly reduced) toy model on the synthetic test set, per question type.

    python -m fico.toy.evaluate [--images 300] [--recipe NAME [key=value ...]]
    python -m fico.toy.evaluate --images 1000 --write     # state the shipped weights' accuracy
    python -m fico.toy.evaluate --images 10 --cls-saliency  # where [CLS] looks, per CLIP layer

``--write`` records, in ``fico/toy/weights/accuracy.json``, the accuracy on ``--images``
test images from ``--first-image`` on and on the fixed slice of the first ``SLICE_IMAGES``
that ``tests/test_toy.py`` re-measures in CI.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from .data import QUESTION_TYPES, TEST_SEEDS, example, pixel_values, prompt

#: test images re-evaluated in CI (6 questions each; well within a minute on 2 cores)
SLICE_IMAGES = 20
#: test images whose [CLS] saliency ``--write`` states (CI re-measures the first few)
SALIENCY_IMAGES = 100


def answer_logits(model, processor, images, questions, batch: int = 24, recipe=None) -> torch.Tensor:
    """Next-token logits after each ``(image, question)`` prompt, as the processor builds them;
    ``recipe``: the one applied to ``model``, for methods that read the question."""
    out = []
    for start in range(0, len(questions), batch):
        chunk = slice(start, start + batch)
        inputs = processor(images=images[chunk], text=[prompt(q) for q in questions[chunk]],
                           return_tensors="pt", padding=True)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        instruction = recipe.instruction_inputs(questions[chunk]) if recipe is not None else {}
        out.append(model(**inputs, **instruction, logits_to_keep=1).logits[:, -1].float().cpu())
    return torch.cat(out)


def evaluate(model, processor, first_seed: int = TEST_SEEDS.start, images: int = 300) -> dict:
    """Accuracy per question type and overall on test images ``first_seed ...``."""
    pictures, questions, answers, kinds = [], [], [], []
    for seed in range(first_seed, first_seed + images):
        ex = example(seed)
        for q in ex.questions:
            pictures.append(ex.image)
            questions.append(q.text)
            answers.append(processor.tokenizer.convert_tokens_to_ids(q.answer))
            kinds.append(q.kind)
    predicted = answer_logits(model, processor, pictures, questions).argmax(-1).tolist()
    correct = defaultdict(list)
    for kind, guess, answer in zip(kinds, predicted, answers):
        correct[kind].append(guess == answer)
    result = {kind: sum(v) / len(v) for kind, v in correct.items()}
    result["overall"] = sum(sum(v) for v in correct.values()) / len(predicted)
    return {k: round(result[k], 4) for k in (*QUESTION_TYPES, "overall")}


#: CLIP layers whose [CLS] row the bundled [CLS]-ranked filters read by default: EViT's 6, 12,
#: 18 and FiCoCo-V's 11..22 (recipes/evit.yaml, ficoco_v.yaml): the saliency target's layers
CLS_LAYERS = (6, *range(11, 23))


def cls_saliency(model, first_seed: int = TEST_SEEDS.start, images: int = 10, chunk: int = 10) -> dict:
    """Per CLIP layer, the share of the [CLS] row's head-mean attention (over patches) that
    falls on patches holding an object or the digit, averaged over the images, next to those
    patches' share of all patches; and its mean and least value over ``CLS_LAYERS``. Filters
    that rank patches by [CLS] attention (EViT, FiCoCo-V) need the first to exceed the second
    at the layers they reduce."""
    import numpy as np

    totals, foreground_share = None, 0.0
    previous = model.config.vision_config._attn_implementation
    model.model.vision_tower.set_attn_implementation("eager")  # attention weights: eager only
    try:
        for start in range(first_seed, first_seed + images, chunk):
            examples = [example(seed) for seed in range(start, min(start + chunk, first_seed + images))]
            pixels = torch.from_numpy(pixel_values([ex.image for ex in examples])).to(model.dtype)
            foreground = torch.from_numpy(np.stack([ex.patch_labels for ex in examples]) > 0)
            attentions = model.model.vision_tower(pixels, output_attentions=True).attentions
            shares = []
            for attention in attentions:
                row = attention[:, :, 0, 1:].float().mean(1)
                row = row / row.sum(-1, keepdim=True)
                shares.append((row * foreground).sum(-1).sum().item())
            totals = shares if totals is None else [a + b for a, b in zip(totals, shares)]
            foreground_share += foreground.float().mean(-1).sum().item()
    finally:
        model.model.vision_tower.set_attn_implementation(previous)
    per_layer = {layer: round(total / images, 4) for layer, total in enumerate(totals)}
    return {"images": images, "foreground_share": round(foreground_share / images, 4),
            "cls_on_foreground": per_layer, "layers": list(CLS_LAYERS),
            "mean_at_layers": round(sum(per_layer[i] for i in CLS_LAYERS) / len(CLS_LAYERS), 4),
            "least_at_layers": min(per_layer[i] for i in CLS_LAYERS)}


def main(argv=None) -> None:
    import fico

    from .model import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--first-image", type=int, default=0,
                        help="start at this test image (e.g. after images a checkpoint was selected on)")
    parser.add_argument("--recipe", default=None)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--cls-saliency", action="store_true",
                        help="instead of accuracy: the share of [CLS] attention on object patches, per CLIP layer")
    parser.add_argument("--write", action="store_true",
                        help="record the result (and the CI slice's) as the weights' accuracy (accuracy.json)")
    parser.add_argument("--weights", default=None, help="the weights' directory (default: the shipped ones)")
    args = parser.parse_args(argv)
    model, processor = load(args.weights)
    first_seed = TEST_SEEDS.start + args.first_image
    if args.cls_saliency:
        with torch.no_grad():
            print(json.dumps(cls_saliency(model, first_seed, args.images), indent=2))
        return
    if args.write:
        from pathlib import Path

        from .model import WEIGHTS

        if args.recipe:
            parser.error("--write states the unreduced model's accuracy; drop --recipe")
        with torch.no_grad():
            result = evaluate(model, processor, first_seed, images=args.images)
            result["first_image"] = args.first_image
            result["images"] = args.images
            result["questions"] = args.images * len(QUESTION_TYPES)
            result["slice"] = dict(evaluate(model, processor, images=SLICE_IMAGES), images=SLICE_IMAGES)
            result["cls_saliency"] = cls_saliency(model, TEST_SEEDS.start + args.first_image, SALIENCY_IMAGES)
        (Path(args.weights or WEIGHTS) / "accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    with torch.no_grad():
        if args.recipe:
            try:
                recipe = fico.load_recipe(args.recipe, args.overrides)
                with fico.apply(model, recipe):
                    result = evaluate(model, processor, first_seed, images=args.images)
            except fico.FicoError as error:  # names the recipe key; a traceback would bury it
                parser.exit(2, f"error: {error}\n")
        else:
            result = evaluate(model, processor, first_seed, images=args.images)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
