"""Model families: found by a registered hook, checked for what they declare, and the contract
one file per family has to fill."""

import pytest
import torch

import fico
from fico.adapters import family_for_config, family_of
from fico.adapters.families.llava import Llava
from fico.adapters.family import FamilyRegistry, ModelFamily
from fico.recipe.plan import Geometry


class Stand(torch.nn.Module):
    """Not a model any built-in family supports."""


class StandFamily(ModelFamily):
    """A family with one decoder site and no options: enough to check what is declared."""

    name = "Stand"
    supported = "tests.Stand"
    site_signals = {"llm": {"last_query_attention"}}

    def supports(self, model):
        return isinstance(model, Stand)

    def supports_config(self, config):
        return config == "stand"

    def planning_geometry(self, config):
        return Geometry(vision_layers=24, vision_tokens=577, feature_index=23, drops_cls=True, llm_layers=32)


class StandPlugin:
    @fico.hookimpl
    def fico_model_families(self):
        return [StandFamily]


def registry_with_stand():
    registry = FamilyRegistry()
    registry.register(StandPlugin())
    return registry


def test_a_registered_family_is_found_like_a_registered_filter(tiny_model):
    registry = registry_with_stand()
    assert isinstance(registry.of_model(Stand()), StandFamily)
    assert isinstance(registry.of_model(tiny_model()), Llava), "the built-in family still answers"
    assert isinstance(registry.of_config("stand"), StandFamily)


def test_an_unsupported_model_names_every_supported_family():
    with pytest.raises(fico.UnsupportedModelError, match=r"supported: ") as error:
        registry_with_stand().of_model(torch.nn.Linear(2, 2))
    assert "tests.Stand" in str(error.value) and "transformers.LlavaForConditionalGeneration" in str(error.value)
    with pytest.raises(fico.UnsupportedModelError, match=r"cannot apply recipes to torch\.nn"):
        fico.apply(torch.nn.Linear(2, 2), "fastv")


def test_the_llava_family_is_found_by_model_and_by_config(tiny_model):
    model = tiny_model()
    assert isinstance(family_of(model), Llava) and isinstance(family_for_config(model.config), Llava)


def test_a_step_at_a_site_the_family_lacks_names_site_step_and_family():
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.site: Stand has no vision site; it offers llm"):
        StandFamily().check_recipe(fico.load_recipe("tome"), "stand")


def test_a_signal_the_family_lacks_names_signal_step_and_family():
    recipe = fico.load_recipe("pdrop")  # PyramidDrop reads last_query_attention at its own layer
    assert StandFamily().check_recipe(recipe, "stand", runs=False).llm.steps
    recipe = fico.load_recipe("fastv", ["steps.0.filter={name: attention_rank, signal: text_attention}"])
    with pytest.raises(fico.RecipeError, match=r"steps\[0\]: the llm site cannot give the signal\(s\) text_attention "
                                               r"on Stand; it gives last_query_attention"):
        StandFamily().check_recipe(recipe, "stand")


def test_an_option_the_family_does_not_offer_names_option_step_and_family():
    class Plain(StandFamily):
        site_signals = {"vision": {"keys", "attention"}, "llm": {"last_query_attention"}}

    with pytest.raises(fico.RecipeError, match=r"steps\[0\]\.proportional_attention: Stand does not offer this "
                                               r"option"):
        Plain().check_recipe(fico.load_recipe("tome"), "stand")
    assert Plain().check_recipe(fico.load_recipe("tome", ["steps.0.proportional_attention=false"]), "stand")


def test_the_llava_prompt_is_the_conversation_format_or_the_chat_template(processor):
    assert Llava().prompt("what is it ?") == "USER: <image>\nwhat is it ? ASSISTANT:"
    assert Llava().prompt("compare", images=2) == "USER: <image>\n<image>\ncompare ASSISTANT:"

    class Templated:
        chat_template = "x"

        def apply_chat_template(self, conversation, add_generation_prompt):
            assert add_generation_prompt
            return repr(conversation)

    shown = Llava().prompt("q", processor=Templated())
    assert shown == repr([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}])


def test_the_plan_says_which_counts_the_data_chooses(tiny_model):
    config = tiny_model().config
    assert Llava().check_recipe(fico.load_recipe("fastv"), config).chosen_by_data() == []
    adaptive = Llava().check_recipe(fico.load_recipe("prumerge"), config).chosen_by_data()
    assert [(p.step.site, p.remove) for p in adaptive] == [("vision_output", None)]


def test_without_any_family_the_error_says_how_families_arrive():
    with pytest.raises(fico.UnsupportedModelError, match=r"no model family is registered .* install fico"):
        FamilyRegistry(entry_points=False).of_model(Stand())
