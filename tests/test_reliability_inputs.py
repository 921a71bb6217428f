"""Reliability against hostile input: 10k malformed log lines, random recipes, and
task names or recipe paths that try to leave their folders."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from factory.cli import app

from factory.ingest import ingest
from factory.recipe import Recipe, RecipeError, load_recipe
from reliability import malformed
from reliability.workspace import env_for


def test_ten_thousand_malformed_lines_are_quarantined_and_the_good_ones_kept(tmp_path, capsys):
    log = tmp_path / "fuzz.jsonl"
    bad, good = malformed.write(log, bad=10_000, good_every=5, seed=0)
    stats = ingest([log], tmp_path / "records", tmp_path / "quarantine")
    assert (stats.quarantined, stats.accepted, stats.duplicates, stats.skipped) == (bad, good, 0, 0), stats.reasons
    assert sum(pq.read_metadata(p).num_rows for p in (tmp_path / "records").glob("*.parquet")) == good
    assert sum(len(p.read_bytes().splitlines()) for p in (tmp_path / "quarantine").glob("*.jsonl")) == bad
    with capsys.disabled():
        print(f"\nmalformed lines: {bad} quarantined of {bad}, good lines kept: {good} of {good}, "
              f"reasons: {len(stats.reasons)}")


FIELDS = sorted(Recipe.model_fields) + ["lora", "quantization", "r", "alpha", "include", "../x"]
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5),
                                                                inner, max_size=4),
    max_leaves=12)
mappings = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layer=mappings, raw=st.one_of(st.none(), st.binary(max_size=60)),
       overrides=st.lists(st.text(max_size=20), max_size=3))
def test_random_recipes_raise_only_recipe_error(tmp_path, layer, raw, overrides):
    path = tmp_path / "random.yaml"
    if raw is None:
        path.write_text(yaml.safe_dump({"base_model": "x", **layer}))
    else:
        path.write_bytes(raw)
    try:
        recipe, _ = load_recipe(None, str(path), overrides)
    except RecipeError as err:
        assert str(err)
    else:
        assert isinstance(recipe, Recipe)


def test_a_recipe_file_that_is_not_utf8_is_a_recipe_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("base_model: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="latin1.yaml"):
        load_recipe(None, str(path))


def test_an_override_that_is_not_yaml_is_a_recipe_error(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base_model: x\n")
    with pytest.raises(RecipeError, match="learning_rate"):
        load_recipe(None, str(path), ['learning_rate="'])


# --- path safety ------------------------------------------------------------------------------


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Path:
    """An empty workspace (the current directory) inside `tmp_path`, so writes outside it show."""
    ws = tmp_path / "ws"
    (ws / "datasets").mkdir(parents=True)
    for name, value in env_for(ws).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ws)
    return ws


def _factory(*args: str):
    """Run the CLI in-process; returns (exit code, output, the exception that escaped or None)."""
    result = CliRunner().invoke(app, list(args))
    escaped = None if isinstance(result.exception, SystemExit) else result.exception
    return result.exit_code, result.output, escaped


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


CATALOG = {"tasks": {"classify-intent": {"kind": "classification", "size": 3, "status": "ready",
                                         "dataset_version": "abc", "signature": {"agent": "a", "step": "s"}}}}


@pytest.mark.parametrize("command", ["finetune", "train", "eval", "register"])
@pytest.mark.parametrize("task", ["../../etc", "../outside", "/tmp/abs", "a/../../b"])
def test_a_task_name_cannot_leave_its_folder(ws, command, task):
    (ws / "datasets" / "tasks.yaml").write_text(yaml.safe_dump(CATALOG))
    before = _tree(ws.parent)
    code, output, escaped = _factory(command, task)
    assert code == 1 and escaped is None, output
    assert "unknown task" in output and task in output
    assert _tree(ws.parent) == before, "the command wrote files"


@pytest.mark.parametrize("hostile", ["../../etc", "a/b", ".."])
def test_a_hostile_task_name_in_the_catalog_is_a_clear_error_naming_the_file(ws, hostile):
    catalog = {"tasks": {hostile: CATALOG["tasks"]["classify-intent"]}}
    (ws / "datasets" / "tasks.yaml").write_text(yaml.safe_dump(catalog))
    code, output, escaped = _factory("finetune", hostile)
    assert escaped is None, f"{type(escaped).__name__}: {escaped}"
    assert code == 1 and "tasks.yaml" in output and "invalid task name" in output, output


def test_a_task_recipe_cannot_be_read_from_outside_recipes_tasks(tmp_path):
    recipes = tmp_path / "recipes"
    (recipes / "base").mkdir(parents=True)
    (recipes / "tasks").mkdir()
    (recipes / "base" / "cpu-lora.yaml").write_text("base_model: x\n")
    (tmp_path / "evil.yaml").write_text("learning_rate: 123.0\n")
    with pytest.raises((RecipeError, ValueError), match="task"):
        load_recipe("../../evil", "cpu-lora", [], recipes_dir=recipes)
