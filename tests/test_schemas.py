"""The documents one stage writes and another reads are checked against one schema on both sides."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from factory.schemas import EvaluationResult, RoutingMetadata, field_errors

CALIBRATION = {"split": "test", "threshold": 0.9, "coverage": 0.5, "quality": 0.97, "target": 0.95, "delta": 0.1,
               "map": None, "validation": {"n": 40}, "ece": {"raw": 0.1, "calibrated": None}}
RESULT = {"key": {}, "task": "t", "kind": "agent_turn", "dataset_version": "v1", "run_id": None, "n_test": 3,
          "columns": {c: {"score": 0.5, "action_accuracy": 1.0} for c in ("base", "specialist", "teacher")},
          "calibration": CALIBRATION, "confusion": None, "worst": []}


def test_an_evaluation_result_missing_a_column_or_with_a_text_score_is_refused_naming_the_field():
    assert EvaluationResult.model_validate(RESULT).columns.specialist.score == 0.5
    broken = {**RESULT, "columns": {"base": {"score": "0.5"}, "specialist": {"score": 0.1}}}
    with pytest.raises(ValidationError) as err:
        EvaluationResult.model_validate(broken)
    message = field_errors(err.value, "reports/t/eval.json", "")
    assert "reports/t/eval.json: columns.base.score:" in message and "columns.teacher:" in message


def test_routing_metadata_is_strict_about_types_and_kinds():
    meta = {"task": "t", "kind": "tool_call", "signature": {"template": "abc", "tools": ["f"]}, "output_schema": {},
            "threshold": None, "base_model": "b", "max_new_tokens": 8, "dataset_version": "v1", "later_field": 1}
    assert RoutingMetadata.model_validate(meta).threshold is None
    for change in ({"max_new_tokens": "8"}, {"kind": "ranking"}, {"signature": {"template": "abc"}}):
        with pytest.raises(ValidationError):
            RoutingMetadata.model_validate({**meta, **change})
