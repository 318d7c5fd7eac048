"""fico-toy's weights from scratch, in one command: the three training phases end to end.

    python -m fico.toy.build --out DIR [--threads 2]

1. ``fico.toy.pretrain_vision``: the vision tower and projector on what covers each patch
   (1100 steps);
2. ``fico.toy.train``: a fresh language model on the questions, CLIP frozen but its top 8
   layers (3000 steps at most; it stops once the target holds on two checks in a row);
3. ``fico.toy.train_clip``: CLIP's own objective for [CLS] and the text tower CDPruner reads,
   the patch states distilled from phase 2's (400 steps).

Every phase is bounded by steps, not minutes, and seeded, so the result does not depend on
the machine's speed. Phases 1 and 2 write to ``DIR/phase1`` and ``DIR/phase2``; the final
model, its CLIP checkpoint (``DIR/clip``) and every phase's log go to ``DIR``, with
``build.json`` (each phase's arguments and wall time). A run that stops (a closed session)
resumes at the first unfinished phase when started again with the same ``--out``: a phase
counts as finished once ``build.json`` records it with the same arguments; an unfinished one
starts over from its seed, so the result is the same as an uninterrupted run. Then state the
accuracy with
``python -m fico.toy.evaluate --weights DIR --images 200 --first-image 60 --write``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

PHASES = {
    "phase1": ["--steps", "1100", "--minutes", "100000"],
    "phase2": ["--reset-language-model", "--freeze-vision", "--train-vision-layers", "8", "--steps", "3000",
               "--minutes", "100000", "--eval-every", "200", "--eval-images", "60"],
    "phase3": ["--steps", "400", "--minutes", "100000"],
}


def main(argv=None) -> None:
    import torch

    from . import pretrain_vision, train, train_clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(args.threads)]
    runs = [("phase1", pretrain_vision.main, PHASES["phase1"] + ["--out", str(args.out / "phase1")] + threads),
            ("phase2", train.main, PHASES["phase2"] + ["--resume", str(args.out / "phase1"),
                                                       "--out", str(args.out / "phase2")] + threads),
            ("phase3", train_clip.main, PHASES["phase3"] + ["--resume", str(args.out / "phase2"),
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
    for log in ("phase1/vision_log.jsonl", "phase2/training_log.jsonl"):
        shutil.copyfile(args.out / log, args.out / Path(log).name)
    record["minutes"] = round(sum(p["minutes"] for p in record["phases"]), 1)
    written.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
