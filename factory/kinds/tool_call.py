"""tool_call: every answer is one or more calls to the tools offered (a step that always acts)."""

from __future__ import annotations

from typing import Any

from factory.kinds.base import Kind, Output, Tools, call_action, called_tools, tool_schema
from factory.metrics import call_names, mean, tool_calls_match


def calls_usable(output: Output, schema: dict[str, Any], tools: Tools) -> bool:
    """Every call names an offered tool (the request's, else the task's) and has an arguments object."""
    names = {t.get("function", t).get("name") for t in tool_schema(schema, tools).get("tools", [])}
    calls = output.get("tool_calls") or []
    return bool(calls) and all(c["name"] in names and isinstance(c["arguments"], dict) for c in calls)


class ToolCall(Kind):
    """Scored by `metrics.tool_calls_match` (BFCL-style) against the call's own tool schemas."""

    name = "tool_call"
    score_name = "call match"
    binary = True

    def action(self, output):
        return call_action(output)

    def infer(self, records, max_labels):
        if sum(bool(r.output_tool_calls) for r in records) >= 0.9 * len(records):
            return {"tools": called_tools(records)}
        return None

    def usable(self, output, schema, tools):
        return calls_usable(output, schema, tools)

    def score(self, pred, ref, schema, tools):
        return float(tool_calls_match(pred, ref, tool_schema(schema, tools)))

    def extras(self, preds, refs, schema, tools, embed):
        return {"name_accuracy": mean([call_names(p) == call_names(r) for p, r in zip(preds, refs)])}
