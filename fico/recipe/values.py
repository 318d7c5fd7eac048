"""Reading and writing recipe values: the YAML dialect of recipes and ``key=value`` overrides.

Recipes and overrides are YAML, with one change: numbers follow YAML 1.2, so ``11:23`` is
the layer range it looks like, not YAML 1.1's base-60 integer 683. Every value fico prints
(``fico list``, ``fico explain``) is written by :func:`format_override`, so it can be
pasted back as an override:

>>> format_override("layers", "11:23"), parse_value("11:23")
('layers=11:23', '11:23')
>>> format_override("layers", [6, 12, 18]), parse_value("[6,12,18]")
('layers=[6,12,18]', [6, 12, 18])
>>> split_overrides("k=2;ratio=0.5 steps.0.filter={name: attention_rank}")
['k=2', 'ratio=0.5', 'steps.0.filter={name: attention_rank}']
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import yaml

INT_TAG, FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"

#: ``START:STOP``, ``START:`` or ``:STOP`` (spaces allowed): a layer range, however typed.
LAYER_RANGE = re.compile(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*")


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 numbers (no base-60) and no duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (INT_TAG, FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    INT_TAG, re.compile(r"^(?:[-+]?0b[01_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
RecipeLoader.add_implicit_resolver(
    FLOAT_TAG, re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
                          r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
                          r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse recipe YAML (raises ``yaml.YAMLError`` with a position on bad syntax)."""
    return yaml.load(text, Loader=RecipeLoader)


def parse_value(text: str) -> Any:
    """An override's value: YAML as in recipe files; a layer range stays a string."""
    if not text.strip():
        return None
    if LAYER_RANGE.fullmatch(text) and ":" in text and text.strip() != ":":
        return text.strip()
    return load_yaml(text)


def split_overrides(text: str) -> list[str]:
    """One string of overrides, separated by spaces or ``;``, as a list.

    Separators inside brackets, braces or quotes do not split, so mappings and lists may
    contain spaces: ``"steps.0.filter={name: x, signal: y};k=3"`` is two overrides.
    """
    items, current, depth, quote = [], "", 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif depth == 0 and (char == ";" or char.isspace()):
            if current:
                items.append(current)
            current = ""
            continue
        current += char
    if current:
        items.append(current)
    return items


_PLAIN = re.compile(r"[A-Za-z_][\w.\-/]*")
_SHARE = re.compile(r"\d+(\.\d+)?%")  # a share of the tokens, 'keep: 33.3%'


def format_value(value: Any) -> str:
    """``value`` as override text that :func:`parse_value` reads back to ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if LAYER_RANGE.fullmatch(text) and ":" in text:
        return text.replace(" ", "")
    if (_PLAIN.fullmatch(text) or _SHARE.fullmatch(text)) and parse_value(text) == text:
        return text
    return "'" + text.replace("'", "''") + "'"


def format_override(key: str, value: Any) -> str:
    """``key=value`` as one shell word that round-trips through ``load_recipe``."""
    word = f"{key}={format_value(value)}"
    return word if re.fullmatch(r"[\w.\-/=:\[\],+%]*", word) else shlex.quote(word)


def flatten_knobs(knobs: dict, prefix: str = "") -> dict[str, Any]:
    """Nested knobs (FiCoCo-VL's ``v``, ``l``) as dotted keys: ``{"v.r": 16, ...}``."""
    flat = {}
    for key, value in knobs.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_knobs(value, path + "."))
        else:
            flat[path] = value
    return flat
