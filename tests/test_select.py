"""Base-model selection on two tiny random models of different size: the choice, the recipe layer,
the report and MLflow run, reruns, and candidates that cannot be used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import enter_workspace
from factory.cli import app
from factory.paths import Paths
from factory.recipe import load_recipe
from factory.select import Candidate, SelectError, choose, select, write_base_model

ROOT = Path(__file__).resolve().parents[1]
TASK = "intent"
LABELS = ["refund", "shipping"]
FAST = ("max_train_samples=16", "batch_size=4", "max_eval_samples=6", "max_new_tokens=6", "save_steps=1000",
        "eval_batch_size=8")


@pytest.fixture(scope="module")
def larger_model_dir(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """A second tiny random Llama with the same tokenizer, wider and deeper (about 4x the non-embedding size)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 128, 256, 3
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("larger-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, out / name)
    return out


def _workspace(root: Path) -> tuple[Paths, Path, dict]:
    """A classification task in the layout `factory mine` writes, the shipped base recipes, a task layer."""
    rows = [{"id": f"r{i}", "source_id": f"s{i}",
             "messages": [{"role": "system", "content": "Label the request: refund or shipping."},
                          {"role": "user", "content": f"{'Money back' if i % 2 else 'Where is'} order {i}?"}],
             "output": {"content": LABELS[i % 2], "tool_calls": []}} for i in range(24)]
    folder = root / "datasets" / TASK / "v1"
    folder.mkdir(parents=True)
    for split, part in (("train", rows[:16]), ("validation", rows[16:22]), ("test", rows[22:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    recipes = root / "recipes"
    shutil.copytree(ROOT / "recipes" / "base", recipes / "base")
    (recipes / "tasks").mkdir()
    (recipes / "tasks" / f"{TASK}.yaml").write_text("# intents: short answers\nmax_new_tokens: 6\n"
                                                    "base_model: some/old-base  # before selection\n")
    entry = {"status": "ready", "dataset_version": "v1", "kind": "classification",
             "output_schema": {"labels": LABELS}}
    catalog = {"tasks": {TASK: {**entry, "signature": {"agent": "a", "step": TASK, "template": "t", "tools": []}}}}
    (root / "datasets" / "tasks.yaml").write_text(yaml.safe_dump(catalog))
    return Paths(root / "datasets", root / "registry", root / "reports"), recipes, entry


def _row(name: str, parameters: int, score: float, speed: float = 10.0) -> Candidate:
    return Candidate(name, parameters, score, 1.0, 6, speed, 100.0, 1.0, 1.0, "run", "adapter")


def test_choice_is_the_cheapest_candidate_that_reaches_the_target():
    small, large, huge = _row("small", 10, 0.50), _row("large", 40, 0.90), _row("huge", 90, 0.95)
    assert choose([huge, large, small], 0.80) == (large, True)  # small misses the target
    assert choose([huge, large, small], 0.40) == (small, True)
    assert choose([huge, large, small], 0.99) == (huge, False)  # none reaches it: the best score
    tie = _row("large-but-faster", 40, 0.90, speed=20.0)
    assert choose([large, tie], 0.80) == (tie, True)  # same size: the faster generation
    with pytest.raises(SelectError):
        choose([], 0.5)


def test_select_trains_both_candidates_keeps_the_smaller_and_writes_the_recipe_layer(
        tmp_path, tiny_model_dir, larger_model_dir, tracking):
    paths, recipes, entry = _workspace(tmp_path)
    names = [str(larger_model_dir), str(tiny_model_dir)]
    result = select(TASK, entry, paths, names, overrides=FAST, steps=2, target=0.0, recipes_dir=recipes)

    rows = {r["name"]: r for r in result["candidates"]}
    assert list(rows) == names
    assert rows[str(tiny_model_dir)]["parameters"] < rows[str(larger_model_dir)]["parameters"]
    assert all(r["n_validation"] == 6 and 0 <= r["score"] <= 1 and r["generation_tokens_per_s"] > 0
               for r in rows.values())
    assert result["chosen"] == str(tiny_model_dir) and result["reached"] is True
    # each candidate is a real training run of its own base
    assert {Path(r["adapter_dir"]).parent for r in rows.values()} == \
        {p.parent for p in (paths.registry / "training" / TASK).glob("*/adapter")}

    # the recipe layer: base_model replaced, other keys and comments kept, and the recipe loads with it
    text = (recipes / "tasks" / f"{TASK}.yaml").read_text()
    assert "# intents: short answers" in text and "some/old-base" not in text
    assert yaml.safe_load(text) == {"max_new_tokens": 6, "base_model": str(tiny_model_dir)}
    assert load_recipe(TASK, recipes_dir=recipes)[0].base_model == str(tiny_model_dir)

    assert "**(chosen)**" in (paths.reports / TASK / "select.md").read_text()
    assert (paths.reports / TASK / "select.png").read_bytes()[:4] == b"\x89PNG"
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.data.params["chosen"] == str(tiny_model_dir) and run.data.tags["stage"] == "select"
    assert len([k for k in run.data.metrics if k.endswith(".score")]) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "select")}
    assert {"select/candidates.json", "select/select.md", "select/select.png"} <= artifacts

    # a rerun (the same candidates, from the recipe's `candidates:` this time) returns the stored result:
    # no training, no new select run
    again = select(TASK, entry, paths, None, overrides=(*FAST, f"candidates=[{','.join(names)}]"), steps=2,
                   target=0.0, recipes_dir=recipes)
    assert again == result
    select_runs = client.search_runs([run.info.experiment_id], "tags.stage = 'select'")
    assert len(select_runs) == 1


def test_unknown_candidates_fail_naming_them_before_anything_trains(tmp_path, tiny_model_dir, tracking):
    paths, recipes, entry = _workspace(tmp_path)
    for bad in ("embedded:no-such-model", "nobody/not-in-the-hf-cache", str(tmp_path / "missing-folder")):
        with pytest.raises(SelectError, match="candidate") as err:
            select(TASK, entry, paths, [str(tiny_model_dir), bad], overrides=FAST, steps=2, recipes_dir=recipes)
        assert bad in str(err.value)
    assert "embedded:smollm2-135m-instruct" in str(
        pytest.raises(SelectError, select, TASK, entry, paths, ["embedded:no-such-model"], overrides=FAST,
                      recipes_dir=recipes).value)  # the error lists the known embedded models
    assert not (paths.registry / "training").exists()
    with pytest.raises(SelectError, match="no candidates"):  # none given, and the recipe's list emptied
        select(TASK, entry, paths, [], overrides=(*FAST, "candidates=[]"), recipes_dir=recipes)


def test_the_recipe_layer_is_created_or_appended_and_a_broken_one_is_named(tmp_path):
    recipes = tmp_path / "recipes"
    path = write_base_model("fresh", "embedded:gemma-3-270m", recipes)
    assert yaml.safe_load(path.read_text()) == {"base_model": "embedded:gemma-3-270m"}
    other = recipes / "tasks" / "other.yaml"
    other.write_text("lora:\n  r: 8\n")
    write_base_model("other", "embedded:smollm2-135m-instruct", recipes)
    assert yaml.safe_load(other.read_text()) == {"lora": {"r": 8}, "base_model": "embedded:smollm2-135m-instruct"}
    (recipes / "tasks" / "broken.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        write_base_model("broken", "x", recipes)


def test_the_cli_names_an_unknown_candidate_and_exits_1(tmp_path, monkeypatch, tiny_model_dir):
    from typer.testing import CliRunner

    _workspace(enter_workspace(tmp_path, monkeypatch))
    result = CliRunner().invoke(app, ["select", TASK, "--candidates", f"{tiny_model_dir},embedded:no-such-model"])
    assert result.exit_code == 1
    assert "candidate 'embedded:no-such-model' cannot be used" in result.output
    assert "embedded:gemma-3-270m" in result.output  # the known embedded models are listed
    assert not (tmp_path / "registry" / "training").exists()


def test_finetune_with_select_base_registers_the_base_select_chose_when_the_first_misses(
        tmp_path, monkeypatch, tiny_model_dir, larger_model_dir, tracking):
    """`select_base: true`: a random base misses the target, so `finetune` runs `factory select` over the
    candidates and the version it registers is trained on the chosen base."""
    from factory.pipeline import finetune

    paths, recipes, _ = _workspace(tmp_path)
    entry = yaml.safe_load((paths.data / "tasks.yaml").read_text())["tasks"][TASK]
    enter_workspace(tmp_path, monkeypatch)
    names = f"candidates=[{larger_model_dir},{tiny_model_dir}]"
    done = finetune(TASK, entry, paths, overrides=(*FAST, "select_base=true", names, f"base_model={larger_model_dir}"))
    chosen = json.loads((paths.reports / TASK / "select.json").read_text())["chosen"]
    assert done.trained.base_model == chosen and done.version.tags["base_model"] == chosen
