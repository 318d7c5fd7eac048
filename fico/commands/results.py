"""Resumable results files: one JSON line per finished cell, with the conditions it was measured under.

``fico ablate`` and ``fico eval`` append each finished cell (an ablation cell; a
configuration on a task) to a JSON-lines file together with everything besides the recipe
that changes its numbers (model and its files, dtype, threads, versions, what the command
measured on) and the hash of the recipe it ran. A rerun skips a cell only when both match,
and refuses a file written under other conditions instead of mixing their numbers.

>>> conditions_key({"model": "toy", "dtype": "float32"}) == conditions_key({"dtype": "float32", "model": "toy"})
True
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import OmegaConf

from ..errors import ResultsFileError


def recipe_digest(recipe) -> str:
    """What a cell ran, as a hash: the resolved recipe and the plugin files it loaded."""
    text = OmegaConf.to_yaml(recipe.config)
    for path in recipe.plugin_files:
        text += f"\n# {path.name}\n" + Path(path).read_text()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def measurement_conditions(model: str, dtype: str, threads: int, **measured_on) -> dict:
    """Everything besides the recipe that changes a cell's numbers; ``measured_on`` names what
    the command measures on (``images=50``; ``limit=None``)."""
    import torch
    import transformers

    from .. import __version__
    from ..models import describe_checkpoint

    return {"fico": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            **describe_checkpoint(model), **measured_on, "dtype": dtype, "attn": "sdpa", "threads": threads}


def conditions_key(conditions: dict) -> str:
    return hashlib.sha256(json.dumps(conditions, sort_keys=True).encode()).hexdigest()[:12]


def read_results(path: Path, conditions: dict, kind: str = "results") -> dict[tuple[str, str], dict]:
    """Cells already measured under ``conditions`` in ``path``, by (cell, recipe digest).

    Args:
        kind: what the file holds, for messages (``ablation results``, ``evaluation results``).

    Raises ResultsFileError if the file holds cells measured under other conditions: resuming
    from them would mix numbers of different models, sizes or versions.
    """
    done = {}
    if not path.exists():
        return done
    key = conditions_key(conditions)
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ResultsFileError(f"{path}:{number}: not a JSON line ({error.msg}); is it an {kind} "
                                   f"file?") from error
        if not isinstance(record, dict) or "cell" not in record:
            raise ResultsFileError(f"{path}:{number}: a JSON line without a 'cell'; is it an {kind} file?")
        if record.get("conditions_key") != key:
            theirs = record.get("conditions") or {}
            differ = [f"{k}: {conditions.get(k)!r} now, {theirs.get(k)!r} in the file"
                      for k in dict.fromkeys([*conditions, *theirs]) if conditions.get(k) != theirs.get(k)]
            raise ResultsFileError(
                f"{path}:{number}: this {kind} file holds cells measured under other conditions "
                f"({'; '.join(differ) or 'written by an older fico'}); resuming would mix them with these. "
                f"Give another --out, or leave --out out to get a file named after these conditions")
        done[(record["cell"], record.get("recipe_digest"))] = record
    return done


def append_result(path: Path, record: dict, conditions: dict) -> dict:
    """Append ``record`` (with its ``cell`` and ``recipe_digest``) to ``path`` under ``conditions``.

    The file is replaced whole (written beside it, then renamed), so a command stopped at any
    moment (Ctrl-C) leaves either the old file or the new one, never half a line.
    """
    record = {**record, "conditions_key": conditions_key(conditions), "conditions": conditions}
    before = path.read_text() if path.exists() else ""
    write_whole(path, before + json.dumps(record) + "\n")
    return record


def save_figure(figure, path: Path | str, dpi: int) -> None:
    """A matplotlib figure written whole (:func:`write_whole`), in the format its suffix names."""
    write_whole(path, write=lambda temporary: figure.savefig(temporary, dpi=dpi, format=Path(path).suffix[1:] or "png"))


def write_whole(path: Path | str, content: str | bytes | None = None, write=None) -> None:
    """Write ``path`` all at once: ``content`` (text or bytes), or whatever ``write(temporary
    path)`` writes (a plot's ``savefig``), into a file beside it that is then renamed over
    it. An interruption leaves the previous file (or none), never a partial one."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(handle)
    try:
        if write is not None:
            write(temporary)
        elif isinstance(content, bytes):
            Path(temporary).write_bytes(content)
        else:
            Path(temporary).write_text(content)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
