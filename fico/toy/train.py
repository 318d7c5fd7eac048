"""Phase 2 of fico-toy training (or all of it, from scratch): the questions, reproducibly from a seed.

    python -m fico.toy.train --resume DIR --reset-language-model --freeze-vision [--minutes 40] [--out DIR]

``DIR`` is phase 1's checkpoint (``fico.toy.pretrain_vision``; see docs/toy.md). Each step
draws ``batch`` images with ``--questions-per-type`` questions of each type. Questions about
one image are packed into one sequence after a shared image prefix, with a block attention
mask (each question sees the image and itself) and positions that restart after the image,
which gives exactly the logits of the unpacked prompt while running the vision tower and
the image prefix once. Besides the answer loss: what covers each patch, read from CLIP's
feature layer and from the projector output; the cell row/column of each visual token; the
answer position's attention on the object (digit) patches of the cells the question names
(upper layers; for counting, at least half of it, so that the share can grow with the
count); the question, word by word, at the answer position entering those layers; and the
patch content of the visual tokens entering those layers. The auxiliary heads are saved
beside the checkpoint (``HEADS``, not part of the model) so that ``--resume`` continues them.

``--renumber-share S`` (phase 2b of ``fico.toy.build``): for a share S of the images, part of
the background image tokens is dropped and the rest renumbered contiguously (``packed_batch``),
as a method that prunes before the language model leaves the prompt. Without it the language
model finds a named grid cell by its tokens' RoPE positions, and every method that renumbers
loses about half of the cell-addressed answers whatever it keeps (docs/toy.md).

Every ``--eval-every`` steps the model is evaluated on fixed validation images; the best
checkpoint is saved with ``save_pretrained`` (safetensors) together with the processor.
Training stops at the step or time limit, or when the target (85% overall, 70% per type)
holds on two evaluations in a row.
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
from safetensors.torch import load_file, save_file

from .data import GRID, PATCH_CLASSES, QUESTION_TYPES, TRAIN_SEEDS, VALIDATION_SEEDS, VOCAB, example, pixel_values
from .model import WEIGHTS, build_config, build_processor
from .pretrain_vision import patch_class_weights, rms_normalised

IMAGE = VOCAB.index("<image>")
PREFIX = [VOCAB.index("<s>"), VOCAB.index("USER:")] + [IMAGE] * 576
COUNT_ATTENTION_FLOOR = 0.5
RENUMBER_MAX_DROP = 0.8  # the largest share of background image tokens --renumber-share drops
QUESTION_SLOTS = 12  # longest question, in words
HEADS = "training_heads.safetensors"  # the auxiliary heads, saved beside a checkpoint


def encode(text: str) -> list[int]:
    return [VOCAB.index(w) for w in text.split()]


def question_words(text: str) -> torch.Tensor:
    """The question as ``QUESTION_SLOTS`` one-hot words, flattened: which word is where (the
    order matters: "is the red circle above the blue square" names two objects in turn)."""
    ids = torch.tensor(encode(text))
    if len(ids) > QUESTION_SLOTS:
        raise ValueError(f"question longer than {QUESTION_SLOTS} words: {text!r}")
    target = torch.zeros(QUESTION_SLOTS, len(VOCAB))
    target[torch.arange(len(ids)), ids] = 1.0
    return target.flatten()


def _cell_tokens(cells) -> torch.Tensor:
    """Which prefix positions hold the image tokens of ``cells`` (bool over the prefix)."""
    mask = torch.zeros(len(PREFIX), dtype=torch.bool)
    side = 24 // GRID
    for row, col in cells:
        for r in range(row * side, (row + 1) * side):
            start = 2 + r * 24 + col * side
            mask[start:start + side] = True
    return mask


def packed_batch(seeds: list[int], questions_per_type: int = 1, renumber_share: float = 0.0,
                 rng: np.random.Generator | None = None, max_drop: float = RENUMBER_MAX_DROP):
    """Inputs, masks, answer positions/ids and auxiliary labels for the images ``seeds``.

    With ``renumber_share`` > 0 (and ``rng``), each image is, with that probability, shown as a
    token-reduction method that renumbers would leave it: a share drawn uniformly from
    ``[0, max_drop]`` of its *background* image tokens is dropped (object and digit tokens stay,
    so every answer stays defined). A dropped token is masked out of every other row (training
    gives it no content target), and the kept prefix tokens take the contiguous positions
    ``0..K-1``, the questions starting at ``K``:

        pos(j) = #{kept i <= j} - 1,   question positions K, K+1, ...

    which are the positions the pruned prompt would have had. ``kept`` ``(B, 576)`` says which
    image tokens are kept (all of them without the augmentation, the batch then being the same
    as without the arguments, and ``rng`` untouched)."""
    examples = [example(s, questions_per_type) for s in seeds]
    sequences, answer_positions, answers, relevant, floors, words = [], [], [], [], [], []
    for ex in examples:
        # what covers a patch, over the prefix: the supervised attention targets the object
        # (digit) patches of the named cells, not the background around them
        covered = torch.zeros(len(PREFIX), dtype=torch.bool)
        covered[2:] = torch.from_numpy(ex.patch_labels != 0)
        kept = torch.ones(len(PREFIX), dtype=torch.bool)
        if renumber_share > 0 and rng is not None and rng.random() < renumber_share:
            background = torch.nonzero(~covered[2:]).flatten() + 2
            dropped = rng.permutation(len(background))[:int(rng.uniform(0, max_drop) * len(background))]
            kept[background[torch.from_numpy(dropped)]] = False
        kept_count = int(kept.sum())
        ids, positions, ends = list(PREFIX), (torch.cumsum(kept.long(), 0) - 1).tolist(), []
        segments = []
        for q in ex.questions:
            seg = encode(q.text) + [VOCAB.index("ASSISTANT:")]
            segments.append((len(ids), len(seg)))
            ids += seg
            positions += list(range(kept_count, kept_count + len(seg)))
            ends.append(len(ids) - 1)
            answers.append(VOCAB.index(q.answer))
            words.append(question_words(q.text))
            relevant.append(_cell_tokens(q.cells) & covered)
            # counting needs attention that is not fully normalised onto the counted objects
            # (their share of it against the rest is what grows with the count)
            floors.append(COUNT_ATTENTION_FLOOR if q.kind == "count" else 1.0)
        sequences.append((ids, positions, segments, kept))
        answer_positions.append(ends)
    length = max(len(ids) for ids, *_ in sequences)
    b = len(seeds)
    input_ids = torch.full((b, length), VOCAB.index("<pad>"))
    position_ids = torch.zeros((b, length), dtype=torch.long)
    mask = torch.zeros((b, 1, length, length), dtype=torch.bool)
    prefix = len(PREFIX)
    causal = torch.ones(prefix, prefix, dtype=torch.bool).tril()
    kept_tokens = torch.ones((b, prefix), dtype=torch.bool)
    for i, (ids, positions, segments, kept) in enumerate(sequences):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        position_ids[i, :len(ids)] = torch.tensor(positions)
        mask[i, 0, :prefix, :prefix] = causal & kept[None, :]
        dropped = torch.nonzero(~kept).flatten()
        mask[i, 0, dropped, dropped] = True  # a dropped token's row sees itself only (no NaN)
        kept_tokens[i] = kept
        for start, size in segments:
            mask[i, 0, start:start + size, :prefix] = kept
            mask[i, 0, start:start + size, start:start + size] = torch.ones(size, size, dtype=torch.bool).tril()
        for pad in range(len(ids), length):  # padding rows attend to themselves only (no NaN)
            mask[i, 0, pad, pad] = True
    rows = torch.arange(576) // 24 // (24 // GRID)
    cols = torch.arange(576) % 24 // (24 // GRID)
    return {
        "input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask,
        "pixel_values": torch.from_numpy(pixel_values([ex.image for ex in examples])),
        "answer_rows": torch.tensor([i for i, ends in enumerate(answer_positions) for _ in ends]),
        "answer_cols": torch.tensor([p for ends in answer_positions for p in ends]),
        "answers": torch.tensor(answers),
        "relevant": torch.stack(relevant),  # (questions, length of the image prefix) bool
        "attention_floor": torch.tensor(floors),  # attention mass on ``relevant`` beyond which no loss
        "question_words": torch.stack(words),  # (questions, QUESTION_SLOTS * vocabulary) one-hot per word
        "patch_labels": torch.from_numpy(np.stack([ex.patch_labels for ex in examples])),
        "cell_rows": rows.expand(b, -1), "cell_cols": cols.expand(b, -1),
        "kept": kept_tokens[:, 2:],  # (B, 576) which image tokens the language model sees
    }


def answer_attention(attn, hidden: torch.Tensor, position_embeddings, mask: torch.Tensor,
                     rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Attention probabilities ``(Q, heads, L)`` of the query tokens ``(rows[i], cols[i])`` in
    the Llama attention module ``attn``, recomputed from its input ``hidden`` ``(B, L, D)``:

        p_i = softmax_j( (R_i W_q h_i) . (R_j W_k h_j) / sqrt(d) + mask_ij )

    with ``R`` the rotary embedding (``position_embeddings`` = (cos, sin)) and ``mask`` the
    ``(B, 1, L, L)`` bool block mask. Only the supervised rows are formed, so the model itself
    runs under SDPA (eager attention with ``output_attentions`` doubled the step time).
    """
    from transformers.models.llama.modeling_llama import rotate_half

    cos, sin = position_embeddings
    b, n, _ = hidden.shape
    head_dim, groups = attn.head_dim, attn.num_key_value_groups
    keys = attn.k_proj(hidden).view(b, n, -1, head_dim).transpose(1, 2)
    keys = keys * cos[:, None] + rotate_half(keys) * sin[:, None]  # (B, kv heads, L, d)
    queries = attn.q_proj(hidden[rows, cols]).view(len(rows), -1, head_dim)  # (Q, heads, d)
    queries = queries * cos[rows, cols][:, None] + rotate_half(queries) * sin[rows, cols][:, None]
    # query head h reads key head h // groups (grouped-query attention)
    queries = queries.view(len(rows), -1, groups, head_dim)
    logits = torch.einsum("qkgd,qkld->qkgl", queries, keys[rows]).flatten(1, 2) * attn.scaling
    logits = logits.masked_fill(~mask[rows, 0, cols][:, None], float("-inf"))
    return logits.softmax(-1)


def model_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """The packed block mask in the form the LLM's attention takes: bool for SDPA, additive for eager."""
    if model.config.text_config._attn_implementation == "eager":
        return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def packed_accuracy(model, seeds: list[int], batch: int = 10) -> dict:
    """Accuracy per question type from packed forwards (same logits as the unpacked prompts)."""
    from collections import defaultdict

    correct = defaultdict(list)
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        inputs = packed_batch(chunk)
        logits = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                       attention_mask=model_mask(model, inputs["attention_mask"]),
                       position_ids=inputs["position_ids"]).logits
        guesses = logits[inputs["answer_rows"], inputs["answer_cols"]].argmax(-1)
        kinds = [q.kind for s in chunk for q in example(s).questions]
        for kind, ok in zip(kinds, (guesses == inputs["answers"]).tolist()):
            correct[kind].append(ok)
    result = {kind: round(sum(v) / len(v), 4) for kind, v in correct.items()}
    result["overall"] = round(sum(sum(v) for v in correct.values()) / sum(len(v) for v in correct.values()), 4)
    return result


def reset_language_model(model, residual_scale: float = 0.1) -> None:
    """A fresh LLM whose residual branches start small (attention and MLP output projections
    scaled by ``residual_scale``), so the six layers start close to the identity and the
    answer's gradient reaches every layer; the output head starts afresh too."""
    language_model = model.model.language_model
    fresh = type(language_model)(language_model.config)
    with torch.no_grad():
        for layer in fresh.layers:
            layer.self_attn.o_proj.weight.mul_(residual_scale)
            layer.mlp.down_proj.weight.mul_(residual_scale)
    model.model.language_model = fresh
    torch.nn.init.normal_(model.lm_head.weight, std=language_model.config.initializer_range)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=90.0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None,
                        help="length of the learning-rate schedule and of the run (default: what --minutes allows)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--attention-weight", type=float, default=0.6,
                        help="weight of the attention supervision on the answer positions (0: off)")
    parser.add_argument("--content-weight", type=float, default=0.5,
                        help="weight of the loss keeping the patch content readable in the visual tokens entering "
                             "the supervised layers")
    parser.add_argument("--question-weight", type=float, default=0.3,
                        help="weight of the loss asking the answer position, entering the supervised layers, "
                             "to say its question word by word (0: off)")
    parser.add_argument("--supervised-layers", type=int, default=3, help="upper LLM layers whose attention is supervised")
    parser.add_argument("--resume", type=Path, default=None,
                        help="start from the weights in this directory (e.g. the shipped ones) instead of scratch")
    parser.add_argument("--questions-per-type", type=int, default=4,
                        help="questions of each type packed after one image (the image prefix is paid once)")
    parser.add_argument("--aux-weight", type=float, default=0.2, help="weight of each auxiliary vision loss")
    parser.add_argument("--freeze-vision", action="store_true",
                        help="keep the CLIP tower fixed (no backward through 24 layers: ~2.5x faster steps)")
    parser.add_argument("--train-vision-layers", type=int, default=0,
                        help="with --freeze-vision: still train this many CLIP layers below the feature layer "
                             "(the patch details, e.g. digits, can still improve at a small cost)")
    parser.add_argument("--vision-lr-scale", type=float, default=0.3,
                        help="learning rate of the CLIP parameters relative to --lr")
    parser.add_argument("--renumber-share", type=float, default=0.0,
                        help="share of images whose prefix loses some background tokens and is renumbered "
                             "contiguously, as methods that prune before the LLM leave it (0: off)")
    parser.add_argument("--background-weight", type=float, default=0.1,
                        help="weight of background patches in the patch losses (as phase 1)")
    parser.add_argument("--digit-weight", type=float, default=10.0, help="weight of digit patches (as phase 1)")
    parser.add_argument("--reset-language-model", action="store_true",
                        help="with --resume: keep the vision tower and projector, start the LLM afresh")
    args = parser.parse_args(argv)

    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.resume:
        model = LlavaForConditionalGeneration.from_pretrained(args.resume, local_files_only=True,
                                                              dtype=torch.float32).train()
    else:
        model = LlavaForConditionalGeneration(build_config()).train()
        # A strong position signal from the start: with CLIP's 0.02-std init, where a patch is
        # barely survives 24 layers and the LLM cannot learn to find a named cell.
        torch.nn.init.normal_(model.model.vision_tower.embeddings.position_embedding.weight, std=0.5)
    if args.reset_language_model or not args.resume:
        reset_language_model(model)
    config = model.config
    feature_layer = config.vision_config.num_hidden_layers + 1 + config.vision_feature_layer - 1
    if args.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
        for layer in model.model.vision_tower.encoder.layers[feature_layer + 1 - args.train_vision_layers:
                                                             feature_layer + 1]:
            layer.requires_grad_(True)
    model.set_attn_implementation("sdpa")
    processor = build_processor()
    patch_head = torch.nn.Linear(config.vision_config.hidden_size, PATCH_CLASSES)
    cell_head = torch.nn.Linear(config.text_config.hidden_size, 2 * GRID)
    token_head = torch.nn.Linear(config.text_config.hidden_size, PATCH_CLASSES)
    question_head = torch.nn.Linear(config.text_config.hidden_size, QUESTION_SLOTS * len(VOCAB))
    torch.nn.init.constant_(question_head.bias, -math.log(len(VOCAB)))  # start at the one-in-V prior
    vision_params = [p for p in model.model.vision_tower.parameters() if p.requires_grad]
    params = [p for p in (*model.parameters(), *patch_head.parameters(), *cell_head.parameters(),
                          *token_head.parameters(), *question_head.parameters()) if p.requires_grad]
    in_vision = {id(p) for p in vision_params}
    others = [p for p in params if id(p) not in in_vision]
    # a gentler rate for CLIP: its features are what phase 1 trained, the heads above start afresh
    optimizer = torch.optim.AdamW([{"params": others, "scale": 1.0},
                                   {"params": vision_params, "scale": args.vision_lr_scale}],
                                  lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    heads = torch.nn.ModuleDict({"patch": patch_head, "cell": cell_head, "token": token_head,
                                 "question": question_head})
    if args.resume and not args.reset_language_model and (args.resume / HEADS).is_file():
        heads.load_state_dict(load_file(args.resume / HEADS))
    class_weights = patch_class_weights(args.background_weight, args.digit_weight)
    captured = {}
    model.model.vision_tower.encoder.layers[feature_layer].register_forward_hook(
        lambda m, a, out: captured.__setitem__("vision", out))
    model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: captured.__setitem__("features", out))
    layers = model.model.language_model.layers
    supervised = range(len(layers) - args.supervised_layers, len(layers)) if args.attention_weight > 0 else ()
    for index in supervised:
        layers[index].self_attn.register_forward_pre_hook(
            lambda m, a, kw, index=index: captured.__setitem__(index, (kw["hidden_states"], kw["position_embeddings"])),
            with_kwargs=True)

    deadline = time.time() + args.minutes * 60
    # the schedule depends on the step only, so a run is reproducible from its seed and --steps
    total_steps = args.steps or int(args.minutes * 60 / (0.37 * args.batch))
    rng = np.random.default_rng(args.seed)
    best, good_in_a_row, step = -1.0, 0, 0
    log = args.out / "training_log.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    while time.time() < deadline and step < total_steps:
        step += 1
        lr = args.lr * min(1.0, step / 150) * max(
            0.1, 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        seeds = rng.integers(TRAIN_SEEDS.start, TRAIN_SEEDS.stop, args.batch).tolist()
        batch = packed_batch(seeds, args.questions_per_type, args.renumber_share, rng)
        # fp32: bf16 autocast was several times slower on this CPU (no AMX)
        mask = model_mask(model, batch["attention_mask"])
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                    attention_mask=mask, position_ids=batch["position_ids"],
                    output_hidden_states=True)
        logits = out.logits[batch["answer_rows"], batch["answer_cols"]].float()
        attention_loss = torch.zeros(())
        if args.attention_weight > 0:
            # Attention supervision: the answer position's attention (upper layers, mean over
            # heads) should rest on the object patches of the cells the answer depends on.
            # Evenly spread attention over 576 image tokens gives its parameters almost no
            # gradient otherwise.
            has_cells = batch["relevant"].any(-1)
            for index in supervised:
                hidden, position_embeddings = captured[index]
                rows = answer_attention(layers[index].self_attn, hidden, position_embeddings,
                                        batch["attention_mask"], batch["answer_rows"],
                                        batch["answer_cols"]).mean(1)  # (Q, L)
                mass = (rows[:, :len(PREFIX)] * batch["relevant"]).sum(-1)
                mass = torch.minimum(mass, batch["attention_floor"])
                attention_loss = attention_loss - torch.log(mass[has_cells] + 1e-6).mean() / args.supervised_layers
        answer_loss = F.cross_entropy(logits, batch["answers"])
        vision = captured["vision"][:, 1:].float()
        patch_loss = F.cross_entropy(patch_head(vision).flatten(0, 1), batch["patch_labels"].flatten(),
                                     weight=class_weights)
        # RMS-normalised, as the LLM's first norm sees them (the projector's output starts tiny)
        features = captured["features"].float()
        normed = rms_normalised(features)
        cells = cell_head(normed)
        cell_loss = (F.cross_entropy(cells[..., :GRID].flatten(0, 1), batch["cell_rows"].flatten())
                     + F.cross_entropy(cells[..., GRID:].flatten(0, 1), batch["cell_cols"].flatten()))
        # what covers each patch, also from the projector output: the LLM's visual tokens
        # themselves carry the content, so even evenly spread attention reads it
        token_loss = F.cross_entropy(token_head(normed).flatten(0, 1), batch["patch_labels"].flatten(),
                                     weight=class_weights)
        # Measured on a checkpoint stuck near 50%: a linear probe read the named row from the
        # answer position at 50% and the cell at 17%, so the query that should find the cell did
        # not know it. This asks the answer position, before the supervised layers, to carry its
        # question (which word is where: a bag of words loses which object a position question
        # names first, and position stayed at chance while the other types rose).
        question_loss = torch.zeros(())
        if args.question_weight > 0:
            asked = out.hidden_states[-1 - args.supervised_layers][batch["answer_rows"], batch["answer_cols"]]
            question_loss = F.binary_cross_entropy_with_logits(
                question_head(rms_normalised(asked.float())), batch["question_words"],
                reduction="none").sum(-1).mean()
        content_loss = torch.zeros(())
        if args.content_weight > 0:
            # The visual tokens entering the supervised layers still say what covers them
            # (the projector's code, same head): what the answer attends to is readable.
            for hidden in out.hidden_states[-1 - args.supervised_layers:-1]:
                visual = hidden[:, 2:len(PREFIX)].float()
                visual = rms_normalised(visual)
                labels = batch["patch_labels"].masked_fill(~batch["kept"], -100)  # dropped: no target
                content_loss = content_loss + F.cross_entropy(
                    token_head(visual).flatten(0, 1), labels.flatten(),
                    weight=class_weights) / args.supervised_layers
        loss = (answer_loss + args.aux_weight * (patch_loss + cell_loss + token_loss)
                + args.attention_weight * attention_loss + args.content_weight * content_loss
                + args.question_weight * question_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        record = {"step": step, "loss": round(loss.item(), 4), "answer": round(answer_loss.item(), 4),
                  "patch": round(patch_loss.item(), 4), "cell": round(cell_loss.item(), 4),
                  "token": round(token_loss.item(), 4), "attention": round(attention_loss.item(), 4),
                  "content": round(content_loss.item(), 4), "question": round(question_loss.item(), 4),
                  "lr": round(lr, 6), "time": round(time.time() - deadline + args.minutes * 60, 1)}
        if step % args.eval_every == 0:
            model.eval()
            with torch.no_grad():
                validation = range(VALIDATION_SEEDS.start, VALIDATION_SEEDS.start + args.eval_images)
                result = packed_accuracy(model, list(validation))
            model.train()
            record["eval"] = result
            overall = result["overall"]
            if overall > best:
                best = overall
                model.save_pretrained(args.out)
                processor.save_pretrained(args.out)
                save_file(heads.state_dict(), args.out / HEADS)
                (args.out / "accuracy.json").write_text(json.dumps(dict(result, step=step), indent=2))
            met = overall >= 0.85 and all(result[t] >= 0.70 for t in QUESTION_TYPES)
            good_in_a_row = good_in_a_row + 1 if met else 0
        with log.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        if good_in_a_row >= 2:
            break


if __name__ == "__main__":
    main()
