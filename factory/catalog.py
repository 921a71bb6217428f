"""The task catalog (`datasets/tasks.yaml`): what `factory mine` found, and the names users gave it.

Every later stage reads a task's entry from here (its kind, output schema, signature and
dataset version); `factory mine` is its only writer. A task name is a slug because it
becomes a folder, an MLflow model name and a recipe file name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from factory.errors import FactoryError
from factory.schemas import CatalogEntry, field_errors

TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
CATALOG_HEADER = """\
# Task catalog, written by `factory mine`. Human-editable: rename a task (its key) or edit
# its description and both survive re-mining; set `merged_into: <task>` on a task to merge
# it into another. Every other field is recomputed.
"""


class CatalogError(FactoryError, ValueError):
    """A task name or task catalog that cannot be used; the message names the file and field
    (also a ValueError, as it was before `FactoryError`, for callers that catch that)."""


def check_task_name(name: str) -> str:
    """Raise CatalogError unless `name` is a safe slug (it becomes a folder and a model name)."""
    if not TASK_NAME.match(name):
        raise CatalogError(f"invalid task name {name!r}: use 1-64 lower-case letters, digits, '-' or '_'")
    return name


def load_catalog(path: Path) -> dict[str, dict[str, Any]]:
    """Read `tasks.yaml` ({} when there is none); raises CatalogError naming the file and field when
    it is not a mapping of tasks or an entry breaks `schemas.CatalogEntry`."""
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise CatalogError(f"{path}: invalid YAML: {err}") from None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict):
        raise CatalogError(f"{path}: expected a top-level 'tasks' mapping")
    for name, entry in tasks.items():
        try:
            check_task_name(str(name))
        except CatalogError as err:
            raise CatalogError(f"{path}: tasks: {err}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("signature"), dict):
            raise CatalogError(f"{path}: tasks.{name}: expected a mapping with a 'signature' mapping")
        target = entry.get("merged_into")
        if target is not None and (target not in tasks or target == name):
            raise CatalogError(f"{path}: tasks.{name}.merged_into: {target!r} is not another task of the catalog")
        try:
            CatalogEntry.model_validate(entry)
        except ValidationError as err:
            raise CatalogError(field_errors(err, path, f"tasks.{name}")) from None
    return tasks
