"""MLflow runs shared by the stages: a task's experiment, and re-opening a training run to log to it."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow


def task_experiment(task: str) -> None:
    """Select the task's experiment; with the embedded store its artifacts go under FACTORY_ARTIFACT_ROOT."""
    name = f"task/{task}"
    if mlflow.get_experiment_by_name(name) is None and os.environ.get("FACTORY_ARTIFACT_ROOT"):
        root = Path(os.environ["FACTORY_ARTIFACT_ROOT"]) / task
        mlflow.create_experiment(name, artifact_location=root.resolve().as_uri())
    mlflow.set_experiment(name)


def resume_run(run_id: str):
    """Re-open a finished training run (in its own experiment) to log evaluation or a model to it."""
    mlflow.set_experiment(experiment_id=mlflow.get_run(run_id).info.experiment_id)
    return mlflow.start_run(run_id=run_id)
