"""Documents one stage writes and a later one reads, as one pydantic schema each, so writer and reader
cannot drift apart.

`CatalogEntry` is one task of `datasets/tasks.yaml`, written by `factory mine` (and edited by
people), read by every later stage through `catalog.load_catalog`. `EvaluationResult` is
`reports/<task>/eval.json`, written by the evaluation and read by it again (a stored result
is reused), by the registry (routing metadata, gates) and by the CLI's tables.
`RoutingMetadata` is `routing.json` beside a registered model version (written by the registry
at registration); `RouteEntry` is one task of `registry/routes.json` (the champion's routing
metadata plus where its adapter is), written by `registry.write_routes` and read by the router.
Unknown keys are kept (a newer writer may add some); missing or mistyped ones raise
`pydantic.ValidationError`, which `field_errors` turns into `file: dotted.field: message` lines.
Types are strict: a number written as a string is an error, not a conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Document(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class Signature(_Document):
    """How a request is matched to the task: its prompt template's fingerprint, agent and step;
    `tools` are the tool names the task's calls offered (a tie-breaker, not a key)."""

    template: str
    tools: list[str]
    agent: str = ""
    step: str = ""


def _known_kind(value: str) -> str:
    from factory import kinds

    if value not in kinds.KINDS:
        raise ValueError(f"unknown task kind {value!r}; expected one of {', '.join(kinds.KINDS)}")
    return value


class _OfKind(_Document):
    """A document about one task kind (`factory.kinds`); an unknown kind is an error."""

    kind: str

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        return _known_kind(value)


class TaskSignature(_Document):
    """A catalog entry's signature: agent, step, template fingerprint (and the tool names offered)."""

    agent: str = ""
    step: str = ""
    template: str = ""
    tools: list[str] = []


class Embedding(_Document):
    model: str
    centroid: str  # relative to the data folder
    similarity_p05: float


class CatalogEntry(_OfKind):
    signature: TaskSignature
    status: Literal["ready", "not_enough_data", "merged", "absent"] = "ready"
    description: str = ""
    size: int = Field(0, ge=0)
    merged_signatures: list[TaskSignature] = []
    merged_into: str | None = None
    output_schema: dict[str, Any] = {}
    examples: list[str] = []
    dataset_version: str | None = None
    embedding: Embedding | None = None


class Column(_Document):
    """One column's aggregates (the kind's `metrics`): "score" and kind-specific extras."""

    score: float


class Columns(_Document):
    """The three columns of an evaluation, scored against the same references."""

    base: Column
    specialist: Column
    teacher: Column


class ActionThresholds(_Document):
    """Thresholds per predicted action group: `groups` maps an action (`call:<tool>`, `reply`) to its
    group, `thresholds` a group to its threshold (None: that group escalates); what they serve of
    the test split (`coverage`, `quality`)."""

    groups: dict[str, str]
    thresholds: dict[str, float | None]
    delta_each: float
    coverage: float
    quality: float | None


class HeldOutCalibration(_Document):
    """The certified threshold (from validation) and what it keeps on the test split."""

    split: Literal["test"]
    threshold: float | None
    coverage: float
    quality: float | None
    target: float
    delta: float
    map: dict[str, Any] | None
    validation: dict[str, Any]
    ece: dict[str, float | None]
    # per-action escalation (`evaluate.run.action_calibration`): None for kinds with one action
    actions: ActionThresholds | None = None
    # when nothing is certified: {validation_answers, more_calls} at the current error rate
    to_certify: dict[str, int | None] | None = None


class EvaluationResult(_OfKind):
    key: dict[str, Any]
    task: str
    dataset_version: str
    run_id: str | None
    n_test: int = Field(ge=1)
    columns: Columns
    calibration: HeldOutCalibration
    confusion: dict[str, Any] | None
    worst: list[dict[str, Any]]


class RoutingMetadata(_OfKind):
    task: str
    signature: Signature
    output_schema: dict[str, Any]
    threshold: float | None = None  # certified on validation; None: the task always escalates
    coverage: float = 0.0  # share of the test split served at the threshold
    base_model: str
    max_new_tokens: int = Field(gt=0)
    dataset_version: str
    seq_budget: int | None = Field(None, gt=0)
    # the fingerprint of the policy (system prompt and tools) learned into the weights: requests are
    # answered without it, and only those that carry it (factory.chat.without_policy)
    policy: str | None = None
    calibration_map: dict[str, Any] | None = None
    # per-action escalation: when set, an answer is served at its action group's threshold, not `threshold`
    action_thresholds: dict[str, float | None] | None = None
    action_groups: dict[str, str] | None = None


class RouteEntry(RoutingMetadata):
    adapter_uri: str
    version: str = ""
    size: int = 0


def field_errors(err: ValidationError, path: Path | str, prefix: str) -> str:
    """The errors of `err` as `path: prefix.field: message` lines."""
    lines = []
    for problem in err.errors():
        field = ".".join(str(p) for p in (prefix, *problem["loc"]) if p != "")
        lines.append(f"{path}: {field}: {problem['msg']}")
    return "\n".join(lines)
