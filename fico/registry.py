"""Component registry on top of pluggy.

:func:`default_registry` holds the built-in components and every installed package's
``fico`` entry points. A recipe that names local plugin files gets its own registry
(:meth:`Registry.with_plugin_files`), so one recipe's plugins never leak into another.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pluggy

from .errors import RecipeError
from .hookspecs import PROJECT, FicoSpec
from .stages import STAGES, Component

BUILTIN_PLUGINS = (
    "fico.filters.bipartite",
    "fico.filters.attention_rank",
    "fico.filters.ficoco",
    "fico.filters.random",
    "fico.filters.window",
    "fico.filters.diversity",
    "fico.filters.dpp",
    "fico.filters.outliers",
    "fico.filters.pivots",
    "fico.filters.raters",
    "fico.filters.cross_self",
    "fico.correlators.none",
    "fico.correlators.key_similarity",
    "fico.correlators.convergent",
    "fico.correlators.attention",
    "fico.correlators.window",
    "fico.correlators.neighbours",
    "fico.correlators.clusters",
    "fico.compressors.drop",
    "fico.compressors.weighted_average",
    "fico.compressors.fuse",
    "fico.compressors.self_preserving",
    "fico.compressors.target_plus",
    "fico.compressors.cluster_mean",
)

_HOOKS = {"filter": "fico_filters", "correlator": "fico_correlators", "compressor": "fico_compressors"}


class Registry:
    """Named components by stage, collected from pluggy plugins."""

    def __init__(self, *, builtins: bool = True, entry_points: bool = True):
        self.plugin_manager = pluggy.PluginManager(PROJECT)
        self.plugin_manager.add_hookspecs(FicoSpec)
        self._plugins: list[object] = []
        self._components: dict[str, dict[str, type[Component]]] | None = None
        if builtins:
            for module in BUILTIN_PLUGINS:
                self.register(importlib.import_module(module))
        if entry_points:
            self.plugin_manager.load_setuptools_entrypoints(PROJECT)
            self._plugins.extend(p for _, p in self.plugin_manager.list_name_plugin() if p not in self._plugins)

    def register(self, plugin: object) -> None:
        """Register a plugin (a module or object with ``@fico.hookimpl`` functions)."""
        if self.plugin_manager.is_registered(plugin):
            return
        self.plugin_manager.register(plugin)
        self._plugins.append(plugin)
        self._components = None

    def with_plugin_files(self, paths: list[Path]) -> "Registry":
        """A new registry: this one's plugins plus the plugin files ``paths``."""
        child = Registry(builtins=False, entry_points=False)
        for plugin in self._plugins:
            child.register(plugin)
        for path in paths:
            child.register(load_plugin_file(path))
        return child

    @property
    def components(self) -> dict[str, dict[str, type[Component]]]:
        if self._components is None:
            found: dict[str, dict[str, type[Component]]] = {stage: {} for stage in STAGES}
            for stage, hook in _HOOKS.items():
                for classes in getattr(self.plugin_manager.hook, hook)():
                    for cls in classes or ():
                        _check_component(cls, stage)
                        other = found[stage].get(cls.name)
                        if other is not None and other is not cls:
                            raise RecipeError(
                                f"two {stage}s are registered as {cls.name!r}: "
                                f"{other.__module__}.{other.__qualname__} and {cls.__module__}.{cls.__qualname__}"
                            )
                        found[stage][cls.name] = cls
            self._components = found
        return self._components

    def names(self, stage: str) -> list[str]:
        return sorted(self.components[stage])

    def get(self, stage: str, name: str, where: str = "") -> type[Component]:
        """The component class ``name`` of ``stage``; RecipeError listing the known ones."""
        known = self.components[stage]
        if name in known:
            return known[name]
        close = difflib.get_close_matches(str(name), list(known), n=1)
        hint = (f"; did you mean {close[0]!r}?" if close
                else "; a component from a local file needs --plugin FILE (or plugins: in the recipe)")
        prefix = f"{where}: " if where else ""
        raise RecipeError(f"{prefix}unknown {stage} {name!r}; known: {', '.join(sorted(known))}{hint}")


def _check_component(cls: object, stage: str) -> None:
    base = STAGES[stage]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise RecipeError(f"a plugin returned {cls!r} from {_HOOKS[stage]}, which is not a fico.{base.__name__} subclass")
    if not cls.name:
        raise RecipeError(f"{cls.__module__}.{cls.__qualname__} has no `name`")


def load_plugin_file(path: Path) -> ModuleType:
    """Import a local plugin file as a module (cached per resolved path)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise RecipeError(f"plugins: no such plugin file: {path}")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"fico_local_plugin_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise RecipeError(f"plugins: {path}: importing the plugin failed: {type(error).__name__}: {error}") from error
    return module


@functools.cache
def default_registry() -> Registry:
    """Built-in components plus installed ``fico`` entry points (built once, then read-only)."""
    return Registry()
