"""``key=value`` overrides on a recipe's config, and the checks that a knob a file writes or an
override sets is read by some step (a typo must fail, not change nothing)."""

from __future__ import annotations

import contextlib
import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ..errors import RecipeError
from .schema import RESERVED
from .values import flatten_knobs, parse_value, split_overrides


def override_list(overrides: Any) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return split_overrides(overrides)
    if isinstance(overrides, (list, tuple)) and all(isinstance(o, str) for o in overrides):
        return list(overrides)
    raise RecipeError(f"overrides: expected a list of 'key=value' strings (or one string of them separated by "
                      f"spaces or ';'), got {overrides!r}")


def take_plugin_overrides(overrides: list[str], source: str) -> tuple[list[str], list[Path]]:
    """``plugins=[a.py, b.py]`` overrides, as plugin files relative to the working directory."""
    rest, files = [], []
    for item in overrides:
        key, sep, text = item.partition("=")
        if key.strip() != "plugins" or not sep:
            rest.append(item)
            continue
        value = parse_override_value(key.strip(), text, source)
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{source}: override 'plugins': expected a list of plugin file paths, got {text!r}")
        files += [Path(v) for v in value]
    return rest, files


def check_overrides_agree(overrides: list[str], source: str) -> None:
    """The same key overridden twice with different values is ambiguous: which one was meant?"""
    seen: dict[str, str] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("+")
        if not sep:
            continue
        if key in seen and parse_value_or_text(seen[key]) != parse_value_or_text(text):
            raise RecipeError(f"{source}: override {key!r} is given twice, as {key}={seen[key].strip()} and "
                              f"{key}={text.strip()}; give it once")
        seen[key] = text


def parse_value_or_text(text: str) -> Any:
    try:
        return parse_value(text)
    except yaml.YAMLError:
        return text.strip()


def parse_override_value(key: str, text: str, source: str) -> Any:
    try:
        return parse_value(text)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{source}: override {key!r}: cannot parse value {text!r}: {problem}") from error


def apply_overrides(config: DictConfig, overrides: list[str], source: str) -> DictConfig:
    # Knobs are a closed set (a typo must not silently add a key); inside steps new keys are
    # allowed, because component parameters are checked against the component itself.
    OmegaConf.set_struct(config, True)
    if isinstance(config.get("steps"), ListConfig):
        OmegaConf.set_struct(config.steps, False)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"{source}: override {item!r} is not of the form key=value")
        value = parse_override_value(key, text, source)
        top = key.split(".")[0].lstrip("+")
        if top not in RESERVED and OmegaConf.select(config, key.lstrip("+"), default=MISSING) is MISSING:
            knobs = knob_paths(config)
            close = difflib.get_close_matches(key, knobs, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"{source}: override {key!r}: the recipe has no knob {key!r}; its knobs: "
                              f"{', '.join(knobs) or 'none'}{hint}")
        try:
            # A mapping value replaces the node (a stage swap must not keep the old parameters), and
            # so does any value given for a mapping (a layer list for layers by depth); reserved
            # keys (budget_tflops, ...) may be added by an override.
            replaces = isinstance(value, dict) or isinstance(OmegaConf.select(config, key.lstrip("+"), default=None),
                                                             DictConfig)
            with open_dict(config) if top in RESERVED else contextlib.nullcontext():
                OmegaConf.update(config, key, value, merge=not replaces)
        except IndexError as error:
            count = len(config.steps) if isinstance(config.get("steps"), ListConfig) else 0
            raise RecipeError(f"{source}: override {key!r}: the recipe has {count} step(s), "
                              f"steps.0 to steps.{count - 1}") from error
        except (OmegaConfBaseException, TypeError, ValueError) as error:
            reason = str(error).splitlines()[0]
            raise RecipeError(f"{source}: override {key!r}: {reason}") from error
    return config


def blame_override(error: RecipeError, overrides: list[str], source: str) -> RecipeError:
    """An invalid value that came from an overridden knob names the override first
    (``override 'k': steps[0].layers: ... got ['two'] (from ${k})``), not only the step."""
    message = str(error)
    overridden = [item.partition("=")[0].strip().lstrip("+") for item in overrides]
    for knob in overridden:
        if "${" + knob + "}" in message and not message.startswith(f"{source}: override"):
            rest = message[len(source) + 2:] if message.startswith(f"{source}: ") else message
            return RecipeError(f"{source}: override {knob!r}: {rest}")
    return error


def knob_paths(config: DictConfig | dict) -> list[str]:
    """The recipe's knobs as dotted paths (nested knobs such as FiCoCo-VL's ``v.r`` included)."""
    data = OmegaConf.to_container(config, resolve=False) if isinstance(config, DictConfig) else config
    return list(flatten_knobs({k: v for k, v in data.items() if k not in RESERVED}))


def check_every_knob_is_read(config: DictConfig, written: list[str], source: str) -> None:
    """A key that the file ``source`` writes (``written``, top level) is a knob only if a step
    of the recipe it makes reads it, directly or through another knob: a typo such as
    ``ratioo: 0.3`` would otherwise load and change nothing."""
    raw = OmegaConf.to_container(config, resolve=False)
    used = used_knobs(raw)
    for knob in knob_paths(config):
        if knob.split(".")[0] not in written:
            continue
        if any(u == knob or u.startswith(knob + ".") or knob.startswith(u + ".") for u in used):
            continue
        read = sorted(k for k in knob_paths(config) if any(u == k or k.startswith(u + ".") for u in used))
        close = difflib.get_close_matches(knob, read, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{source}: {knob}: no step reads this key, so it would change nothing{hint} (a new knob "
                          f"needs a step value that reads it, such as '${{{knob}}}'; the recipe's knobs: "
                          f"{', '.join(read) or 'none'})")


def check_overridden_knobs_are_used(original: DictConfig, config: DictConfig, overrides: list[str],
                                     source: str) -> None:
    """An override that changes a knob nothing reads any more is a mistake, not a no-op."""
    raw = OmegaConf.to_container(config, resolve=False)
    used = used_knobs(raw)
    before = OmegaConf.to_container(original, resolve=False)
    for item in overrides:
        key = item.partition("=")[0].strip().lstrip("+")
        if key.split(".")[0] in RESERVED:
            continue
        if any(u == key or u.startswith(key + ".") or key.startswith(u + ".") for u in used):
            continue
        if select(before, key) == select(raw, key):
            continue  # setting a knob to the value it has changes nothing either way
        readers = [r for r in _readers(before, key) if select(raw, r.replace("[", ".").replace("]", ""))
                   != select(before, r.replace("[", ".").replace("]", ""))]
        why = (f"what read it ({', '.join(readers)}) is overridden with an explicit value" if readers
               else "no step reads it")
        raise RecipeError(f"{source}: override {key!r}: the recipe no longer uses knob {key!r}: {why}; "
                          f"drop the override or set the value that reads it")


MISSING = object()


_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def references(node: Any) -> set[str]:
    """Keys that ``${...}`` interpolations anywhere in ``node`` read."""
    if isinstance(node, str):
        return set(_REFERENCE.findall(node))
    if isinstance(node, dict):
        return set().union(*(references(v) for v in node.values())) if node else set()
    if isinstance(node, (list, tuple)):
        return set().union(*(references(v) for v in node)) if node else set()
    return set()


def select(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict) and part in data:
            data = data[part]
        else:
            return None
    return data


def raw_node(config: DictConfig, key: str) -> Any:
    node = config.get(key)
    return OmegaConf.to_container(node, resolve=False) if isinstance(node, (DictConfig, ListConfig)) else node


def used_knobs(raw: dict) -> set[str]:
    """Knob paths the steps read, directly or through other knobs (and the budget's solved knob)."""
    frontier = set().union(*(references(v) for k, v in raw.items() if k in RESERVED))
    budget = raw.get("budget_tflops")
    if isinstance(budget, dict) and isinstance(budget.get("solve"), str):
        frontier.add(budget["solve"])
    used: set[str] = set()
    while frontier:
        key = frontier.pop()
        if key not in used:
            used.add(key)
            frontier |= references(select(raw, key))
    return used


def _readers(raw: dict, knob: str, prefix: str = "") -> list[str]:
    """Paths in ``raw`` whose value interpolates ``knob``."""
    found = []
    items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
    for key, value in items:
        path = f"{prefix}{key}" if not isinstance(raw, list) else f"{prefix.rstrip('.')}[{key}]"
        if isinstance(value, str) and knob in _REFERENCE.findall(value):
            found.append(path)
        elif isinstance(value, (dict, list)):
            found += _readers(value, knob, f"{path}.")
    return found
