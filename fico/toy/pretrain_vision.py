"""Phase 1 of fico-toy training: the vision tower and projector alone, on what covers each patch.

    python -m fico.toy.pretrain_vision --resume DIR --minutes 40 --out DIR

Every patch is labelled with what covers it (background, one of 12 colour-shape objects, or
one of 10 digits); the loss reads those labels from CLIP's feature layer and, RMS-normalised
as the LLM sees them, from the projector output, together with each visual token's grid
row and column. Background covers about 70% of the patches and is learned first; it is
down-weighted so that the rare digit and object patches drive training. Measured reason
for this phase: after joint training, a linear probe read the digit of digit patches from
the projector output at chance (9%), so no language model could answer "what digit".

The checkpoint (the whole LLaVA model, its language model untouched) is saved whenever the
object + digit patch accuracy on a fixed test slice improves; phase 2 is
``python -m fico.toy.train --resume DIR --reset-language-model --freeze-vision``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import COLORS, GRID, PATCH_CLASSES, SHAPES, TRAIN_SEEDS, VALIDATION_SEEDS, example, pixel_values
from .model import build_processor

FIRST_DIGIT = 1 + len(COLORS) * len(SHAPES)


def patch_batch(seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    examples = [example(s) for s in seeds]
    return (torch.from_numpy(pixel_values([ex.image for ex in examples])),
            torch.from_numpy(np.stack([ex.patch_labels for ex in examples])))


def patch_class_weights(background: float, digit: float) -> torch.Tensor:
    """Cross-entropy weights per patch class: background (about 70% of patches) down, digits
    (about 2%, a tenth of them per digit) up, so the rare patches drive training."""
    weights = torch.ones(PATCH_CLASSES)
    weights[0] = background
    weights[FIRST_DIGIT:] = digit
    return weights


def rms_normalised(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", type=Path, default=None, help="start from this checkpoint (default: scratch)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--steps", type=int, default=1500, help="length of the learning-rate schedule")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--background-weight", type=float, default=0.1)
    parser.add_argument("--digit-weight", type=float, default=10.0,
                        help="digit patches are about 2%% of the patches and a tenth of them per digit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-images", type=int, default=24, help="test images of the patch-accuracy check")
    args = parser.parse_args(argv)

    from transformers import LlavaForConditionalGeneration

    from .model import build_config

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.resume:
        model = LlavaForConditionalGeneration.from_pretrained(args.resume, local_files_only=True,
                                                              dtype=torch.float32)
    else:
        model = LlavaForConditionalGeneration(build_config())
        torch.nn.init.normal_(model.model.vision_tower.embeddings.position_embedding.weight, std=0.5)
    model.train()
    config = model.config
    patch_head = torch.nn.Linear(config.vision_config.hidden_size, PATCH_CLASSES)
    token_head = torch.nn.Linear(config.text_config.hidden_size, PATCH_CLASSES)
    cell_head = torch.nn.Linear(config.text_config.hidden_size, 2 * GRID)
    trained = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
               *patch_head.parameters(), *token_head.parameters(), *cell_head.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    class_weights = patch_class_weights(args.background_weight, args.digit_weight)
    side = 24 // GRID
    rows = (torch.arange(576) // 24 // side)
    cols = (torch.arange(576) % 24 // side)

    def losses(pixels, labels):
        # the feature layer's patch tokens, as LLaVA's "default" selection feeds the projector
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        vision = hidden[config.vision_feature_layer][:, 1:]
        features = model.model.multi_modal_projector(vision)
        patch = F.cross_entropy(patch_head(vision).flatten(0, 1), labels.flatten(), weight=class_weights)
        normed = rms_normalised(features)
        token_logits = token_head(normed)
        token = F.cross_entropy(token_logits.flatten(0, 1), labels.flatten(), weight=class_weights)
        cells = cell_head(normed)
        b = labels.shape[0]
        cell = (F.cross_entropy(cells[..., :GRID].flatten(0, 1), rows.repeat(b))
                + F.cross_entropy(cells[..., GRID:].flatten(0, 1), cols.repeat(b)))
        return patch, token, cell, token_logits

    validation = range(VALIDATION_SEEDS.start, VALIDATION_SEEDS.start + args.eval_images)
    eval_pixels, eval_labels = patch_batch(list(validation))
    rng = np.random.default_rng(args.seed)
    deadline = time.time() + args.minutes * 60
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "vision_log.jsonl"
    log.write_text("")
    best, step = -1.0, 0
    while time.time() < deadline and step < args.steps:
        step += 1
        lr = args.lr * min(1.0, step / 50) * max(0.1, 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        pixels, labels = patch_batch(rng.integers(TRAIN_SEEDS.start, TRAIN_SEEDS.stop, args.batch).tolist())
        patch, token, cell, _ = losses(pixels, labels)
        loss = patch + token + 0.5 * cell
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        record = {"step": step, "patch": round(patch.item(), 4), "token": round(token.item(), 4),
                  "cell": round(cell.item(), 4), "lr": round(lr, 6),
                  "time": round(time.time() - deadline + args.minutes * 60, 1)}
        if step % args.eval_every == 0:
            model.eval()
            with torch.no_grad():
                predicted = losses(eval_pixels, eval_labels)[3].argmax(-1)
            model.train()
            objects = (eval_labels > 0) & (eval_labels < FIRST_DIGIT)
            digits = eval_labels >= FIRST_DIGIT
            accuracy = {"objects": (predicted[objects] == eval_labels[objects]).float().mean().item(),
                        "digits": (predicted[digits] == eval_labels[digits]).float().mean().item()}
            record["eval"] = {k: round(v, 4) for k, v in accuracy.items()}
            if sum(accuracy.values()) > best:
                best = sum(accuracy.values())
                model.save_pretrained(args.out)
                build_processor().save_pretrained(args.out)
        with log.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
