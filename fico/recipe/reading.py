"""Reading a recipe: the bundled names, YAML files on top of their ``base:``, overrides, knob
checks, building the steps and describing what changed. No cost model: a ``budget_tflops:``
is solved by the caller's ``budget`` function (:func:`fico.load_recipe` passes the cost
model's)."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Callable

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import RecipeError
from ..registry import Registry
from . import resolvers
from .build import build_recipe
from .describe import Described, describe_changes, describe_modified
from .overrides import (apply_overrides, blame_override, check_every_knob_is_read, check_overridden_knobs_are_used,
                        check_overrides_agree, override_list, raw_node, take_plugin_overrides)
from .schema import Recipe
from .values import load_yaml


def _recipe_dir() -> Path:
    # Installed: the top-level recipes/ folder is packaged as fico.recipes; in a checkout it sits beside fico/.
    try:
        from importlib.resources import files

        return Path(str(files("fico.recipes")))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parents[2] / "recipes"


RECIPE_DIR = _recipe_dir()


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped in ``recipes/`` (budget variants as ``budgets/NAME``)."""
    return sorted(p.relative_to(RECIPE_DIR).with_suffix("").as_posix() for p in RECIPE_DIR.rglob("*.yaml"))


#: Solves a ``budget_tflops:``: ``(config, source, overrides, build) -> (config, solution)``,
#: where ``build(candidate_config)`` builds a candidate :class:`Recipe` to cost.
BudgetSolver = Callable[[DictConfig, str, list, Callable[[DictConfig], Recipe]], tuple[DictConfig, Any]]


def read_recipe(recipe: str | Path, overrides: list[str] | str | None = None, registry: Registry | None = None,
                plugins: list[str | Path] | None = None, budget: BudgetSolver | None = None) -> Recipe:
    """Read a bundled recipe by name, or a YAML file by path, and validate it; the arguments
    are :func:`fico.load_recipe`'s. ``budget`` solves a ``budget_tflops:`` (the recipes
    package knows no cost model; without it such a recipe is refused).

    >>> read_recipe("fastv", "k=3;ratio=0.25").knobs
    {'k': 3, 'ratio': 0.25}
    """
    resolvers.register()
    overrides = override_list(overrides)
    path = resolve_path(recipe)
    source = str(path)
    config, described = read_config(path, source, seen=())
    original = copy.deepcopy(config)
    overrides, extra_plugins = take_plugin_overrides(overrides, source)
    check_overrides_agree(overrides, source)
    extra_plugins += [Path(p) for p in plugins or ()]
    config = apply_overrides(config, overrides, source)
    check_overridden_knobs_are_used(original, config, overrides, source)
    solution = None
    if isinstance(config.get("budget"), DictConfig) and "budget_tflops" not in config:
        raise RecipeError(f"{source}: budget: a FLOPs budget is now written 'budget_tflops:' (same keys: tflops, "
                          f"model, text_tokens, convention, solve); 'budget' is a knob name of some methods")
    if config.get("budget_tflops") is not None:
        if budget is None:
            raise RecipeError(f"{source}: budget_tflops: solving a FLOPs budget needs the cost model; load the "
                              f"recipe with fico.load_recipe")
        config, solution = budget(config, source, overrides,
                                  lambda candidate: build_recipe(candidate, path, source, registry, extra_plugins))
    try:
        built = build_recipe(config, path, source, registry, extra_plugins)
    except RecipeError as error:
        raise blame_override(error, overrides, source) from error
    built.budget = solution
    built.changes = describe_changes(described, config, source)
    if built.changes:
        built.description = describe_modified(described.name, built)
    return built


def resolve_path(recipe: str | Path) -> Path:
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


def read_config(path: Path, source: str, seen: tuple) -> tuple[DictConfig, Described]:
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
        check_every_knob_is_read(config, [str(k) for k in config.keys()], source)
        return config, Described(str(config.get("name") or path.stem), raw_node(config, "steps"))
    relative = path.parent / str(base)
    base_path = relative if relative.suffix in (".yaml", ".yml") and relative.is_file() else None
    try:
        base_path = base_path or resolve_path(str(base))
    except RecipeError as error:
        raise RecipeError(f"{source}: base: {error}") from error
    if base_path.resolve() in seen:
        raise RecipeError(f"{source}: base: recipes inherit from each other in a cycle")
    parent, described = read_config(base_path, str(base_path), seen + (path.resolve(),))
    own = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "base"])
    merged = OmegaConf.merge(parent, own)
    check_every_knob_is_read(merged, [str(k) for k in own.keys()], source)
    if "description" in own:
        described = Described(str(own.get("name") or path.stem), raw_node(merged, "steps"))
    return merged, described
