"""What differs from the recipe a description was written for, in words."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import RecipeError
from .overrides import MISSING, raw_node
from .schema import STAGE_KEYS, Recipe
from .values import format_value


@dataclass
class Described:
    """The recipe whose ``description`` a config carries, and its steps as written there."""

    name: str
    steps: Any


def _component_name(node: Any) -> Any:
    return node.get("name") if isinstance(node, dict) else node


def _params(node: Any) -> dict:
    return {k: v for k, v in node.items() if k != "name"} if isinstance(node, dict) else {}


def describe_changes(described: Described, config: DictConfig, source: str) -> list[str]:
    """How the steps that run differ from those the description was written for."""
    now, then = raw_node(config, "steps"), described.steps
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
                              if now_params.get(p, MISSING) != then_params.get(p, MISSING)]
                    shown = lambda params: ", ".join(f"{p}={format_value(params[p])}" for p in differ if p in params)
                    changes.append(f"{where}: {name} with {shown(now_params) or 'defaults'} instead of "
                                   f"{shown(then_params) or 'defaults'}")
            else:
                changes.append(f"{where}: {format_value(step.get(key))} instead of {format_value(old.get(key))}")
    return changes


def describe_modified(described_name: str, recipe: "Recipe") -> str:
    """A description of what runs, for a recipe whose steps no longer match its description."""
    steps = []
    for step in recipe.steps:
        layers = step.layers if isinstance(step.layers, str) else format_value(step.layers)
        steps.append(f"steps[{step.index}] at {step.site} layers {layers}, {step.schedule.kind} "
                     f"{format_value(step.schedule.value)}: filter {step.filter.name}, correlate "
                     f"{step.correlator.name}, compress {step.compressor.name}")
    return f"{described_name} modified ({'; '.join(recipe.changes)}). What runs: {'; '.join(steps)}."
