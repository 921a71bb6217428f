"""The registry through the CLI: versions, gates, aliases, rollback, routes and exports, fresh-process load.

One module-scoped workspace (a synthetic classification task, the tiny random model,
the embedded sqlite store) holds three versions of one task: v1 trained, evaluated
and registered through the CLI on dataset version A; v2 (dataset A) and v3 (dataset B,
after more logs were mined) registered with `registry.register` from runs of their own
that carry v1's adapter (registration never retrains, and training twice more would
triple the module's time). Every test first sets the aliases it needs, so the tests do
not depend on their order. The tiny model scores ~0 against a teacher scoring 1, so the
teacher-share gate refuses it by default; tests that need a pass lower --min-teacher-share.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from factory.cli import app
from factory.records import Record, content_id, to_table
from factory.registry import HISTORY_TAG, ROUTING_FILE, version_routing
from conftest import enter_workspace

ROOT = Path(__file__).resolve().parents[1]
TASK = "classify-intent"
LABELS = ("billing", "shipping", "refund")
SYSTEM = "You sort customer support messages. Reply with exactly one label: billing, shipping or refund."
WORDS = {"billing": "my invoice shows a double charge", "shipping": "where is my parcel, tracking is stuck",
         "refund": "I returned the item and want my money back"}


def write_records(data_dir: Path, n: int) -> None:
    """`n` curated records of one classification task (what `factory curate` would leave)."""
    records = []
    for i in range(n):
        label = LABELS[i % 3]
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Ticket from customer: {WORDS[label]} (order {1000 + i})"}]
        records.append(Record(id=content_id(messages, [], label, []), source="openai", location=f"synthetic:{i}",
                              messages=messages, source_id=f"call-{i}", agent="support", step="classify_intent",
                              timestamp=f"2026-11-03T{9 + i // 60:02d}:{i % 60:02d}:00Z", session_id=f"s-{i}",
                              model="teacher", output_text=label))
    path = data_dir / "records" / "curated.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table(records), path)


def recipe_args(tiny_model_dir: Path, seed: int) -> list[str]:
    return ["--recipe", str(ROOT / "recipes" / "base" / "cpu-lora.yaml"), "--set", f"base_model={tiny_model_dir}",
            "--set", "max_train_samples=16", "--set", "max_eval_samples=6", "--set", "max_new_tokens=8",
            "--set", "save_steps=1000", "--set", f"seed={seed}"]


def cli(*args: str, ok: bool = True):
    result = CliRunner().invoke(app, list(args))
    if ok:
        assert result.exit_code == 0, result.output
    result.text = " ".join(result.output.split())  # rich wraps long lines
    return result


def dataset_version(data_dir: Path) -> str:
    import yaml

    return yaml.safe_load((data_dir / "tasks.yaml").read_text())["tasks"][TASK]["dataset_version"]


def another_version(root: Path, recipe_overrides: list[str], **changes):
    """Register v1's adapter again from a new run of the task's experiment, as a different training would."""
    import mlflow
    import yaml

    from factory.recipe import load_recipe
    from factory.registry import register
    from factory.train import TrainResult

    trained = TrainResult(**json.loads(next((root / "registry" / "training" / TASK).glob("*/train.json")).read_text()))
    evaluation = json.loads((root / "reports" / TASK / "eval.json").read_text())
    experiment = mlflow.get_run(trained.run_id).info.experiment_id
    with mlflow.start_run(experiment_id=experiment, run_name=f"train-{TASK}") as run:
        mlflow.log_artifacts(trained.adapter_dir, "adapter")
    trained = dataclasses.replace(trained, run_id=run.info.run_id, **changes)
    entry = yaml.safe_load((root / "datasets" / "tasks.yaml").read_text())["tasks"][TASK]
    recipe, _ = load_recipe(TASK, str(ROOT / "recipes" / "base" / "cpu-lora.yaml"), recipe_overrides)
    return register(entry, trained, {**evaluation, "run_id": trained.run_id}, recipe)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir):
    """The workspace with v1, v2 (dataset A) and v3 (dataset B) registered; yields its paths."""
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as mp:
        enter_workspace(root, mp)
        write_records(root / "datasets", 60)
        cli("mine", "--min-examples", "20")
        first = dataset_version(root / "datasets")
        refused = cli("register", TASK, *recipe_args(tiny_model_dir, 0), ok=False)
        assert refused.exit_code == 1 and f"run `factory train {TASK}` first" in refused.text
        cli("train", TASK, *recipe_args(tiny_model_dir, 0))
        cli("register", TASK, *recipe_args(tiny_model_dir, 0))
        again = cli("register", TASK, *recipe_args(tiny_model_dir, 0)).text  # the same training run
        overrides = [a for a in recipe_args(tiny_model_dir, 1) if a.startswith(("base_model", "max_", "save", "seed"))]
        another_version(root, overrides, recipe_digest="seed-1")
        write_records(root / "datasets", 90)
        cli("mine", "--min-examples", "20")
        second = dataset_version(root / "datasets")
        another_version(root, overrides, dataset_version=second, recipe_digest="seed-1")
        yield {"root": root, "data": root / "datasets", "registry": root / "registry",
               "dataset_a": first, "dataset_b": second, "tiny": tiny_model_dir,
               "registered_again": again}


def set_aliases(champion: str | None, challenger: str, history: list[str] = ()) -> MlflowClient:
    client = MlflowClient()
    client.set_registered_model_alias(TASK, "challenger", challenger)
    if champion is None:
        client.delete_registered_model_alias(TASK, "champion")
    else:
        client.set_registered_model_alias(TASK, "champion", champion)
    client.set_registered_model_tag(TASK, HISTORY_TAG, json.dumps(list(history)))
    return client


def champion_version(client: MlflowClient) -> str | None:
    try:
        return str(client.get_model_version_by_alias(TASK, "champion").version)
    except Exception:
        return None


def test_versions_carry_tags_routing_artifact_signature_and_input_example(ws):
    import mlflow

    client = MlflowClient()
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{TASK}'")}
    assert sorted(versions) == ["1", "2", "3"]
    assert [versions[v].tags["dataset_version"] for v in ("1", "2", "3")] == [ws["dataset_a"]] * 2 + [ws["dataset_b"]]
    tags = versions["1"].tags
    for key in ("kind", "recipe_digest", "base_model", "score", "teacher_score", "threshold", "coverage",
                "metric.specialist.macro_f1", "escalation_target", "n_test"):
        assert key in tags, key
    assert tags["base_digest"].startswith("sha256:") and len(tags["base_digest"]) == 71
    assert tags["kind"] == "classification" and tags["base_model"] == str(ws["tiny"])
    assert versions["1"].tags["recipe_digest"] != versions["2"].tags["recipe_digest"]

    routing = version_routing(TASK, "1")
    assert routing["task"] == TASK and routing["signature"]["step"] == "classify_intent"
    assert set(routing["output_schema"]["labels"]) == set(LABELS)
    assert routing["escalation_target"] == "upstream" and routing["base_digest"] == tags["base_digest"]
    assert json.loads(tags["routing"]) == {k: v for k, v in routing.items() if k != "example"}
    assert routing["example"]["messages"][0] == {"role": "system", "content": SYSTEM}
    files = {Path(f.path).name for f in mlflow.artifacts.list_artifacts(f"models:/{TASK}/1")}
    assert ROUTING_FILE in files and "MLmodel" in files
    info = mlflow.models.get_model_info(f"models:/{TASK}/1")
    assert info.signature.inputs.input_names() == ["messages", "tools"]
    assert info.saved_input_example_info is not None
    adapter = [Path(f.path).name for f in mlflow.artifacts.list_artifacts(f"models:/{TASK}/1/artifacts/adapter")]
    assert "adapter_config.json" in adapter and not any(n.startswith("model") for n in adapter)


def test_registering_the_same_run_twice_keeps_one_version(ws):
    client = MlflowClient()
    run_id = client.get_model_version(TASK, "1").run_id
    assert "registered classify-intent v1" in ws["registered_again"]
    assert [str(v.version) for v in client.search_model_versions(f"name='{TASK}' and run_id='{run_id}'")] == ["1"]
    assert len(client.search_model_versions(f"name='{TASK}'")) == 3


def test_gate_refuses_a_challenger_under_the_teacher_share(ws):
    client = set_aliases(None, "1")
    result = cli("promote", TASK, ok=False)
    assert result.exit_code == 1
    assert "under 80% of the teacher's" in result.text and "not promoted" in result.text
    assert champion_version(client) is None


def test_gate_passes_then_refuses_a_challenger_below_the_champion(ws):
    client = set_aliases(None, "1")
    cli("promote", TASK, "--min-teacher-share", "0")
    assert champion_version(client) == "1"
    assert json.loads(client.get_registered_model(TASK).tags[HISTORY_TAG]) == ["1"]

    score = client.get_model_version(TASK, "1").tags["score"]
    client.set_model_version_tag(TASK, "1", "score", "0.9")  # a strong champion on the same test set
    try:
        client.set_registered_model_alias(TASK, "challenger", "2")
        refused = cli("promote", TASK, "--min-teacher-share", "0", ok=False)
        assert refused.exit_code == 1 and "below the champion's 0.900" in refused.text
        assert f"recorded, both on dataset {ws['dataset_a']}" in refused.text
        assert champion_version(client) == "1"
        cli("promote", TASK, "--min-teacher-share", "0", "--tolerance", "1")
        assert champion_version(client) == "2"
    finally:
        client.set_model_version_tag(TASK, "1", "score", score)


def test_champion_is_rescored_on_the_challengers_test_split_when_datasets_differ(ws):
    client = set_aliases("1", "3")
    refused = cli("promote", TASK, "--min-teacher-share", "0", "--tolerance", "-1", ok=False)
    assert "both re-scored on" in refused.text and f"of dataset {ws['dataset_b']}" in refused.text
    keys = {v: {k: t for k, t in client.get_model_version(TASK, v).tags.items() if k.startswith("gate_score.")}
            for v in ("1", "3")}
    assert len(keys["1"]) == 1 and keys["1"].keys() == keys["3"].keys()
    assert next(iter(keys["1"])).startswith(f"gate_score.{ws['dataset_b']}.")
    cli("promote", TASK, "--min-teacher-share", "0", "--tolerance", "1")  # cached scores: no re-scoring
    assert champion_version(client) == "3"


def test_force_records_who_and_why(ws):
    client = set_aliases("1", "2", ["1"])
    without_reason = cli("promote", TASK, "--force", ok=False)
    assert "--force needs --reason" in without_reason.text
    cli("promote", TASK, "--force", "--reason", "hotfix for ticket 42")
    assert champion_version(client) == "2"
    tags = client.get_model_version(TASK, "2").tags
    assert tags["forced_by"] == getpass.getuser() and tags["forced_reason"] == "hotfix for ticket 42"
    assert "teacher" in tags["forced_over"]


def test_rollback_returns_to_the_previous_champion(ws):
    client = set_aliases(None, "1")
    cli("promote", TASK, "--min-teacher-share", "0")
    client.set_registered_model_alias(TASK, "challenger", "2")
    cli("promote", TASK, "--force", "--reason", "try v2")
    client.set_registered_model_alias(TASK, "champion", "3")  # moved by hand in the UI
    result = cli("rollback", TASK, "--reason", "v3 misroutes")
    assert "from v3 to v2" in result.text and champion_version(client) == "2"
    assert client.get_model_version(TASK, "2").tags["rolled_back_to_reason"] == "v3 misroutes"
    cli("rollback", TASK)
    assert champion_version(client) == "1"
    last = cli("rollback", TASK, ok=False)
    assert "no previous champion" in last.text and champion_version(client) == "1"


def test_routes_follow_an_alias_moved_by_hand_and_export_for_vllm_and_lorax(ws):
    client = set_aliases("1", "3")
    client.set_registered_model_alias(TASK, "champion", "2")  # as the MLflow UI does
    cli("routes", "--export", "vllm", "--export", "lorax")
    route = json.loads((ws["registry"] / "routes.json").read_text())["tasks"][TASK]
    adapter = ws["registry"] / "adapters" / TASK / "v2"
    assert route["version"] == "2" and route["model_uri"] == f"models:/{TASK}@champion"
    assert route["adapter_path"] == str(adapter.resolve()) and (adapter / "adapter_config.json").exists()
    assert route["base_model"] == str(ws["tiny"]) and route["signature"]["step"] == "classify_intent"
    assert "threshold" in route and route["escalation_target"] == "upstream" and "example" not in route

    script = (ws["registry"] / "exports" / "vllm.sh").read_text()
    assert f"vllm serve {ws['tiny']} --port 8000 --enable-lora --max-lora-rank 16 --max-loras 1 " \
           f"--lora-modules {TASK}={adapter.resolve()}" in script
    request = json.loads((ws["registry"] / "exports" / "vllm-requests.json").read_text())[TASK]
    assert request["body"]["model"] == TASK and request["body"]["prompt"].startswith("<|im_start|>system\n" + SYSTEM)
    lorax = json.loads((ws["registry"] / "exports" / "lorax.json").read_text())
    assert lorax["adapters"][TASK] == {"base": str(ws["tiny"]), "adapter_id": str(adapter.resolve()),
                                      "adapter_source": "local"}
    assert lorax["requests"][TASK]["body"]["parameters"]["adapter_source"] == "local"

    client.set_registered_model_alias(TASK, "champion", "3")
    cli("routes")
    assert json.loads((ws["registry"] / "routes.json").read_text())["tasks"][TASK]["version"] == "3"
    assert (ws["registry"] / "adapters" / TASK / "v3" / "adapter_config.json").exists()


def test_unknown_export_is_refused(ws):
    result = cli("routes", "--export", "tgi", ok=False)
    assert "unknown export tgi; known: llamacpp, lorax, vllm" in result.text


def test_champion_pyfunc_loads_and_predicts_in_a_fresh_process(ws):
    set_aliases("1", "1")
    code = ("import json, mlflow, pandas as pd; "
            f"m = mlflow.pyfunc.load_model('models:/{TASK}@champion'); "
            "msgs = [{'role': 'system', 'content': sys.argv[1]}, {'role': 'user', 'content': 'charged twice'}]; "
            "out = m.predict(pd.DataFrame({'messages': [json.dumps(msgs)]})); "
            "print('RESULT', json.dumps(out.to_dict(orient='records')))")
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", "import sys; " + code, SYSTEM], capture_output=True, text=True,
                          env=env, cwd=ws["root"], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.split("RESULT", 1)[1])
    assert len(rows) == 1 and set(rows[0]) == {"content", "tool_calls", "confidence", "escalate"}
    assert 0.0 <= rows[0]["confidence"] <= 1.0 and isinstance(rows[0]["escalate"], bool)
