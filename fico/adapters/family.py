"""Model families: the contract a family implements (:class:`ModelFamily`), the registry that
finds the family of a model, and the checks of a recipe against a family.

A family is everything fico knows about one kind of model: which models it is, their token
and layer counts, the sites it offers with the signals each gives and the step options it
supports, its prompt format, and how a planned recipe is attached to one of its models. The
core (:mod:`fico.adapters`) knows no family; families know no method. A third party adds a
family the way it adds a filter::

    @fico.hookimpl
    def fico_model_families():
        return [MyFamily]

in a module named by an entry point of the group ``fico`` (or :func:`register_family`). The
built-in families are registered the same way (fico's own entry points), so the core names
none of them.
"""

from __future__ import annotations

import functools

import pluggy
import torch

from ..errors import RecipeError, UnsupportedModelError
from ..hookspecs import PROJECT, FicoSpec
from ..recipe import Recipe
from ..recipe.plan import Geometry, RecipePlan, plan_recipe
from ..recipe.schema import STEP_DEFAULTS
from ..run import ReductionRun

#: step options the recipe schema takes that a family may or may not offer, with the value
#: that means "not used"
FAMILY_OPTIONS = {"proportional_attention": STEP_DEFAULTS["proportional_attention"],
                  "cls_feature": STEP_DEFAULTS["cls_feature"], "text_encoder": None, "vision_layer": None}


class ModelFamily:
    """One kind of model fico can reduce. Subclasses set the attributes and implement the methods.

    Attributes:
        name: how messages name the family (``LLaVA-1.5``).
        supported: what it supports, for the error that lists the supported models.
        checkpoint_classes: a checkpoint's ``config.json`` ``model_type`` -> the transformers
            class that loads it.
        site_signals: the sites the family offers, each with the signals it gives.
        options: the family-dependent step options it supports (:data:`FAMILY_OPTIONS`).
    """

    name: str = ""
    supported: str = ""
    checkpoint_classes: dict[str, str] = {}
    site_signals: dict[str, set[str]] = {}
    options: frozenset[str] = frozenset()

    def supports(self, model) -> bool:
        """Whether ``model`` (a loaded transformers model) is of this family."""
        raise NotImplementedError

    def supports_config(self, config) -> bool:
        """Whether ``config`` (a transformers config) describes a model of this family."""
        raise NotImplementedError

    def planning_geometry(self, config) -> Geometry:
        """The layer and token counts a plan needs, from the config alone (no weights)."""
        raise NotImplementedError

    def check_recipe(self, recipe: Recipe, config, runs: bool = True) -> RecipePlan:
        """Every check of ``recipe`` that needs only the config; returns the plan. Families add
        their own checks around these (sites and options, the plan, signals)."""
        check_sites_and_options(recipe, self)
        plan = plan_recipe(recipe, self.planning_geometry(config))
        check_signals(recipe, plan, self)
        return plan

    def attach(self, run: ReductionRun, model, plan: RecipePlan) -> None:
        """Attach the sites of ``plan`` to ``model``, every change registered on ``run``."""
        raise NotImplementedError

    def prompt(self, question: str, images: int = 1, processor=None) -> str:
        """The prompt that asks ``question`` about ``images`` images: the processor's chat
        template where it has one, else the family's own format."""
        raise NotImplementedError

    @staticmethod
    def chat_template_prompt(question: str, images: int, processor) -> str | None:
        """``question`` after ``images`` images in one user turn of the processor's chat
        template, or None where the processor has none."""
        if not getattr(processor, "chat_template", None):
            return None
        content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def offline_processor(self, directory):
        """A processor for the checkpoint in ``directory`` where transformers cannot build the
        stock one on this machine, or None (the stock one's error stands)."""
        return None

    def continuation_position_ids(self, model, start: int, steps: int, device) -> torch.Tensor:
        """``position_ids`` of ``steps`` tokens decoded after a prompt whose cache holds
        ``start`` tokens (a plain forward on the cache, as a scorer of continuations runs):
        1-D positions ``start, start + 1, ...``."""
        return torch.arange(start, start + steps, device=device)[None]


def check_sites_and_options(recipe: Recipe, family: ModelFamily) -> None:
    """Each step at a site the family offers, with options it supports."""
    for step in recipe.steps:
        if step.site not in family.site_signals:
            raise RecipeError(f"{recipe.source}: {step.where}.site: {family.name} has no {step.site} site; it offers "
                              f"{', '.join(family.site_signals)}")
        for option, unused in FAMILY_OPTIONS.items():
            if getattr(step, option) != unused and option not in family.options:
                raise RecipeError(f"{recipe.source}: {step.where}.{option}: {family.name} does not offer this option")


def check_signals(recipe: Recipe, plan: RecipePlan, family: ModelFamily) -> None:
    """Each planned step reads only signals its site gives on this family."""
    for p in plan.planned_steps():
        provided = family.site_signals[p.step.site]
        missing = p.step.required_signals() - provided
        if missing:
            raise RecipeError(f"{recipe.source}: {p.step.where}: the {p.step.site} site cannot give the signal(s) "
                              f"{', '.join(sorted(missing))} on {family.name}; it gives "
                              f"{', '.join(sorted(provided)) or 'none'}")


class FamilyRegistry:
    """The model families of installed ``fico`` entry points (fico's own included)."""

    def __init__(self, *, entry_points: bool = True):
        self.plugin_manager = pluggy.PluginManager(PROJECT)
        self.plugin_manager.add_hookspecs(FicoSpec)
        self._families: list[ModelFamily] | None = None
        if entry_points:
            self.plugin_manager.load_setuptools_entrypoints(PROJECT)

    def register(self, plugin: object) -> None:
        """Register a plugin (a module or object with a ``@fico.hookimpl fico_model_families``)."""
        if not self.plugin_manager.is_registered(plugin):
            self.plugin_manager.register(plugin)
            self._families = None

    @property
    def families(self) -> list[ModelFamily]:
        if self._families is None:
            found: list[ModelFamily] = []
            for classes in self.plugin_manager.hook.fico_model_families():
                for cls in classes or ():
                    if not (isinstance(cls, type) and issubclass(cls, ModelFamily)):
                        raise TypeError(f"fico_model_families returned {cls!r}, not a fico.adapters.ModelFamily "
                                        f"subclass")
                    if all(type(f) is not cls for f in found):
                        found.append(cls())
            self._families = found
        return self._families

    def unsupported(self, what: str) -> UnsupportedModelError:
        if not self.families:
            return UnsupportedModelError(f"fico cannot apply recipes to {what}: no model family is registered (the "
                                         f"built-in ones come with fico's entry points: install fico, e.g. "
                                         f"`pip install -e .`)")
        return UnsupportedModelError(f"fico cannot apply recipes to {what}; supported: "
                                     + "; ".join(f.supported for f in self.families))

    def of_model(self, model) -> ModelFamily:
        """The family of a loaded model; UnsupportedModelError naming the supported ones."""
        for family in self.families:
            if family.supports(model):
                return family
        raise self.unsupported(f"{type(model).__module__}.{type(model).__qualname__}")

    def of_config(self, config) -> ModelFamily:
        """The family of a model's config; UnsupportedModelError naming the supported ones."""
        for family in self.families:
            if family.supports_config(config):
                return family
        raise self.unsupported(f"a model with a {type(config).__name__}")

    def checkpoint_classes(self) -> dict[str, str]:
        """``model_type`` -> transformers class name, over every family."""
        return {k: v for family in self.families for k, v in family.checkpoint_classes.items()}


@functools.cache
def default_families() -> FamilyRegistry:
    """The families of installed ``fico`` entry points, fico's own included (built once)."""
    return FamilyRegistry()


def register_family(plugin: object) -> None:
    """Add a plugin's families to the default registry (a module or object with a
    ``@fico.hookimpl`` ``fico_model_families``)."""
    default_families().register(plugin)
