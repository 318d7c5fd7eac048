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
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import RecipeError
from .registry import Registry, default_registry
from .stages import Component, Compressor, Correlator, Filter

def _recipe_dir() -> Path:
    # Installed: the top-level recipes/ folder is packaged as fico.recipes; in a checkout it sits beside fico/.
    try:
        from importlib.resources import files

        return Path(str(files("fico.recipes")))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parent.parent / "recipes"


RECIPE_DIR = _recipe_dir()
SITES = ("vision", "llm")
RESERVED = {"name", "description", "cite", "plugins", "steps", "base", "budget"}
STEP_KEYS = {"site", "layers", "remove", "keep_ratio", "remove_ratio", "filter", "correlate", "compress",
             "proportional_attention"}
SCHEDULE_KEYS = ("remove", "keep_ratio", "remove_ratio")
LAYER_RANGE = re.compile(r"-?\d+:(-?\d+)?")
STAGE_KEYS = {"filter": "filter", "correlate": "correlator", "compress": "compressor"}


@dataclass(frozen=True)
class Schedule:
    """How many candidates one step discards, from the number ``n`` present.

    ``remove``: a fixed count, or one count per layer of the step; ``keep_ratio``: keep ``ceil(keep_ratio * n)`` (EViT);
    ``remove_ratio``: remove ``round(remove_ratio * n)`` (FastV; Python's round).
    """

    kind: str
    value: float | tuple[int, ...]

    def tokens_to_remove(self, n: int, position: int = 0) -> int:
        """Tokens to remove from ``n`` candidates at the ``position``-th layer of the step."""
        if self.kind == "remove":
            return int(self.value[position]) if isinstance(self.value, tuple) else int(self.value)
        if self.kind == "keep_ratio":
            return n - math.ceil(self.value * n)
        return int(round(self.value * n))


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
    #: How a ``budget:`` was met (:class:`fico.budget.BudgetSolution`), or None.
    budget: Any = None

    @property
    def knobs(self) -> dict[str, Any]:
        return {k: OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v
                for k, v in self.config.items() if k not in RESERVED}

    def error(self, key: str, message: str) -> RecipeError:
        return RecipeError(f"{self.source}: {key}: {message}")


def _if(condition: Any, then: Any, otherwise: Any) -> Any:
    if not isinstance(condition, bool):
        raise RecipeError(f"fico.if: the condition must be true or false, got {condition!r}")
    return then if condition else otherwise


# ${fico.if:COND,A,B} lets a boolean knob pick between components (e.g. EViT's fuse).
if not OmegaConf.has_resolver("fico.if"):
    OmegaConf.register_resolver("fico.if", _if)


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped in ``recipes/`` (budget variants as ``budgets/NAME``)."""
    return sorted(p.relative_to(RECIPE_DIR).with_suffix("").as_posix() for p in RECIPE_DIR.rglob("*.yaml"))


def load_recipe(recipe: str | Path, overrides: list[str] | None = None, registry: Registry | None = None) -> Recipe:
    """Load a bundled recipe by name, or a YAML file by path, and validate it.

    Args:
        recipe: a bundled name (``"tome"``, ``"evit"``, ``"fastv"``, ...) or a path.
        overrides: ``key=value`` strings in OmegaConf's dotlist syntax, e.g. ``["r=8"]``,
            ``["layers=[0,1]"]``, ``["steps.0.filter.name=attention_rank"]``.
        registry: components to resolve names against (default: built-ins + entry points).

    Raises:
        RecipeError: naming the source and key, for any invalid content.
    """
    path = _resolve_path(recipe)
    source = str(path)
    config = _read_config(path, source, seen=())
    config = _apply_overrides(config, overrides or [], source)
    solution = None
    if config.get("budget") is not None:
        from .budget import solve_budget

        config, solution = solve_budget(config, source, overrides or [],
                                        lambda candidate: _build(candidate, path, source, registry))
    built = _build(config, path, source, registry)
    built.budget = solution
    return built


def _read_config(path: Path, source: str, seen: tuple) -> DictConfig:
    """The YAML at ``path``, on top of its ``base:`` recipe (a bundled name or a relative path)."""
    try:
        config = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError) as error:  # YAML errors subclass ValueError
        raise RecipeError(f"{source}: cannot read recipe: {error}") from error
    if not isinstance(config, DictConfig):
        raise RecipeError(f"{source}: a recipe is a mapping of keys, got {type(config).__name__}")
    base = config.get("base")
    if base is None:
        return config
    relative = path.parent / str(base)
    base_path = relative if relative.suffix in (".yaml", ".yml") and relative.is_file() else None
    try:
        base_path = base_path or _resolve_path(str(base))
    except RecipeError as error:
        raise RecipeError(f"{source}: base: {error}") from error
    if base_path.resolve() in seen:
        raise RecipeError(f"{source}: base: recipes inherit from each other in a cycle")
    parent = _read_config(base_path, str(base_path), seen + (path.resolve(),))
    own = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "base"])
    return OmegaConf.merge(parent, own)


def _build(config: DictConfig, path: Path, source: str, registry: Registry | None) -> Recipe:
    """Resolve and validate an (overridden) config into a :class:`Recipe`."""
    raw = OmegaConf.to_container(config, resolve=False)
    try:
        resolved = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as error:
        raise RecipeError(f"{source}: {_key_of(error)}: {str(error).splitlines()[0]}") from error

    registry = registry or default_registry()
    plugins = resolved.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise RecipeError(f"{source}: plugins: must be a list of plugin file paths")
    if plugins:
        try:
            registry = registry.with_plugin_files([(path.parent / p) for p in plugins])
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
    )


def _resolve_path(recipe: str | Path) -> Path:
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"{path}: no such recipe file")
        return path
    bundled = RECIPE_DIR / f"{recipe}.yaml"
    if bundled.is_file():
        return bundled
    names = bundled_recipes()
    close = difflib.get_close_matches(str(recipe), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RecipeError(f"{recipe}: no bundled recipe or file of that name; bundled: {', '.join(names)}{hint}")


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
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise RecipeError(f"{source}: override {key!r}: cannot parse value {text!r}: {error}") from error
        try:
            # A mapping value replaces the node (a stage swap must not keep the old parameters).
            OmegaConf.update(config, key, value, merge=not isinstance(value, dict))
        except (OmegaConfBaseException, TypeError, ValueError, IndexError) as error:
            knobs = [str(k) for k in config.keys() if k not in RESERVED]
            close = difflib.get_close_matches(key.split(".")[-1], [str(k) for k in config.keys()], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            reason = str(error).splitlines()[0]
            raise RecipeError(f"{source}: override {key!r}: {reason}; recipe knobs: {', '.join(knobs)}{hint}") from error
    return config


def _key_of(error: OmegaConfBaseException) -> str:
    return str(getattr(error, "full_key", None) or getattr(error, "key", None) or "?")


def _shown(raw: Any, value: Any) -> str:
    """How a value appears in messages: with the knob it came from, if interpolated."""
    if isinstance(raw, str) and "${" in raw:
        return f"{value!r} (from {raw})"
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
        raise RecipeError(f"{where}.site: must be one of {', '.join(SITES)}, got {site!r}")
    layers = _parse_layers(cfg.get("layers", "all"), raw.get("layers"), f"{where}.layers")
    schedule = _parse_schedule(cfg, raw, where)
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
    prop = cfg.get("proportional_attention", False)
    if not isinstance(prop, bool):
        raise RecipeError(f"{where}.proportional_attention: must be true or false, got {_shown(raw.get('proportional_attention'), prop)}")
    return Step(index, site, layers, schedule, parts["filter"], correlator, compressor, prop)


def _parse_layers(value: Any, raw: Any, where: str) -> list[int] | str:
    if value == "all":
        return "all"
    if isinstance(value, str) and LAYER_RANGE.fullmatch(value.replace(" ", "")):
        start, _, stop = value.replace(" ", "").partition(":")
        if int(start) < 0 or (stop and int(stop) < 0):
            raise RecipeError(f"{where}: layer indices are 0-based and non-negative, got {_shown(raw, value)}")
        return value.replace(" ", "")
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise RecipeError(f"{where}: must be 'all', 'START:STOP' (STOP optional, exclusive), a layer index or a list "
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
    if kind == "remove" and isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise RecipeError(f"{where}.remove: a list needs non-negative integers, one per layer, got {shown}")
        return Schedule(kind, tuple(value))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{where}.{kind}: must be a number, got {shown}")
    if kind == "remove" and (not isinstance(value, int) or value < 0):
        raise RecipeError(f"{where}.remove: must be a non-negative integer, got {shown}")
    if kind == "keep_ratio" and not 0 < value <= 1:
        raise RecipeError(f"{where}.keep_ratio: must be in (0, 1], got {shown}")
    if kind == "remove_ratio" and not 0 <= value <= 1:
        raise RecipeError(f"{where}.remove_ratio: must be in [0, 1], got {shown}")
    return Schedule(kind, value)


def build_component(registry: Registry, stage: str, cfg: Any, raw: Any, where: str) -> Component:
    """Instantiate ``{name: ..., **params}`` (or a bare name) as a registered ``stage`` component."""
    if isinstance(cfg, str):
        cfg, raw = {"name": cfg}, {"name": raw}
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise RecipeError(f"{where}: must be a component name or a mapping with a 'name' key, got {cfg!r}")
    raw = raw if isinstance(raw, dict) else {}
    cls = registry.get(stage, cfg["name"], where=f"{where}.name")
    # A parameter named like a Python keyword (FiCoCo's `lambda`) maps to `lambda_`.
    params = {(f"{k}_" if keyword.iskeyword(k) else k): v for k, v in cfg.items() if k != "name"}
    raw = {(f"{k}_" if keyword.iskeyword(k) else k): v for k, v in raw.items()}
    signature = inspect.signature(cls.__init__)
    accepted = {n: p for n, p in signature.parameters.items()
                if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: skip type checks rather than fail
        hints = {}
    for key, value in params.items():
        if key not in accepted:
            close = difflib.get_close_matches(key, list(accepted), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(accepted) or "none"
            raise RecipeError(f"{where}.{key}: {cls.name!r} has no parameter {key!r}; its parameters: {known}{hint}")
        expected = hints.get(key)
        if expected is not None and not _matches(value, expected):
            raise RecipeError(
                f"{where}.{key}: expected {getattr(expected, '__name__', expected)}, got {_shown(raw.get(key), value)}"
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
