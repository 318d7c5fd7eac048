"""Recipes: YAML files, read with OmegaConf, that compose registered components.

A recipe has method-level knobs at the top, interpolated into its steps::

    name: fastv
    k: 2            # knobs: change them with overrides such as "k=3"
    ratio: 0.5
    steps:
      - site: llm                   # "vision" (CLIP layers) or "llm" (decoder layers)
        layers: ["${k}"]            # 0-based module indices, or "all"
        remove_ratio: ${ratio}      # or remove: N, or keep_ratio: x
        filter: {name: attention_rank, signal: last_query_attention}
        correlate: {name: none}
        compress: {name: drop}

>>> import fico
>>> recipe = fico.load_recipe("fastv", overrides=["k=3"])
>>> recipe.steps[0].layers
[3]
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import keyword
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from .errors import RecipeError
from .overrides import LAYER_RANGE, format_value, load_yaml, parse_value, split_overrides
from .registry import Registry, default_registry
from .signals import INSTRUCTION_SIGNALS
from .stages import Component, Compressor, Correlator, Filter

def _recipe_dir() -> Path:
    # Installed: the top-level recipes/ folder is packaged as fico.recipes; in a checkout it sits beside fico/.
    try:
        from importlib.resources import files

        return Path(str(files("fico.recipes")))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parent.parent / "recipes"


RECIPE_DIR = _recipe_dir()
SITES = ("vision", "vision_output", "pre_llm", "llm", "llm_mid")
POINT_SITES = ("vision_output", "pre_llm")
RESERVED = {"name", "description", "cite", "plugins", "steps", "base", "budget_tflops", "tables"}
STEP_KEYS = {"site", "layers", "remove", "keep", "keep_ratio", "remove_ratio", "keep_geometric", "filter",
             "correlate", "compress", "proportional_attention", "order", "positions", "signal_layer", "cls_feature",
             "text_encoder"}
SCHEDULE_KEYS = ("remove", "keep", "keep_ratio", "remove_ratio", "keep_geometric")
#: step keys that only some sites take, with their values
SITE_OPTIONS = {
    "order": (POINT_SITES, ("original", "method")),
    "positions": (("llm", "llm_mid"), ("keep", "renumber")),
    "signal_layer": (("llm",), ("previous", "current")),
    "cls_feature": (("vision_output",), (True, False)),
    "proportional_attention": (("vision",), (True, False)),
}
STEP_DEFAULTS = {"order": "original", "positions": "keep", "signal_layer": "previous", "cls_feature": False,
                 "proportional_attention": False}
STAGE_KEYS = {"filter": "filter", "correlate": "correlator", "compress": "compressor"}


@dataclass(frozen=True)
class Schedule:
    """How many candidates one step discards, from the number ``n`` present.

    * ``remove``: a fixed count, or one count per layer of the step;
    * ``keep``: keep a fixed count (or one per layer); ``filter``: the filter's own rule
      from the token count (pooling's windows); or ``adaptive``: the filter chooses per
      image (PruMerge's outlier count);
    * ``keep_ratio``: keep ``ceil(keep_ratio * n)`` (EViT);
    * ``remove_ratio``: remove ``round(remove_ratio * n)`` (FastV; Python's round);
    * ``keep_geometric``: at the s-th layer of the step keep ``int(n0 * ratio ** (s + 1))`` of
      the ``n0`` candidates that entered its first layer (PyramidDrop's stages).
    """

    kind: str
    value: float | str | tuple[int, ...]
    #: the value as written, when it came from knobs (``${keep}``), for messages
    source: str | None = field(default=None, compare=False)

    def shown(self) -> str:
        """The value for messages, with the knobs it came from."""
        return f" (from {self.source})" if self.source else ""

    def tokens_to_remove(self, n: int, position: int = 0, first: int | None = None) -> int | None:
        """Tokens to remove from ``n`` candidates at the ``position``-th layer of the step
        (``first``: candidates at its first layer); None when the filter decides."""
        value = self.value[position] if isinstance(self.value, tuple) else self.value
        if self.kind == "remove":
            return int(value)
        if self.kind == "keep":
            if value == "filter":
                raise ValueError("keep: filter is planned by the filter (fico.plan.requested_removal)")
            return None if value == "adaptive" else n - int(value)
        if self.kind == "keep_ratio":
            return n - math.ceil(value * n)
        if self.kind == "keep_geometric":
            return n - int((n if first is None else first) * value ** (position + 1))
        return int(round(value * n))


@dataclass
class Step:
    """One reduction step of a recipe, applied at each of ``layers`` of ``site``."""

    index: int
    site: str
    layers: list[int] | str  # indices, "all", or "START:STOP" resolved against the model
    schedule: Schedule
    filter: Filter
    correlator: Correlator
    compressor: Compressor
    proportional_attention: bool = False
    #: point sites: ``original`` token order, or the order the method emits (``Split.order``)
    order: str = "original"
    #: llm sites: kept tokens ``keep`` their RoPE positions, or positions are ``renumber``-ed
    positions: str = "keep"
    #: llm site: signals from the ``previous`` layer (FastV) or this layer at its input (PyramidDrop)
    signal_layer: str = "previous"
    #: vision_output site: [CLS] reaches the projector as a feature (VisionZip)
    cls_feature: bool = False
    #: pre_llm site: a local CLIP checkpoint whose text tower gives instruction signals (CDPruner)
    text_encoder: str | None = None
    #: the recipe text ``layers`` came from, when it interpolates knobs (for messages)
    layers_source: str | None = field(default=None, compare=False)

    def required_signals(self) -> set[str]:
        return self.filter.required_signals() | self.correlator.required_signals() | self.compressor.required_signals()

    @property
    def where(self) -> str:
        return f"steps[{self.index}]"


@dataclass
class Recipe:
    """A loaded, validated recipe. ``config`` is the resolved OmegaConf tree."""

    name: str
    source: str
    config: DictConfig
    steps: list[Step]
    registry: Registry = field(repr=False)
    description: str = ""
    #: How a ``budget_tflops:`` was met (:class:`fico.budget.BudgetSolution`), or None.
    budget: Any = None
    #: What differs from the recipe the description was written for (overrides or a
    #: ``base:`` recipe's own steps), e.g. ``["steps[0].filter: centroid instead of attention_rank"]``.
    changes: list[str] = field(default_factory=list)
    #: Local plugin files the recipe's registry loaded (its ``plugins:`` and those given).
    plugin_files: list[Path] = field(default_factory=list)
    #: Auxiliary models an adapter loaded for this recipe (CDPruner's CLIP text tower), by
    #: checkpoint, device and dtype, so that applying it batch after batch loads them once.
    auxiliary: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def needs_instruction(self) -> bool:
        """Whether a step reads the instruction text (pass ``instruction=`` to the reduced model)."""
        return any(step.required_signals() & INSTRUCTION_SIGNALS for step in self.steps)

    def instruction_inputs(self, texts: str | list[str]) -> dict:
        """The keyword arguments that hand the model this recipe is applied to its instruction
        texts (one per sample): ``{"instruction": texts}`` where a step reads them, else none
        (a model without such a recipe takes no ``instruction`` argument)."""
        return {"instruction": texts} if self.needs_instruction else {}

    @property
    def knobs(self) -> dict[str, Any]:
        return {k: OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v
                for k, v in self.config.items() if k not in RESERVED}

    def error(self, key: str, message: str) -> RecipeError:
        return RecipeError(f"{self.source}: {key}: {message}")


@dataclass
class _Described:
    """The recipe whose ``description`` a config carries, and its steps as written there."""

    name: str
    steps: Any


def _if(condition: Any, then: Any, otherwise: Any) -> Any:
    if not isinstance(condition, bool):
        raise RecipeError(f"fico.if: the condition must be true or false, got {condition!r}")
    return then if condition else otherwise


def _sum(*values: Any) -> int | float:
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise RecipeError(f"fico.sum: adds numbers, got {list(values)!r}")
    return sum(values)


def _pick(table: Any, *keys: Any) -> Any:
    node = table
    for key in keys:
        options = {str(k): k for k in node} if isinstance(node, (dict, DictConfig)) else {}
        if str(key) not in options:
            raise RecipeError(f"fico.pick: {key!r} is not one of {', '.join(options)}")
        node = node[options[str(key)]]
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def _next_layers(layers: Any) -> list[int]:
    layers = OmegaConf.to_container(layers) if isinstance(layers, ListConfig) else layers
    if not isinstance(layers, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
        raise RecipeError(f"fico.next_layers: takes a list of layer indices, got {layers!r}")
    return [v + 1 for v in layers]


# ${fico.if:COND,A,B} lets a boolean knob pick between components (e.g. EViT's fuse);
# ${fico.sum:A,B,...} adds knobs (VisionZip keeps dominant - 1 + contextual patches);
# ${fico.pick:${tables.X},KEY,...} reads a method's table by knobs (SparseVLM's schedules);
# ${fico.next_layers:${layers}}: the input of the layer after each (pruning "after layer l").
for _name, _resolver in (("fico.if", _if), ("fico.sum", _sum), ("fico.pick", _pick),
                         ("fico.next_layers", _next_layers)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_resolver(_name, _resolver)


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped in ``recipes/`` (budget variants as ``budgets/NAME``)."""
    return sorted(p.relative_to(RECIPE_DIR).with_suffix("").as_posix() for p in RECIPE_DIR.rglob("*.yaml"))


def load_recipe(recipe: str | Path, overrides: list[str] | str | None = None, registry: Registry | None = None,
                plugins: list[str | Path] | None = None, budget_for: tuple[Any, int] | None = None) -> Recipe:
    """Load a bundled recipe by name, or a YAML file by path, and validate it.

    Args:
        recipe: a bundled name (``"tome"``, ``"evit"``, ``"fastv"``, ...) or a path.
        overrides: ``key=value`` strings in OmegaConf's dotlist syntax, e.g. ``["r=8"]``,
            ``["layers=[0,1]"]``, ``["steps.0.filter.name=attention_rank"]``; or one string
            of them separated by spaces or ``;`` (``"k=3;ratio=0.25"``). ``plugins=[FILE]``
            is the same as ``plugins``.
        registry: components to resolve names against (default: built-ins + entry points).
        plugins: local plugin files (paths relative to the working directory) whose
            components the recipe and the overrides may name, besides the recipe's own
            ``plugins:`` (relative to the recipe file).
        budget_for: ``(model, text_tokens)`` of the model that will run. A ``budget_tflops:`` naming
            another model is then solved on this one for the same fraction of its unreduced
            cost (``recipe.budget`` says so, or that the fraction is out of reach there).

    Raises:
        RecipeError: naming the source and key, for any invalid content.

    >>> load_recipe("fastv", "k=3;ratio=0.25").knobs
    {'k': 3, 'ratio': 0.25}
    """
    overrides = override_list(overrides)
    path = _resolve_path(recipe)
    source = str(path)
    config, described = _read_config(path, source, seen=())
    original = copy.deepcopy(config)
    overrides, extra_plugins = _take_plugin_overrides(overrides, source)
    _check_overrides_agree(overrides, source)
    extra_plugins += [Path(p) for p in plugins or ()]
    config = _apply_overrides(config, overrides, source)
    _check_overridden_knobs_are_used(original, config, overrides, source)
    solution = None
    if isinstance(config.get("budget"), DictConfig) and "budget_tflops" not in config:
        raise RecipeError(f"{source}: budget: a FLOPs budget is now written 'budget_tflops:' (same keys: tflops, "
                          f"model, text_tokens, convention, solve); 'budget' is a knob name of some methods")
    if config.get("budget_tflops") is not None:
        from .budget import solve_budget

        config, solution = solve_budget(config, source, overrides,
                                        lambda candidate: _build(candidate, path, source, registry, extra_plugins),
                                        target=budget_for)
    try:
        built = _build(config, path, source, registry, extra_plugins)
    except RecipeError as error:
        raise _blame_override(error, overrides, source) from error
    built.budget = solution
    built.changes = _changes(described, config, source)
    if built.changes:
        built.description = _describe_modified(described.name, built)
    return built


def _check_every_knob_is_read(config: DictConfig, written: list[str], source: str) -> None:
    """A key that the file ``source`` writes (``written``, top level) is a knob only if a step
    of the recipe it makes reads it, directly or through another knob: a typo such as
    ``ratioo: 0.3`` would otherwise load and change nothing."""
    raw = OmegaConf.to_container(config, resolve=False)
    used = _used_knobs(raw)
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


def _check_overrides_agree(overrides: list[str], source: str) -> None:
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


def _blame_override(error: RecipeError, overrides: list[str], source: str) -> RecipeError:
    """An invalid value that came from an overridden knob names the override first
    (``override 'k': steps[0].layers: ... got ['two'] (from ${k})``), not only the step."""
    message = str(error)
    overridden = [item.partition("=")[0].strip().lstrip("+") for item in overrides]
    for knob in overridden:
        if "${" + knob + "}" in message and not message.startswith(f"{source}: override"):
            rest = message[len(source) + 2:] if message.startswith(f"{source}: ") else message
            return RecipeError(f"{source}: override {knob!r}: {rest}")
    return error


def override_list(overrides: Any) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return split_overrides(overrides)
    if isinstance(overrides, (list, tuple)) and all(isinstance(o, str) for o in overrides):
        return list(overrides)
    raise RecipeError(f"overrides: expected a list of 'key=value' strings (or one string of them separated by "
                      f"spaces or ';'), got {overrides!r}")


def _take_plugin_overrides(overrides: list[str], source: str) -> tuple[list[str], list[Path]]:
    """``plugins=[a.py, b.py]`` overrides, as plugin files relative to the working directory."""
    rest, files = [], []
    for item in overrides:
        key, sep, text = item.partition("=")
        if key.strip() != "plugins" or not sep:
            rest.append(item)
            continue
        value = _parse_override_value(key.strip(), text, source)
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{source}: override 'plugins': expected a list of plugin file paths, got {text!r}")
        files += [Path(v) for v in value]
    return rest, files


def _read_config(path: Path, source: str, seen: tuple) -> tuple[DictConfig, _Described]:
    """The YAML at ``path``, on top of its ``base:`` recipe (a bundled name or a relative path).
    Every knob a file writes must be read by the recipe it makes."""
    try:
        data = load_yaml(path.read_text())
    except OSError as error:
        raise RecipeError(f"{source}: cannot read recipe: {error}") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(part) for part in (getattr(error, "context", None), getattr(error, "problem", None))
                           if part) or str(error).splitlines()[0]
        raise RecipeError(f"{source}{where}: YAML syntax error: {problem}") from error
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of keys, got {type(data).__name__}")
    try:
        config = OmegaConf.create(data)
    except OmegaConfBaseException as error:
        raise RecipeError(f"{source}: cannot read recipe: {str(error).splitlines()[0]}") from error
    base = config.get("base")
    if base is None:
        _check_every_knob_is_read(config, [str(k) for k in config.keys()], source)
        return config, _Described(str(config.get("name") or path.stem), _raw(config, "steps"))
    relative = path.parent / str(base)
    base_path = relative if relative.suffix in (".yaml", ".yml") and relative.is_file() else None
    try:
        base_path = base_path or _resolve_path(str(base))
    except RecipeError as error:
        raise RecipeError(f"{source}: base: {error}") from error
    if base_path.resolve() in seen:
        raise RecipeError(f"{source}: base: recipes inherit from each other in a cycle")
    parent, described = _read_config(base_path, str(base_path), seen + (path.resolve(),))
    own = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "base"])
    merged = OmegaConf.merge(parent, own)
    _check_every_knob_is_read(merged, [str(k) for k in own.keys()], source)
    if "description" in own:
        described = _Described(str(own.get("name") or path.stem), _raw(merged, "steps"))
    return merged, described


def _raw(config: DictConfig, key: str) -> Any:
    node = config.get(key)
    return OmegaConf.to_container(node, resolve=False) if isinstance(node, (DictConfig, ListConfig)) else node


def _build(config: DictConfig, path: Path, source: str, registry: Registry | None,
           extra_plugins: list[Path] = ()) -> Recipe:
    """Resolve and validate an (overridden) config into a :class:`Recipe`."""
    raw = OmegaConf.to_container(config, resolve=False)
    try:
        resolved = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as error:
        # "RecipeError raised while resolving interpolation: ..." -> the resolver's own words
        reason = re.sub(r"^\w+ raised while resolving interpolation: ", "", str(error).splitlines()[0])
        raise RecipeError(f"{source}: {_key_of(error)}: {reason}") from error

    registry = registry or default_registry()
    plugins = resolved.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise RecipeError(f"{source}: plugins: must be a list of plugin file paths")
    files = [path.parent / p for p in plugins] + list(extra_plugins)
    if files:
        try:
            registry = registry.with_plugin_files(files)
            registry.components  # collect now, so a broken plugin is reported against this recipe
        except RecipeError as error:
            raise RecipeError(f"{source}: {error}") from error

    steps_cfg = resolved.get("steps")
    if not isinstance(steps_cfg, list) or not steps_cfg:
        raise RecipeError(f"{source}: steps: a recipe needs a non-empty list of steps")
    steps = [_parse_step(i, s, raw["steps"][i], registry, source) for i, s in enumerate(steps_cfg)]
    return Recipe(
        name=str(resolved.get("name") or path.stem),
        source=source,
        config=OmegaConf.create(resolved),
        steps=steps,
        registry=registry,
        description=str(resolved.get("description") or ""),
        plugin_files=[Path(f).resolve() for f in files],
    )


def _resolve_path(recipe: str | Path) -> Path:
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            hints = []
            other = path.with_suffix(".yaml" if path.suffix == ".yml" else ".yml")
            if other.is_file():
                hints.append(f"did you mean {str(other)!r}?")
            name = f"budgets/{path.stem}" if path.parent.name == "budgets" else path.stem
            if name in bundled_recipes():
                hints.append(f"the bundled recipe is named {name!r} (no folder, no suffix)")
            if hints:
                raise RecipeError(f"{path}: no such recipe file; {'; '.join(hints)}")
            raise RecipeError(f"{path}: no such recipe file")
        return path
    bundled = RECIPE_DIR / f"{recipe}.yaml"
    if bundled.is_file():
        return bundled
    names = bundled_recipes()
    close = difflib.get_close_matches(str(recipe), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RecipeError(f"{recipe}: no bundled recipe or file of that name; bundled: {', '.join(names)}{hint}")


def knob_paths(config: DictConfig | dict) -> list[str]:
    """The recipe's knobs as dotted paths (nested knobs such as FiCoCo-VL's ``v.r`` included)."""
    from .overrides import flatten_knobs

    data = OmegaConf.to_container(config, resolve=False) if isinstance(config, DictConfig) else config
    return list(flatten_knobs({k: v for k, v in data.items() if k not in RESERVED}))


def _parse_override_value(key: str, text: str, source: str) -> Any:
    try:
        return parse_value(text)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{source}: override {key!r}: cannot parse value {text!r}: {problem}") from error


def _apply_overrides(config: DictConfig, overrides: list[str], source: str) -> DictConfig:
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
        value = _parse_override_value(key, text, source)
        top = key.split(".")[0].lstrip("+")
        if top not in RESERVED and OmegaConf.select(config, key.lstrip("+"), default=_MISSING) is _MISSING:
            knobs = knob_paths(config)
            close = difflib.get_close_matches(key, knobs, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"{source}: override {key!r}: the recipe has no knob {key!r}; its knobs: "
                              f"{', '.join(knobs) or 'none'}{hint}")
        try:
            # A mapping value replaces the node (a stage swap must not keep the old parameters);
            # reserved keys (budget_tflops, ...) may be added by an override.
            with open_dict(config) if top in RESERVED else contextlib.nullcontext():
                OmegaConf.update(config, key, value, merge=not isinstance(value, dict))
        except IndexError as error:
            count = len(config.steps) if isinstance(config.get("steps"), ListConfig) else 0
            raise RecipeError(f"{source}: override {key!r}: the recipe has {count} step(s), "
                              f"steps.0 to steps.{count - 1}") from error
        except (OmegaConfBaseException, TypeError, ValueError) as error:
            reason = str(error).splitlines()[0]
            raise RecipeError(f"{source}: override {key!r}: {reason}") from error
    return config


_MISSING = object()
_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def _references(node: Any) -> set[str]:
    """Keys that ``${...}`` interpolations anywhere in ``node`` read."""
    if isinstance(node, str):
        return set(_REFERENCE.findall(node))
    if isinstance(node, dict):
        return set().union(*(_references(v) for v in node.values())) if node else set()
    if isinstance(node, (list, tuple)):
        return set().union(*(_references(v) for v in node)) if node else set()
    return set()


def _select(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict) and part in data:
            data = data[part]
        else:
            return None
    return data


def _used_knobs(raw: dict) -> set[str]:
    """Knob paths the steps read, directly or through other knobs (and the budget's solved knob)."""
    frontier = set().union(*(_references(v) for k, v in raw.items() if k in RESERVED))
    budget = raw.get("budget_tflops")
    if isinstance(budget, dict) and isinstance(budget.get("solve"), str):
        frontier.add(budget["solve"])
    used: set[str] = set()
    while frontier:
        key = frontier.pop()
        if key not in used:
            used.add(key)
            frontier |= _references(_select(raw, key))
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


def _check_overridden_knobs_are_used(original: DictConfig, config: DictConfig, overrides: list[str],
                                     source: str) -> None:
    """An override that changes a knob nothing reads any more is a mistake, not a no-op."""
    raw = OmegaConf.to_container(config, resolve=False)
    used = _used_knobs(raw)
    before = OmegaConf.to_container(original, resolve=False)
    for item in overrides:
        key = item.partition("=")[0].strip().lstrip("+")
        if key.split(".")[0] in RESERVED:
            continue
        if any(u == key or u.startswith(key + ".") or key.startswith(u + ".") for u in used):
            continue
        if _select(before, key) == _select(raw, key):
            continue  # setting a knob to the value it has changes nothing either way
        readers = [r for r in _readers(before, key) if _select(raw, r.replace("[", ".").replace("]", ""))
                   != _select(before, r.replace("[", ".").replace("]", ""))]
        why = (f"what read it ({', '.join(readers)}) is overridden with an explicit value" if readers
               else "no step reads it")
        raise RecipeError(f"{source}: override {key!r}: the recipe no longer uses knob {key!r}: {why}; "
                          f"drop the override or set the value that reads it")


def _component_name(node: Any) -> Any:
    return node.get("name") if isinstance(node, dict) else node


def _params(node: Any) -> dict:
    return {k: v for k, v in node.items() if k != "name"} if isinstance(node, dict) else {}


def _changes(described: _Described, config: DictConfig, source: str) -> list[str]:
    """How the steps that run differ from those the description was written for."""
    now, then = _raw(config, "steps"), described.steps
    if now == then:
        return []
    if not isinstance(now, list) or not isinstance(then, list):
        return ["steps replaced"]
    changes = [] if len(now) == len(then) else [f"{len(now)} steps instead of {len(then)}"]
    try:  # component names as they resolve against the knobs in force
        resolved_now = OmegaConf.to_container(config, resolve=True)["steps"]
        resolved_then = OmegaConf.to_container(OmegaConf.merge(config, {"steps": then}), resolve=True)["steps"]
    except (OmegaConfBaseException, RecipeError):
        resolved_now, resolved_then = now, then
    for index, (step, old) in enumerate(zip(now, then)):
        if step == old or not isinstance(step, dict) or not isinstance(old, dict):
            if step != old:
                changes.append(f"steps[{index}] replaced")
            continue
        for key in list(dict.fromkeys([*old, *step])):
            if step.get(key) == old.get(key):
                continue
            where = f"steps[{index}].{key}"
            if key in STAGE_KEYS:
                name = _component_name(resolved_now[index].get(key))
                was = _component_name(resolved_then[index].get(key))
                if name != was:
                    changes.append(f"{where}: {name} instead of {was}")
                else:
                    now_params, then_params = (_params(r[index].get(key)) for r in (resolved_now, resolved_then))
                    differ = [p for p in dict.fromkeys([*then_params, *now_params])
                              if now_params.get(p, _MISSING) != then_params.get(p, _MISSING)]
                    shown = lambda params: ", ".join(f"{p}={format_value(params[p])}" for p in differ if p in params)
                    changes.append(f"{where}: {name} with {shown(now_params) or 'defaults'} instead of "
                                   f"{shown(then_params) or 'defaults'}")
            else:
                changes.append(f"{where}: {format_value(step.get(key))} instead of {format_value(old.get(key))}")
    return changes


def _describe_modified(described_name: str, recipe: "Recipe") -> str:
    """A description of what runs, for a recipe whose steps no longer match its description."""
    steps = []
    for step in recipe.steps:
        layers = step.layers if isinstance(step.layers, str) else format_value(step.layers)
        steps.append(f"steps[{step.index}] at {step.site} layers {layers}, {step.schedule.kind} "
                     f"{format_value(step.schedule.value)}: filter {step.filter.name}, correlate "
                     f"{step.correlator.name}, compress {step.compressor.name}")
    return f"{described_name} modified ({'; '.join(recipe.changes)}). What runs: {'; '.join(steps)}."


def _key_of(error: OmegaConfBaseException) -> str:
    return str(getattr(error, "full_key", None) or getattr(error, "key", None) or "?")


def _shown(raw: Any, value: Any) -> str:
    """How a value appears in messages: with the knob it came from, if interpolated."""
    if isinstance(raw, str) and "${" in raw:
        return f"{value!r} (from {raw})"
    knobs = sorted(_references(raw)) if isinstance(raw, (list, dict)) else []
    if knobs:
        return f"{value!r} (from {', '.join('${' + k + '}' for k in knobs)})"
    return repr(value)


def _parse_step(index: int, cfg: Any, raw: Any, registry: Registry, source: str) -> Step:
    where = f"{source}: steps[{index}]"
    if not isinstance(cfg, dict):
        raise RecipeError(f"{where}: a step is a mapping, got {cfg!r}")
    for key in cfg:
        if key not in STEP_KEYS:
            close = difflib.get_close_matches(str(key), sorted(STEP_KEYS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"{where}.{key}: unknown step key; known: {', '.join(sorted(STEP_KEYS))}{hint}")
    site = cfg.get("site")
    if site not in SITES:
        raise RecipeError(f"{where}.site: must be one of {', '.join(SITES)}, got {_shown(raw.get('site'), site)}")
    layers = _parse_layers(cfg.get("layers", "all"), raw.get("layers"), f"{where}.layers")
    if site in POINT_SITES and layers != "all":
        raise RecipeError(f"{where}.layers: the {site} site acts at one point, not at layers; leave layers out "
                          f"(or 'all'), got {_shown(raw.get('layers'), layers)}")
    schedule = _parse_schedule(cfg, raw, where)
    options = {}
    for key, (sites, allowed) in SITE_OPTIONS.items():
        value = cfg.get(key, STEP_DEFAULTS[key])
        if key in cfg and site not in sites:
            raise RecipeError(f"{where}.{key}: only the {' and '.join(sites)} site(s) take it; this step is at "
                              f"{site}")
        if value not in allowed or (isinstance(value, bool) != isinstance(allowed[0], bool)):
            shown_allowed = "true or false" if isinstance(allowed[0], bool) else " or ".join(allowed)
            raise RecipeError(f"{where}.{key}: must be {shown_allowed}, got {_shown(raw.get(key), value)}")
        options[key] = value
    parts = {}
    for key, stage in STAGE_KEYS.items():
        if key not in cfg:
            raise RecipeError(f"{where}.{key}: missing; every step names a {stage}")
        parts[key] = build_component(registry, stage, cfg[key], raw.get(key), f"{where}.{key}")
    correlator, compressor = parts["correlate"], parts["compress"]
    if compressor.consumes not in ("nothing", correlator.produces):
        raise RecipeError(
            f"{where}.compress: {compressor.name!r} needs a correlator that gives {compressor.consumes}, "
            f"but {correlator.name!r} gives {correlator.produces}"
        )
    text_encoder = _parse_text_encoder(cfg, raw, site, where)
    return Step(index, site, layers, schedule, parts["filter"], correlator, compressor, **options,
                text_encoder=text_encoder, layers_source=_source(raw.get("layers")))


def _parse_text_encoder(cfg: dict, raw: dict, site: str, where: str) -> str | None:
    value = cfg.get("text_encoder")
    if "text_encoder" in cfg and site != "pre_llm":
        raise RecipeError(f"{where}.text_encoder: only the pre_llm site takes it; this step is at {site}")
    if value is None:
        return None
    if not isinstance(value, str) or not (Path(value).expanduser() / "config.json").is_file():
        raise RecipeError(f"{where}.text_encoder: a local CLIP checkpoint directory (with config.json) is "
                          f"needed, got {_shown(raw.get('text_encoder'), value)}")
    return str(Path(value).expanduser())


def _parse_layers(value: Any, raw: Any, where: str) -> list[int] | str:
    if value == "all":
        return "all"
    if isinstance(value, str) and ":" in value and LAYER_RANGE.fullmatch(value):
        start, _, stop = value.replace(" ", "").partition(":")
        start = start or "0"
        if int(start) < 0 or (stop and int(stop) < 0):
            raise RecipeError(f"{where}: layer indices are 0-based and non-negative, got {_shown(raw, value)}")
        return f"{int(start)}:{int(stop) if stop else ''}"
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise RecipeError(f"{where}: must be 'all', 'START:STOP' (either optional, STOP exclusive), a layer index or a list "
                          f"of layer indices, got {_shown(raw, value)}")
    if any(v < 0 for v in value):
        raise RecipeError(f"{where}: layer indices are 0-based and non-negative, got {_shown(raw, value)}")
    if len(set(value)) != len(value):
        raise RecipeError(f"{where}: a layer is listed twice: {value}")
    return sorted(value)


def _parse_schedule(cfg: dict, raw: dict, where: str) -> Schedule:
    given = [k for k in SCHEDULE_KEYS if k in cfg]
    if len(given) != 1:
        raise RecipeError(f"{where}: give exactly one of {', '.join(SCHEDULE_KEYS)} (got {given or 'none'})")
    kind = given[0]
    value = cfg[kind]
    shown = _shown(raw.get(kind), value)
    if kind in ("remove", "keep") and isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise RecipeError(f"{where}.{kind}: a list needs non-negative integers, one per layer, got {shown}")
        return Schedule(kind, tuple(value), _source(raw.get(kind)))
    if kind == "keep" and value in ("adaptive", "filter"):
        return Schedule(kind, value, _source(raw.get(kind)))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        extra = ", a list of them (one per layer), 'filter' or 'adaptive'" if kind == "keep" else ""
        raise RecipeError(f"{where}.{kind}: must be a number{extra}, got {shown}")
    if kind in ("remove", "keep") and (not isinstance(value, int) or value < 0):
        raise RecipeError(f"{where}.{kind}: must be a non-negative integer, got {shown}")
    if kind == "keep_geometric" and not 0 < value <= 1:
        raise RecipeError(f"{where}.keep_geometric: must be in (0, 1], got {shown}")
    if kind == "keep_ratio" and not 0 < value <= 1:
        raise RecipeError(f"{where}.keep_ratio: must be in (0, 1], got {shown}")
    if kind == "remove_ratio" and not 0 <= value <= 1:
        raise RecipeError(f"{where}.remove_ratio: must be in [0, 1], got {shown}")
    return Schedule(kind, value, _source(raw.get(kind)))


def _source(raw: Any) -> str | None:
    return raw if isinstance(raw, str) and "${" in raw else None


def knobs_in(source: str | None) -> list[str]:
    """The top-level knobs an interpolation reads: ``${fico.pick:${tables.keep},${budget}}`` -> ``['budget']``."""
    names = re.findall(r"\$\{([A-Za-z_][\w.]*)\}", source or "")
    return list(dict.fromkeys(n for n in names if "." not in n and n != "tables"))


def python_name(key: str) -> str:
    """A recipe parameter's keyword-argument name (``lambda`` -> ``lambda_``)."""
    return f"{key}_" if keyword.iskeyword(key) else key


def recipe_name(name: str) -> str:
    """A keyword argument's name as recipes spell it (``lambda_`` -> ``lambda``)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def build_component(registry: Registry, stage: str, cfg: Any, raw: Any, where: str) -> Component:
    """Instantiate ``{name: ..., **params}`` (or a bare name) as a registered ``stage`` component."""
    if isinstance(cfg, str):
        cfg, raw = {"name": cfg}, {"name": raw}
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise RecipeError(f"{where}: must be a component name or a mapping with a 'name' key, got {cfg!r}")
    raw = raw if isinstance(raw, dict) else {}
    cls = registry.get(stage, cfg["name"], where=f"{where}.name")
    # A parameter named like a Python keyword (FiCoCo's `lambda`) is `lambda_` in Python;
    # messages use the recipe's spelling.
    params = {python_name(k): v for k, v in cfg.items() if k != "name"}
    raw = {python_name(k): v for k, v in raw.items()}
    signature = inspect.signature(cls.__init__)
    accepted = {n: p for n, p in signature.parameters.items()
                if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: skip type checks rather than fail
        hints = {}
    for key, value in params.items():
        shown = recipe_name(key)
        if key not in accepted:
            names = [recipe_name(n) for n in accepted]
            close = difflib.get_close_matches(shown, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"{where}.{shown}: {cls.name!r} has no parameter {shown!r}; its parameters: "
                              f"{', '.join(names) or 'none'}{hint}")
        expected = hints.get(key)
        if expected is not None and not _matches(value, expected):
            raise RecipeError(
                f"{where}.{shown}: expected {getattr(expected, '__name__', expected)}, got {_shown(raw.get(key), value)}"
            )
    try:
        return cls(**params)
    except RecipeError as error:
        raise RecipeError(f"{where}: {error}") from error
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{where}: {cls.name!r} rejected its parameters: {error}") from error


def _matches(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        expected = origin
    return isinstance(value, expected) if isinstance(expected, type) else True
