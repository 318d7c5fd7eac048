"""``fico fit fitprune``: FitPrune's per-layer tables fitted on a model (``fico.fitting.fitprune``).

The calibration samples are the toy's training images (one question each, the six types in
turn) on fico-toy, generated pictures on the embedded models, and otherwise a JSON-lines file
of ``{"image": PATH, "text": QUESTION}`` (``--samples FILE``; the official script used 0.01%
of LLaVA's 665k instruction mix, about 66 samples). ``--out FILE`` writes a recipe that
extends the bundled ``fitprune`` with the fitted tables, keyed by the model's depth.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError, RecipeError

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

#: the official tables' reduction ratios (percent)
OFFICIAL_RATIOS = (0, 10, 20, 30, 40, 50, 55, 60, 70, 80, 90)
#: where the toy's calibration images start: training images (the fitting never sees a test image)
TOY_CALIBRATION_SEED = 9_000_000


def calibration_samples(which: str, model, processor, samples: str) -> list[dict]:
    """Processor outputs, one sample each (see the module docstring)."""
    from ..adapters import family_of

    family = family_of(model)
    if samples.isdigit():
        count = int(samples)
        if count < 1:
            raise InputError("fico fit: --samples needs at least one sample")
        if which == "toy":
            from ..toy.data import QUESTION_TYPES, TRAIN_SEEDS, example

            assert TOY_CALIBRATION_SEED in TRAIN_SEEDS
            pairs = []
            for index in range(count):
                ex = example(TOY_CALIBRATION_SEED + index)
                pairs.append((ex.image, ex.questions[index % len(QUESTION_TYPES)].text))
        elif which.startswith("embedded"):
            from .. import embedded

            pairs = [(embedded.example_image(index), "what is the color of the circle ?") for index in range(count)]
        else:
            raise InputError(f"fico fit: {which} needs calibration samples: --samples FILE, JSON lines of "
                             "{\"image\": PATH, \"text\": QUESTION}")
    else:
        pairs = _samples_file(Path(samples))
    return [dict(processor(images=[image], text=[family.prompt(text, 1, processor)], return_tensors="pt"))
            for image, text in pairs]


def _samples_file(path: Path) -> list:
    from PIL import Image

    if not path.is_file():
        raise InputError(f"fico fit: --samples {path}: no such file (give a count or a JSON-lines file)")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image = Path(record["image"])
            text = str(record["text"])
        except (ValueError, KeyError, TypeError):
            raise InputError(f"fico fit: {path}:{number}: expected {{\"image\": PATH, \"text\": QUESTION}}") from None
        image = image if image.is_absolute() else path.parent / image
        pairs.append((Image.open(image).convert("RGB"), text))
    if not pairs:
        raise InputError(f"fico fit: {path} holds no sample")
    return pairs


def ratios(text: str) -> list[int]:
    """``70,80,90`` -> ``[70, 80, 90]`` (percent, 0 <= r < 100)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RecipeError(f"fico fit: --reduction-ratio takes percentages such as 70,80,90, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < 100]
    if not values or bad:
        raise RecipeError(f"fico fit: --reduction-ratio takes percentages in [0, 100), got {text!r}")
    return values


def fitted_recipe(fits: dict[int, "object"], which: str, layers: int) -> str:
    """A recipe (YAML) extending ``fitprune`` with the tables ``fits`` (by ratio) for ``layers`` layers."""
    import yaml

    label = Path(which).name.replace(".", "_").replace("-", "_")
    fit = next(iter(fits.values()))
    config = {
        "base": "fitprune",
        "name": f"fitprune_{label}",
        "description": (f"FitPrune with its tables fitted on {which} (fico fit fitprune: {fit.samples} calibration "
                        f"samples); the bundled tables are kept for other depths."),
        "tables": {"remove": {ratio: {layers: list(f.remove)} for ratio, f in fits.items()}},
    }
    return yaml.safe_dump(config, default_flow_style=None, sort_keys=False, width=120)


def main_fit(args, console: "Console") -> int:
    import torch

    from ..fitting.fitprune import fit_fitprune, reference_masses
    from ..models import load_model
    from .console import Table

    if args.model is None:
        from ..toy.model import WEIGHTS

        args.model = "toy" if (WEIGHTS / "config.json").is_file() else "embedded"
    targets = ratios(args.reduction_ratio)
    torch.set_num_threads(args.threads) if args.threads else None
    model, processor = load_model(args.model, "float32", "sdpa")
    samples = calibration_samples(args.model, model, processor, args.samples)
    with torch.inference_mode():
        masses = [reference_masses(model, inputs) for inputs in samples]  # shared by every ratio
    fits = {}
    for ratio in targets:
        fits[ratio] = fit_fitprune(model, samples, ratio / 100, spec=args.count_as, masses=masses,
                                   progress=(lambda text, r=ratio: console.print(f"[dim]{r}%: {text}[/]"))
                                   if args.verbose else None)
    layers = model.config.get_text_config().num_hidden_layers
    if args.json:
        print(json.dumps({str(r): f.as_dict() for r, f in fits.items()}, indent=2))
    else:
        table = Table(title=f"FitPrune tables fitted on {args.model} ({len(samples)} samples"
                            + (f", FLOPs counted as {args.count_as}" if args.count_as else "") + ")")
        for column in ("reduction_ratio", "removed per layer", "mean tokens", "output tokens", "alpha", "reached"):
            table.add_column(column)
        for ratio, fit in fits.items():
            table.add_row(str(ratio), str(fit.remove), f"{fit.mean_tokens:.1f}", str(fit.after_each_layer[-1]),
                          f"{fit.alpha:.4f}", "yes" if fit.reaches_budget else "no")
        console.print(table)
    if args.out:
        Path(args.out).write_text(fitted_recipe(fits, args.model, layers))
        message = f"wrote {args.out}: fico run {args.out} --model {args.model} reduction_ratio={targets[0]}"
        print(message, file=sys.stderr) if args.json else console.print(message)  # stdout stays JSON
    return 0
