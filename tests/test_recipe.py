"""Recipe schema, layering and the shipped recipes and launch configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from factory.recipe import RecipeError, accelerate_config, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    (tmp_path / "base").mkdir()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "base" / "small.yaml").write_text("base_model: some/model\nlearning_rate: 0.1\nlora:\n  r: 4\n")
    return tmp_path


def _error(**kwargs) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(**kwargs)
    return str(err.value)


def test_wrong_type_names_file_and_field(recipes):
    (recipes / "tasks" / "t.yaml").write_text("lora:\n  r: many\n")
    message = _error(task="t", recipe="small", recipes_dir=recipes)
    assert str(recipes / "tasks" / "t.yaml") in message and "lora.r" in message


def test_unknown_key_names_file_and_field(recipes):
    (recipes / "base" / "typo.yaml").write_text("base_model: some/model\nlearning_rat: 0.1\n")
    message = _error(recipe="typo", recipes_dir=recipes)
    assert str(recipes / "base" / "typo.yaml") in message and "learning_rat" in message


def test_missing_base_model_names_file_and_field(recipes):
    (recipes / "base" / "nobase.yaml").write_text("learning_rate: 0.1\n")
    message = _error(recipe="nobase", recipes_dir=recipes)
    assert str(recipes / "base" / "nobase.yaml") in message and "base_model" in message


def test_bad_override_names_the_command_line(recipes):
    message = _error(recipe="small", overrides=["lora.r=-1"], recipes_dir=recipes)
    assert message.startswith("command line: lora.r")
    assert "key=value" in _error(recipe="small", overrides=["lora.r"], recipes_dir=recipes)


def test_unknown_optimizer_and_scheduler_are_rejected(recipes):
    assert "optimizer" in _error(recipe="small", overrides=["optimizer=adamw_turbo"], recipes_dir=recipes)
    assert "lr_scheduler" in _error(recipe="small", overrides=["lr_scheduler=sawtooth"], recipes_dir=recipes)


def test_override_precedence_base_then_task_then_command_line(recipes):
    recipe, _ = load_recipe("t", "small", [], recipes)
    assert recipe.learning_rate == 0.1 and recipe.lora.r == 4  # no task file: the base alone
    (recipes / "tasks" / "t.yaml").write_text("learning_rate: 0.2\nlora:\n  alpha: 64\n")
    recipe, raw = load_recipe("t", "small", [], recipes)
    assert recipe.learning_rate == 0.2
    assert (recipe.lora.r, recipe.lora.alpha) == (4, 64)  # sections merge key by key
    recipe, raw = load_recipe("t", "small", ["learning_rate=0.3", "lora.r=8"], recipes)
    assert (recipe.learning_rate, recipe.lora.r, recipe.lora.alpha) == (0.3, 8, 64)
    assert raw["learning_rate"] == 0.3
    other, _ = load_recipe("other-task", "small", [], recipes)
    assert other.learning_rate == 0.1


def test_extends_layers_a_base_recipe_on_another(recipes):
    (recipes / "base" / "child.yaml").write_text("extends: small\nlearning_rate: 0.5\n")
    recipe, _ = load_recipe(None, "child", [], recipes)
    assert (recipe.base_model, recipe.learning_rate, recipe.lora.r) == ("some/model", 0.5, 4)
    (recipes / "base" / "a.yaml").write_text("extends: b\n")
    (recipes / "base" / "b.yaml").write_text("extends: a\n")
    assert "cycle" in _error(recipe="a", recipes_dir=recipes)
    assert "no such recipe" in _error(recipe="missing", recipes_dir=recipes)


def test_digest_ignores_evaluation_and_speed_settings(recipes):
    a, _ = load_recipe(None, "small", [], recipes)
    b, _ = load_recipe(None, "small", ["max_new_tokens=7", "torch_threads=1"], recipes)
    c, _ = load_recipe(None, "small", ["lora.r=8"], recipes)
    assert a.digest() == b.digest() != c.digest()


@pytest.mark.parametrize("path", sorted((RECIPES / "base").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    recipe, _ = load_recipe(None, path.stem, [], RECIPES)
    if recipe.method == "qlora":
        assert recipe.quantization.quant_type == "nf4" and recipe.quantization.double_quant
    if recipe.distributed != "none":
        assert accelerate_config(recipe, RECIPES).exists()


def test_shipped_recipes_cover_the_issue():
    names = {p.stem for p in (RECIPES / "base").glob("*.yaml")}
    assert {"cpu-lora", "qlora-7b", "qlora-7b-llama", "qlora-7b-mistral", "lora-8b-zero3"} <= names
    bases = {load_recipe(None, n, [], RECIPES)[0].base_model for n in names}
    assert {"Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
            "mistralai/Mistral-7B-Instruct-v0.3"} <= bases


@pytest.mark.parametrize("backend", ["ddp", "deepspeed_zero2", "deepspeed_zero3"])
def test_shipped_accelerate_configs(backend):
    recipe, _ = load_recipe(None, "cpu-lora", [f"distributed={backend}"], RECIPES)
    config = yaml.safe_load(accelerate_config(recipe, RECIPES).read_text())
    if backend == "ddp":
        assert config["distributed_type"] == "MULTI_GPU"
        return
    assert config["distributed_type"] == "DEEPSPEED"
    ds_file = ROOT / config["deepspeed_config"]["deepspeed_config_file"]
    stage = int(backend[-1])
    assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == stage
    assert ds_file.name == f"zero{stage}.json"


def test_no_accelerate_config_without_a_backend():
    recipe, _ = load_recipe(None, "cpu-lora", [], RECIPES)
    with pytest.raises(RecipeError):
        accelerate_config(recipe, RECIPES)
