"""Models by name, and dtypes by name: one spelling set for every command.

``--model`` takes a built-in name or a local checkpoint directory; fico never contacts a
model hub, so anything else is a :class:`fico.ModelNotFoundError` that lists the names.

>>> parse_dtype("fp16"), parse_dtype("bfloat16"), parse_dtype("half")
('float16', 'bfloat16', 'float16')
>>> model_source("embedded")
'embedded'
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from .errors import ModelNotFoundError

#: Built-in models that run (weights or a seeded init ship with fico).
RUNNABLE = {
    "toy": "fico-toy, the trained LLaVA-architecture model (synthetic VQA)",
    "embedded": "a random tiny LLaVA-1.5-shaped model, built offline",
    "embedded-next": "a random tiny LLaVA-NeXT-shaped model (anyres crops of 336 px), built offline",
    "embedded-qwen2-vl": "a random tiny Qwen2-VL (native resolution, M-RoPE), built offline",
    "embedded-qwen2.5-vl": "a random tiny Qwen2.5-VL (windowed tower), built offline",
    "embedded-qwen3-vl": "a random tiny Qwen3-VL (DeepStack), built offline",
}

#: Bytes per element of each dtype name (int8/int4 are weight/KV precisions for the cost model only).
DTYPE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "float64": 8.0, "int8": 1.0, "int4": 0.5}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "fp16": "float16", "f16": "float16",
                 "half": "float16", "bf16": "bfloat16", "fp64": "float64", "f64": "float64", "double": "float64"}
TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64")


def parse_dtype(text: str, quantized: bool = False) -> str:
    """The canonical dtype name for ``text`` (``fp16`` -> ``float16``); ``quantized`` allows int8/int4.

    Raises ValueError (argparse shows it as a usage error) listing the names.
    """
    name = DTYPE_ALIASES.get(str(text).lower(), str(text).lower())
    allowed = [n for n in DTYPE_BYTES if quantized or n in TORCH_DTYPES]
    if name not in allowed:
        aliases = ", ".join(f"{a}={c}" for a, c in DTYPE_ALIASES.items() if c in allowed)
        raise ValueError(f"unknown dtype {text!r}; use one of {', '.join(allowed)} (aliases: {aliases})")
    return name


def torch_dtype(name: str):
    import torch

    return getattr(torch, parse_dtype(name))


def dtype_argument(quantized: bool = False):
    """An argparse ``type=`` for ``--dtype``: the canonical name, or a usage error."""
    import argparse

    def convert(text: str) -> str:
        try:
            return parse_dtype(text, quantized)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def model_source(which: str, names: dict[str, str] | None = None, label: str = "--model") -> str:
    """``which`` if it is a built-in name or a checkpoint directory; else ModelNotFoundError.

    Args:
        names: the built-in names this command takes (default :data:`RUNNABLE`).
        label: how messages name the setting (``--model``, ``budget.model``).
    """
    names = RUNNABLE if names is None else names
    which = str(which)
    if which in names:
        return which
    path = Path(which).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ModelNotFoundError(f"{label} {which}: the directory has no config.json, so it is not a "
                                     f"checkpoint directory (save one with model.save_pretrained(DIR))")
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(f"{label} {which}: cannot read config.json: {error}") from error
        classes = checkpoint_classes()
        if model_type not in classes:
            raise ModelNotFoundError(f"{label} {which}: a {model_type!r} checkpoint; fico has adapters for "
                                     f"{', '.join(sorted(classes))}")
        return str(path)
    close = difflib.get_close_matches(which, list(names), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    kind = "directory" if ("/" in which or which.startswith(".")) else "built-in model or directory"
    listed = ", ".join(f"{n} ({d})" for n, d in names.items())
    raise ModelNotFoundError(f"{label} {which}: no such {kind} (fico never downloads models); built-in: "
                             f"{listed}; or a local checkpoint directory{hint}")


def load_model(which: str, dtype: str = "float32", attn: str = "sdpa"):
    """The model and processor for ``which``: a built-in name (:data:`RUNNABLE`) or a local checkpoint
    directory.

    Checkpoints are read with ``local_files_only`` and their tokenizer set to pad on the left
    (batched prompts then end in a real token).
    """
    from . import embedded

    source = model_source(which)
    torch_type = torch_dtype(dtype)
    if source == "toy":
        from .toy.model import load

        return load(dtype=torch_type, attn_implementation=attn)
    if source == "embedded":
        return embedded.build_model(dtype=torch_type, attn_implementation=attn), embedded.build_processor()
    if source == "embedded-next":
        from . import embedded_next

        return (embedded_next.build_model(dtype=torch_type, attn_implementation=attn),
                embedded_next.build_processor())
    if source.startswith("embedded-qwen"):
        from . import embedded_qwen

        family = source.removeprefix("embedded-")
        return (embedded_qwen.build_model(family, dtype=torch_type, attn_implementation=attn),
                embedded_qwen.build_processor(family))
    import transformers
    from transformers import AutoProcessor

    model_class = getattr(transformers, checkpoint_class(source))
    model = model_class.from_pretrained(source, dtype=torch_type, attn_implementation=attn,
                                        local_files_only=True).eval()
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    except Exception:
        # transformers cannot build some stock processors on every machine (Qwen-VL's needs
        # torchvision for its video processor): the family may assemble one for images
        from .adapters import family_of

        processor = family_of(model).offline_processor(source)
        if processor is None:
            raise
    processor.tokenizer.padding_side = "left"
    return model, processor


def image_size_of(inputs: dict, config) -> list[int] | None:
    """The first image's (height, width) as a model's token count reads it, from processor
    outputs: LLaVA-NeXT's ``image_sizes``; a Qwen-VL image's size after its processor's resize
    (its patch grid, ``image_grid_thw``). None where the count does not depend on it."""
    if inputs.get("image_sizes") is not None:
        return [int(v) for v in inputs["image_sizes"][0]]
    if inputs.get("image_grid_thw") is not None:
        patch = config.vision_config.patch_size
        _, h, w = (int(v) for v in inputs["image_grid_thw"][0])
        return [h * patch, w * patch]
    return None


def checkpoint_class(directory: str | Path) -> str:
    """The transformers class name that loads the checkpoint in ``directory``, a directory
    :func:`model_source` returned (it has checked that the config reads and has an adapter)."""
    return checkpoint_classes()[json.loads((Path(directory) / "config.json").read_text())["model_type"]]


def checkpoint_classes() -> dict[str, str]:
    """Checkpoint ``model_type`` -> the transformers class that loads it, from every model family."""
    from .adapters.family import default_families

    return default_families().checkpoint_classes()


def load_config(which: str):
    """The config of ``which`` (``toy``, ``embedded`` or a local checkpoint directory), without
    loading any weight: what a recipe is checked against before a command loads the model."""
    source = model_source(which)
    if source == "toy":
        from .toy.model import WEIGHTS

        source = str(WEIGHTS)
    elif source == "embedded":
        from .embedded import build_config

        return build_config()
    elif source == "embedded-next":
        from .embedded_next import build_config

        return build_config()
    elif source.startswith("embedded-qwen"):
        from . import embedded_qwen

        return embedded_qwen.build_config(source.removeprefix("embedded-"))
    import transformers

    config_class = getattr(transformers, checkpoint_class(source)).config_class
    config = config_class.from_pretrained(source, local_files_only=True)
    # where it was read from, as a model's from_pretrained records it (files shipped beside it,
    # such as a companion CLIP, are found from there)
    config._name_or_path = str(source)
    return config


def check_recipes(recipes, which: str) -> None:
    """Check each recipe against the config of the model ``which`` before its weights load:
    a recipe that cannot run there fails in a second, not after minutes of loading."""
    from .adapters import check_recipe

    config = load_config(which)
    for recipe in recipes:
        if recipe is not None:
            check_recipe(recipe, config)


def describe_checkpoint(which: str) -> dict:
    """What identifies a model for reproducibility: its name, or a checkpoint's config and files."""
    source = model_source(which)
    if source in RUNNABLE and source != "toy":
        return {"model": source}
    if source == "toy":
        from .toy.model import WEIGHTS

        path = WEIGHTS
    else:
        path = Path(source)
    files = sorted(p for p in path.iterdir() if p.is_file())
    import hashlib

    config = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
    return {"model": which if source in RUNNABLE else str(path.resolve()), "config_sha256": config,
            "files": {p.name: p.stat().st_size for p in files if p.suffix in (".safetensors", ".bin", ".json")}}
