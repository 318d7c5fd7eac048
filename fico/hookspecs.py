"""The plugin contract: pluggy hook specifications of the ``fico`` project.

A plugin is any module or object with ``@fico.hookimpl`` functions named after these
specs. Built-in components are registered exactly like third-party ones:

* packages declare an entry point in the group ``fico``
  (``[project.entry-points.fico] myplugin = "mypackage.plugin"``);
* a recipe may list local plugin files under ``plugins:``;
* code may call ``fico.Registry.register(module)``.

Example (one file)::

    import fico

    class CoinFlip(fico.Filter):
        "Discard r candidates at random."
        name = "coin_flip"
        def split(self, state, r):
            ...

    @fico.hookimpl
    def fico_filters():
        return [CoinFlip]
"""

from __future__ import annotations

import pluggy

PROJECT = "fico"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class FicoSpec:
    """Hooks a plugin may implement; each returns a list of classes."""

    @hookspec
    def fico_filters(self) -> list[type]:
        """Return :class:`fico.Filter` subclasses to register by their ``name``."""

    @hookspec
    def fico_correlators(self) -> list[type]:
        """Return :class:`fico.Correlator` subclasses to register by their ``name``."""

    @hookspec
    def fico_compressors(self) -> list[type]:
        """Return :class:`fico.Compressor` subclasses to register by their ``name``."""

    @hookspec
    def fico_model_families(self) -> list[type]:
        """Return :class:`fico.adapters.ModelFamily` subclasses: the model families fico can
        apply recipes to (LLaVA-1.5 is registered this way too)."""
