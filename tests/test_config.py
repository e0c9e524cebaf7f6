"""Recipes, profiles and overrides: typed, validated, with errors that name the key and the fix."""

from __future__ import annotations

import pytest

from augpipe.pipeline.config import ConfigError, load_recipe, parse_set
from augpipe.pipeline.plan import build_plan


def test_profile_and_set_override_reach_the_stage_settings():
    recipe = load_recipe("back-speech", profile="tiny", sets=["transcribe.variants=2", "multiple=4"])
    options = {entry.name: entry.options for entry in recipe.stages}
    assert options["transcribe"] == {"backend": "tiny", "variants": 2}
    assert recipe.multiple == 4
    plan = build_plan(recipe, check_models=False)
    assert plan.stages[2].settings.variants == 2


def test_unknown_option_is_named_with_a_suggestion():
    recipe = load_recipe("back-speech", profile="tiny", sets=["filter_paraphrase.max_edit_ration=0.3"])
    expected = r"stages\.filter_paraphrase: max_edit_ration.*did you mean 'max_edit_ratio'"
    with pytest.raises(ConfigError, match=expected):
        build_plan(recipe, check_models=False)


def test_unknown_recipe_key_and_unknown_stage_fail():
    with pytest.raises(ConfigError, match="multipel"):
        load_recipe("back-speech", sets=["multipel=3"])
    with pytest.raises(ConfigError, match="does not have"):
        load_recipe("back-speech", sets=["transcriber.variants=2"])
    with pytest.raises(ConfigError, match="did you mean 'back-speech'"):
        load_recipe("back-speach")


def test_set_values_are_yaml_scalars():
    overlay = parse_set(["a.b=0.5", "a.c=true", "seed=7", "a.d=[1, 2]"])
    assert overlay == {"stages": {"a": {"b": 0.5, "c": True, "d": [1, 2]}}, "seed": 7}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["novalue"])


def test_a_field_no_stage_produces_is_caught_before_models_load(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(
        "name: broken\ntag: br\ninput: [text]\noutput: {text: transcript}\n"
        "stages:\n  - stage: filter_paraphrase\n"
    )
    with pytest.raises(ConfigError, match=r"filter_paraphrase needs \['transcript'\]"):
        build_plan(load_recipe(str(path), profile=None), check_models=False)
