"""fico-toy's weights from scratch, in one command: the training phases end to end.

    python -m fico.toy.build --out DIR [--threads 2]

1. ``fico.toy.pretrain_vision``: the vision tower and projector on what covers each patch
   (1100 steps);
2. ``fico.toy.train``: a fresh language model on the questions, CLIP frozen but its top 8
   layers (3000 steps at most; it stops once the target holds on two checks in a row);
2b. ``fico.toy.train --renumber-share 0.5``: 600 more steps in which half of the images lose
   part of their background tokens and the rest are renumbered, as pruning before the LLM
   leaves them, so that the model finds a cell by what its tokens say, not by their RoPE
   positions (taught after phase 2: a fresh model learns the questions on intact positions);
3. ``fico.toy.train_clip``: CLIP's own objective for [CLS] and the text tower CDPruner reads,
   the patch states distilled from phase 2b's (400 steps).

Every phase is bounded by steps, not minutes, and seeded, so the result does not depend on
the machine's speed. Phases 1, 2 and 2b write to ``DIR/phase1``, ``DIR/phase2`` and
``DIR/phase2b``; the final
model, its CLIP checkpoint (``DIR/clip``) and every phase's log go to ``DIR``, with
``build.json`` (each phase's arguments and wall time). A run that stops (a closed session)
resumes at the first unfinished phase when started again with the same ``--out``: a phase
counts as finished once ``build.json`` records it with the same arguments; an unfinished one
starts over from its seed, so the result is the same as an uninterrupted run. Then ship and
state the accuracy of what ships:

    python -m fico.toy.build --ship DIR      # fp16 copies into fico/toy/weights, with the logs
    python -m fico.toy.evaluate --images 200 --first-image 60 --write

Shipping stores the weights in fp16 (half the size in git; ``fico.toy.model.load`` loads them
as fp32), so the stated accuracy is measured on the shipped copy, not on ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

#: what ``--ship`` copies beside the weights: every phase's log and the build's record
SHIPPED_LOGS = ("vision_log.jsonl", "training_log.jsonl", "renumber_log.jsonl", "clip_log.jsonl", "build.json")
#: each phase's log in its own folder, and the name it has beside the final model
PHASE_LOGS = {"phase1/vision_log.jsonl": "vision_log.jsonl", "phase2/training_log.jsonl": "training_log.jsonl",
              "phase2b/training_log.jsonl": "renumber_log.jsonl"}
SHIPPED_PROCESSOR = ("processor_config.json", "tokenizer.json", "tokenizer_config.json")
SHIPPED_CLIP_TOKENIZER = ("tokenizer.json", "tokenizer_config.json")

PHASES = {
    "phase1": ["--steps", "1100", "--minutes", "100000"],
    "phase2": ["--reset-language-model", "--freeze-vision", "--train-vision-layers", "8", "--steps", "3000",
               "--minutes", "100000", "--eval-every", "200", "--eval-images", "60"],
    # one check, at the end: the model of the last step, not the best unreduced one, is wanted
    "phase2b": ["--freeze-vision", "--train-vision-layers", "8", "--renumber-share", "0.5", "--lr", "3e-4",
                "--steps", "600", "--minutes", "100000", "--eval-every", "600", "--eval-images", "60"],
    "phase3": ["--steps", "400", "--minutes", "100000"],
}


def main(argv=None) -> None:
    import torch

    from . import pretrain_vision, train, train_clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ship", type=Path, metavar="DIR",
                        help="copy a finished build in DIR into fico/toy/weights (fp16) instead of building")
    args = parser.parse_args(argv)
    if args.ship is not None:
        ship(args.ship)
        return
    if args.out is None:
        parser.error("--out DIR (where to build) or --ship DIR (a finished build to ship) is required")
    args.out.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(args.threads)]
    runs = [("phase1", pretrain_vision.main, PHASES["phase1"] + ["--out", str(args.out / "phase1")] + threads),
            ("phase2", train.main, PHASES["phase2"] + ["--resume", str(args.out / "phase1"),
                                                       "--out", str(args.out / "phase2")] + threads),
            ("phase2b", train.main, PHASES["phase2b"] + ["--resume", str(args.out / "phase2"),
                                                         "--out", str(args.out / "phase2b")] + threads),
            ("phase3", train_clip.main, PHASES["phase3"] + ["--resume", str(args.out / "phase2b"),
                                                            "--out", str(args.out)] + threads)]
    machine = f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    record = {"machine": machine, "phases": []}
    written = args.out / "build.json"
    finished = json.loads(written.read_text())["phases"] if written.is_file() else []
    for index, (name, run, arguments) in enumerate(runs):
        # each phase seeds itself from its arguments, so an earlier run's finished phases stand in
        # for running them again, up to the first one it did not finish
        done = finished[index] if index < len(finished) and len(record["phases"]) == index else None
        if done is not None and done["phase"] == name and done["arguments"] == arguments:
            print(f"fico.toy.build: {name} finished in an earlier run ({done['minutes']} minutes), kept")
            record["phases"].append(done)
            continue
        finished = []  # a phase that runs again invalidates what an earlier run built after it
        start = time.time()
        run(arguments)
        record["phases"].append({"phase": name, "arguments": arguments, "machine": machine,
                                 "minutes": round((time.time() - start) / 60, 1)})
        written.write_text(json.dumps(record, indent=2) + "\n")
    for log, name in PHASE_LOGS.items():
        shutil.copyfile(args.out / log, args.out / name)
    record["minutes"] = round(sum(p["minutes"] for p in record["phases"]), 1)
    written.write_text(json.dumps(record, indent=2) + "\n")


def shipped_verbatim() -> list[str]:
    """What ``--ship`` copies byte for byte (relative paths): logs, processor and CLIP tokenizer."""
    from .train_clip import CLIP_DIR

    return [*SHIPPED_LOGS, *SHIPPED_PROCESSOR, *(f"{CLIP_DIR}/{name}" for name in SHIPPED_CLIP_TOKENIZER)]


def ship(build: Path, weights: Path | None = None) -> None:
    """Copy a finished build into ``weights`` (default: ``fico/toy/weights``): the LLaVA model
    and its CLIP checkpoint in fp16, processor, tokenizer and the logs. Refuses an unfinished
    build, and writes nothing until everything it needs has loaded."""
    import torch
    from transformers import CLIPModel, LlavaForConditionalGeneration

    from .model import WEIGHTS
    from .train_clip import CLIP_DIR

    weights = Path(weights or WEIGHTS)
    record = build / "build.json"
    if not record.is_file() or "minutes" not in json.loads(record.read_text()):
        raise SystemExit(f"fico.toy.build --ship: {build} is not a finished build (no complete build.json); "
                         f"finish it with `python -m fico.toy.build --out {build}`")
    copied = shipped_verbatim()
    missing = [name for name in copied if not (build / name).is_file()]
    if missing:
        raise SystemExit(f"fico.toy.build --ship: {build} lacks {', '.join(missing)}")
    model = LlavaForConditionalGeneration.from_pretrained(build, dtype=torch.float16, local_files_only=True)
    clip = CLIPModel.from_pretrained(build / CLIP_DIR, dtype=torch.float16, local_files_only=True)
    stale = weights / "accuracy.json"  # states the previous weights' accuracy, not these
    if stale.is_file():
        stale.unlink()
    model.save_pretrained(weights)
    clip.save_pretrained(weights / CLIP_DIR)
    # verbatim: a tokenizer loaded and saved again gains loading options in its config
    for name in copied:
        shutil.copyfile(build / name, weights / name)
    print(f"fico.toy.build: shipped {build} to {weights}; state its accuracy with "
          "`python -m fico.toy.evaluate --images 200 --first-image 60 --write`")


if __name__ == "__main__":
    main()
