"""Building a resolved config into steps: each stage a registered component with checked
parameters, each step's site, layers, schedule and options."""

from __future__ import annotations

import difflib
import inspect
import re
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import RecipeError
from ..registry import Registry, default_registry
from ..stages import Component
from .overrides import references
from .schema import (POINT_SITES, SCHEDULE_KEYS, SITE_OPTIONS, SITES, STAGE_KEYS, STEP_DEFAULTS, STEP_KEYS, Recipe,
                     Schedule, Step, python_name, recipe_name)
from .values import LAYER_RANGE

#: ``stages:S``: the first layer of each of S equal stages after the first (PyramidDrop's partition)
STAGES = re.compile(r"stages:(\d+)")


def build_recipe(config: DictConfig, path: Path, source: str, registry: Registry | None,
           extra_plugins: list[Path] = ()) -> Recipe:
    """Resolve and validate an (overridden) config into a :class:`Recipe`."""
    raw = OmegaConf.to_container(config, resolve=False)
    try:
        resolved = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as error:
        # "RecipeError raised while resolving interpolation: ..." -> the resolver's own words
        reason = re.sub(r"^\w+ raised while resolving interpolation: ", "", str(error).splitlines()[0])
        raise RecipeError(f"{source}: {key_of(error)}: {reason}") from error

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
        raise RecipeError(f"{where}.site: must be one of {', '.join(SITES)}, got {shown_value(raw.get('site'), site)}")
    layers = _parse_layers(cfg.get("layers", "all"), raw.get("layers"), f"{where}.layers")
    if site in POINT_SITES and layers != "all":
        raise RecipeError(f"{where}.layers: the {site} site acts at one point, not at layers; leave layers out "
                          f"(or 'all'), got {shown_value(raw.get('layers'), layers)}")
    schedule = _parse_schedule(cfg, raw, where)
    options = {}
    for key, (sites, allowed) in SITE_OPTIONS.items():
        value = cfg.get(key, STEP_DEFAULTS[key])
        # (a step may state the default anywhere: a recipe picks its value by site from a table)
        if key in cfg and site not in sites and value != STEP_DEFAULTS[key]:
            raise RecipeError(f"{where}.{key}: only the {' and '.join(sites)} site(s) take it; this step is at "
                              f"{site}")
        if value not in allowed or (isinstance(value, bool) != isinstance(allowed[0], bool)):
            shown_allowed = "true or false" if isinstance(allowed[0], bool) else " or ".join(allowed)
            raise RecipeError(f"{where}.{key}: must be {shown_allowed}, got {shown_value(raw.get(key), value)}")
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
    vision_layer = cfg.get("vision_layer")
    if "vision_layer" in cfg and site != "pre_llm":
        raise RecipeError(f"{where}.vision_layer: only the pre_llm site takes it; this step is at {site}")
    if vision_layer is not None and (not isinstance(vision_layer, int) or isinstance(vision_layer, bool)):
        raise RecipeError(f"{where}.vision_layer: a vision block index (an integer, negative from the end) is "
                          f"needed, got {shown_value(raw.get('vision_layer'), vision_layer)}")
    return Step(index, site, layers, schedule, parts["filter"], correlator, compressor, **options,
                text_encoder=text_encoder, vision_layer=vision_layer, layers_source=_source(raw.get("layers")))


def _parse_text_encoder(cfg: dict, raw: dict, site: str, where: str) -> str | None:
    value = cfg.get("text_encoder")
    if "text_encoder" in cfg and site != "pre_llm":
        raise RecipeError(f"{where}.text_encoder: only the pre_llm site takes it; this step is at {site}")
    if value is None:
        return None
    if not isinstance(value, str) or not (Path(value).expanduser() / "config.json").is_file():
        raise RecipeError(f"{where}.text_encoder: a local CLIP checkpoint directory (with config.json) is "
                          f"needed, got {shown_value(raw.get('text_encoder'), value)}")
    return str(Path(value).expanduser())


def _parse_layers(value: Any, raw: Any, where: str) -> list[int] | str | dict[int | str, list[int]]:
    if isinstance(value, dict):  # {depth: [layer, ...], default: [...]}: a method with no rule per depth
        lists = {}
        for key, layers in value.items():
            try:
                depth = "default" if key == "default" else int(key)
            except (TypeError, ValueError):
                depth = -1
            if depth != "default" and depth <= 0 or not isinstance(layers, list):
                raise RecipeError(f"{where}: layers by depth need {{layers of the site: [layer, ...]}} (and "
                                  f"optionally default: [...]), got {shown_value(raw, value)}")
            lists[depth] = _parse_layers(layers, layers, f"{where}.{depth}")
            if depth != "default" and any(layer >= depth for layer in lists[depth]):
                raise RecipeError(f"{where}.{depth}: a site of {depth} layers has layers 0..{depth - 1}, got "
                                  f"{lists[depth]}")
        if not lists:
            raise RecipeError(f"{where}: layers by depth need at least one {{layers: [layer, ...]}}")
        return lists
    if value == "all":
        return "all"
    stages = STAGES.fullmatch(value.replace(" ", "")) if isinstance(value, str) else None
    if stages:
        if int(stages.group(1)) < 2:
            raise RecipeError(f"{where}: 'stages:S' needs S >= 2 stages, got {shown_value(raw, value)}")
        return f"stages:{int(stages.group(1))}"
    if isinstance(value, str) and ":" in value and LAYER_RANGE.fullmatch(value):
        start, _, stop = value.replace(" ", "").partition(":")
        start = start or "0"
        if int(start) < 0 or (stop and int(stop) < 0):
            raise RecipeError(f"{where}: layer indices are 0-based and non-negative, got {shown_value(raw, value)}")
        return f"{int(start)}:{int(stop) if stop else ''}"
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise RecipeError(f"{where}: must be 'all', 'START:STOP' (either optional, STOP exclusive), 'stages:S', a layer "
                          f"index or a list of layer indices, got {shown_value(raw, value)}")
    if any(v < 0 for v in value):
        raise RecipeError(f"{where}: layer indices are 0-based and non-negative, got {shown_value(raw, value)}")
    if len(set(value)) != len(value):
        raise RecipeError(f"{where}: a layer is listed twice: {value}")
    return sorted(value)


def _parse_schedule(cfg: dict, raw: dict, where: str) -> Schedule:
    given = [k for k in SCHEDULE_KEYS if k in cfg]
    if len(given) != 1:
        raise RecipeError(f"{where}: give exactly one of {', '.join(SCHEDULE_KEYS)} (got {given or 'none'})")
    kind = given[0]
    value = cfg[kind]
    shown = shown_value(raw.get(kind), value)
    if kind in ("remove", "keep") and isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise RecipeError(f"{where}.{kind}: a list needs non-negative integers, one per layer, got {shown}")
        return Schedule(kind, tuple(value), _source(raw.get(kind)))
    if kind in ("remove", "keep") and isinstance(value, dict):
        return Schedule(kind, _lists_by_depth(value, f"{where}.{kind}", shown), _source(raw.get(kind)))
    if kind == "keep_geometric" and isinstance(value, dict):
        return Schedule(kind, _ratios_by_depth(value, f"{where}.{kind}", shown), _source(raw.get(kind)))
    if kind == "keep" and value in ("adaptive", "filter"):
        return Schedule(kind, value, _source(raw.get(kind)))
    if kind == "keep" and isinstance(value, str) and value.endswith("%"):
        # a share of each image's visual tokens (the native-resolution protocol's 33.3% / 22.2% /
        # 11.1%): kept as keep_ratio, ceil(share x n), so 33.3% of 576 keeps 192
        try:
            share = float(value[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise RecipeError(f"{where}.keep: a share must be a percentage in (0%, 100%], got {shown}")
        return Schedule("keep_ratio", share, _source(raw.get(kind)))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        extra = ", a list of them (one per layer), a share ('33.3%'), 'filter' or 'adaptive'" if kind == "keep" \
            else ""
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


def _lists_by_depth(value: dict, where: str, shown: str) -> dict[int, tuple[int, ...]]:
    """``{layers: [count, ...]}``: count lists keyed by how many layers the step runs at, each
    as long as its key (tables fitted per model depth)."""
    lists = {}
    for key, counts in value.items():
        try:
            depth = int(key)
        except (TypeError, ValueError):
            depth = -1
        good = isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                 for v in counts)
        if depth <= 0 or not good or len(counts) != depth:
            raise RecipeError(f"{where}: lists by depth need {{layers: [count, ...]}} with one non-negative count "
                              f"per layer (as many as the key says); {key!r} gives {counts!r} "
                              f"in {shown}")
        lists[depth] = tuple(counts)
    if not lists:
        raise RecipeError(f"{where}: lists by depth need at least one {{layers: [count, ...]}}, got {shown}")
    return lists


def _ratios_by_depth(value: dict, where: str, shown: str) -> dict[int | str, float]:
    """``{depth: ratio, default: ratio}``: keep_geometric ratios keyed by the site's depth (a
    budget rule solved per depth, as the layers by depth it goes with)."""
    ratios: dict[int | str, float] = {}
    for key, ratio in value.items():
        try:
            depth = "default" if key == "default" else int(key)
        except (TypeError, ValueError):
            depth = -1
        good = isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio <= 1
        if depth != "default" and depth <= 0 or not good:
            raise RecipeError(f"{where}: ratios by depth need {{layers of the site: ratio in (0, 1]}} (and "
                              f"optionally default: ratio); {key!r} gives {ratio!r} in {shown}")
        ratios[depth] = float(ratio)
    if not ratios:
        raise RecipeError(f"{where}: ratios by depth need at least one {{layers of the site: ratio}}, got {shown}")
    return ratios


def _source(raw: Any) -> str | None:
    return raw if isinstance(raw, str) and "${" in raw else None


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
                f"{where}.{shown}: expected {getattr(expected, '__name__', expected)}, got {shown_value(raw.get(key), value)}"
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


def shown_value(raw: Any, value: Any) -> str:
    """How a value appears in messages: with the knob it came from, if interpolated."""
    if isinstance(raw, str) and "${" in raw:
        return f"{value!r} (from {raw})"
    knobs = sorted(references(raw)) if isinstance(raw, (list, dict)) else []
    if knobs:
        return f"{value!r} (from {', '.join('${' + k + '}' for k in knobs)})"
    return repr(value)


def key_of(error: OmegaConfBaseException) -> str:
    return str(getattr(error, "full_key", None) or getattr(error, "key", None) or "?")
