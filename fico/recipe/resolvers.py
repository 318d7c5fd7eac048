"""The OmegaConf resolvers recipes may call (``${fico.if:...}``, ``${fico.sum:...}``,
``${fico.pick:...}``, ``${fico.next_layers:...}``), registered by :func:`register` before a
recipe is resolved, not as a side effect of an import."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import RecipeError


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


def _next_layers(layers: Any) -> list[int] | dict:
    layers = OmegaConf.to_container(layers) if isinstance(layers, (ListConfig, DictConfig)) else layers
    if isinstance(layers, dict):  # layers by depth: each list moved on
        return {depth: _next_layers(each) for depth, each in layers.items()}
    if not isinstance(layers, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
        raise RecipeError(f"fico.next_layers: takes a list of layer indices, got {layers!r}")
    return [v + 1 for v in layers]


def register() -> None:
    """Make the resolvers known to OmegaConf (once; a recipe resolved before would fail)."""
    # ${fico.if:COND,A,B} lets a boolean knob pick between components (e.g. EViT's fuse);
    # ${fico.sum:A,B,...} adds knobs (VisionZip keeps dominant - 1 + contextual patches);
    # ${fico.pick:${tables.X},KEY,...} reads a method's table by knobs (SparseVLM's schedules);
    # ${fico.next_layers:${layers}}: the input of the layer after each (pruning "after layer l").
    for name, resolver in (("fico.if", _if), ("fico.sum", _sum), ("fico.pick", _pick),
                            ("fico.next_layers", _next_layers)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_resolver(name, resolver)
