"""Registry: specialists as MLflow model versions, promoted by alias through quality gates.

Each version is a pyfunc model that loads base + adapter and answers chat requests
(a DataFrame with a `messages` column of JSON strings and an optional `tools`
column). Only the adapter and the routing metadata are stored; the base is
referenced by name (resolved on load, so the embedded default works anywhere the
package is installed). The registered model is named after the task.

Aliases: every new version becomes `challenger`; `champion` moves only when the
gates pass (not worse than the champion by more than `tolerance`, and at least
`min_teacher_share` of the teacher's score) unless forced, in which case who and
why are recorded as tags. `write_routes` follows whatever the aliases say, so a
champion moved by hand in the MLflow UI is honoured.
"""

from __future__ import annotations

import getpass
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from factory.mine import write_atomic
from factory.recipe import Recipe
from factory.train import TrainResult, resume_run

TASK_TAG = "factory.task"
PACKAGE_DIR = Path(__file__).resolve().parent

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "messages"), ColSpec("string", "tools", required=False)]),
    outputs=Schema([ColSpec("string", "content"), ColSpec("string", "tool_calls"),
                    ColSpec("double", "confidence"), ColSpec("boolean", "escalate")]),
)


class SpecialistModel(mlflow.pyfunc.PythonModel):
    """Base + LoRA adapter answering chat requests, with confidence and an escalate flag."""

    def load_context(self, context):
        from factory.base_model import resolve_base
        from factory.train import load_specialist

        self.routing = json.loads(Path(context.artifacts["routing"]).read_text())
        self.model, self.tokenizer = load_specialist(resolve_base(self.routing["base_model"]),
                                                     context.artifacts["adapter"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from factory.evaluate.generate import generate
        from factory.train import parse_output, render_prompt

        def load(value):
            return json.loads(value) if isinstance(value, str) else (value or [])

        tools = model_input["tools"] if "tools" in model_input else [None] * len(model_input)
        prompts = [render_prompt(self.tokenizer, load(m), load(t)) for m, t in zip(model_input["messages"], tools)]
        threshold = self.routing["threshold"]
        rows = []
        for gen in generate(self.model, self.tokenizer, prompts, self.routing["max_new_tokens"]):
            output = parse_output(gen.text)
            rows.append({"content": output["content"], "tool_calls": json.dumps(output["tool_calls"]),
                         "confidence": gen.confidence,
                         "escalate": threshold is None or gen.confidence < threshold})
        return pd.DataFrame(rows)


@dataclass(frozen=True)
class Gates:
    tolerance: float = 0.01
    min_teacher_share: float = 0.9


def routing_metadata(entry: dict[str, Any], trained: TrainResult, evaluation: dict[str, Any],
                     recipe: Recipe, escalation_target: str) -> dict[str, Any]:
    cal = evaluation["calibration"]
    threshold = cal["threshold"] if cal["threshold"] not in (None, float("inf")) else None
    return {
        "task": trained.task, "kind": trained.kind, "signature": entry["signature"],
        "output_schema": entry["output_schema"], "threshold": threshold, "coverage": cal["coverage"],
        "escalation_target": escalation_target, "base_model": trained.base_model,
        "max_new_tokens": recipe.max_new_tokens, "dataset_version": trained.dataset_version,
    }


def register(entry: dict[str, Any], trained: TrainResult, evaluation: dict[str, Any], recipe: Recipe,
             gates: Gates = Gates(), escalation_target: str = "upstream") -> tuple[Any, bool]:
    """Register the trained run as a version (once per run), alias it `challenger`, try to promote it.

    Returns (model version, promoted).
    """
    client = MlflowClient()
    name = trained.task
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, tags={TASK_TAG: name}, description=entry.get("description", ""))
    existing = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == trained.run_id]
    if existing:
        return existing[0], False
    routing = routing_metadata(entry, trained, evaluation, recipe, escalation_target)
    columns = evaluation["columns"]
    with tempfile.TemporaryDirectory() as tmp, resume_run(trained.run_id):
        routing_path = Path(tmp) / "routing.json"
        routing_path.write_text(json.dumps(routing, indent=2))
        info = mlflow.pyfunc.log_model(
            name="specialist", python_model=SpecialistModel(), code_paths=[str(PACKAGE_DIR)],
            artifacts={"adapter": trained.adapter_dir, "routing": str(routing_path)},
            signature=SIGNATURE, pip_requirements=["torch", "transformers", "peft", "mlflow", "pandas"],
        )
        version = mlflow.register_model(info.model_uri, name, tags={
            TASK_TAG: name, "kind": trained.kind, "dataset_version": trained.dataset_version,
            "recipe_digest": trained.recipe_digest, "base_model": trained.base_model,
            "score": str(columns["specialist"]["score"]), "teacher_score": str(columns["teacher"]["score"]),
            "base_score": str(columns["base"]["score"]), "threshold": str(routing["threshold"]),
            "coverage": str(routing["coverage"]), "run_id": trained.run_id,
        })
    client.set_model_version_tag(name, version.version, "routing", json.dumps(routing))
    client.set_registered_model_alias(name, "challenger", version.version)
    promoted, _ = promote(name, gates)
    return client.get_model_version(name, version.version), promoted


def _alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def check_gates(challenger, champion, gates: Gates) -> list[str]:
    """Reasons the challenger may not become champion (empty when it may)."""
    score, teacher = float(challenger.tags["score"]), float(challenger.tags["teacher_score"])
    problems = []
    if champion is not None and champion.version != challenger.version:
        incumbent = float(champion.tags["score"])
        if score < incumbent - gates.tolerance:
            problems.append(f"score {score:.3f} is below the champion's {incumbent:.3f} "
                            f"(v{champion.version}) by more than {gates.tolerance}")
    if score < gates.min_teacher_share * teacher:
        problems.append(f"score {score:.3f} is under {gates.min_teacher_share:.0%} of the teacher's {teacher:.3f}")
    return problems


def promote(name: str, gates: Gates = Gates(), force: bool = False, reason: str | None = None) -> tuple[bool, list[str]]:
    """Move `champion` to the current challenger when the gates pass (or when forced, with a reason).

    Raises ValueError when the task has no challenger, or when forcing without a reason.
    """
    client = MlflowClient()
    challenger = _alias_version(client, name, "challenger")
    if challenger is None:
        raise ValueError(f"task {name!r} has no challenger version to promote")
    problems = check_gates(challenger, _alias_version(client, name, "champion"), gates)
    if problems and not force:
        return False, problems
    if force:
        if not reason:
            raise ValueError("--force needs --reason")
        client.set_model_version_tag(name, challenger.version, "forced_by", getpass.getuser())
        client.set_model_version_tag(name, challenger.version, "forced_reason", reason)
    previous = _alias_version(client, name, "champion")
    if previous is not None and previous.version != challenger.version:
        client.set_registered_model_alias(name, "previous_champion", previous.version)
    client.set_registered_model_alias(name, "champion", challenger.version)
    return True, problems


def write_routes(path: Path) -> dict[str, Any]:
    """Write routes.json from the `champion` alias of every factory task model; returns the table."""
    client = MlflowClient()
    routes: dict[str, Any] = {}
    for model in client.search_registered_models(filter_string=f"tags.`{TASK_TAG}` != ''"):
        champion = _alias_version(client, model.name, "champion")
        if champion is None:
            continue
        routing = json.loads(champion.tags["routing"])
        routes[model.name] = {
            "model_uri": f"models:/{model.name}@champion", "version": champion.version,
            "run_id": champion.run_id, "adapter_uri": f"runs:/{champion.run_id}/adapter",
            **routing,
        }
    write_atomic(path, json.dumps({"tasks": routes}, indent=2, sort_keys=True))
    return routes
