"""The log formats ingest knows, and how a JSON object is matched to one.

A format is (detect, units, parse): `units` splits one JSON object into the units
that may each be one LLM invocation (an OTLP request into spans, an MLflow trace
into spans; None for formats whose object is one unit), and `parse` turns a unit into a
`Record`, None when the unit is not an LLM invocation (a chain run, a tool span),
or raises `BadRecord`. Detection tries the formats in the order of `FORMATS`, the
most specific shapes first (an MLflow DataFrame row also has "request" and
"response" keys, like a proxy-logged call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from factory.ingest import langfuse, langsmith, mlflow_traces, openai, otel
from factory.records import Record


@dataclass(frozen=True)
class Format:
    detect: Callable[[dict[str, Any]], str | None]
    units: Callable[[dict[str, Any]], Iterator[tuple[str, Any]]] | None
    parse: Callable[[Any, str], Record | None]


FORMATS: dict[str, Format] = {
    "otel": Format(otel.detect, otel.units, otel.parse),
    "mlflow": Format(mlflow_traces.detect, mlflow_traces.units, mlflow_traces.parse),
    "langsmith": Format(langsmith.detect, None, langsmith.parse),
    "langfuse": Format(langfuse.detect, None, langfuse.parse),
    "openai": Format(openai.detect, None, openai.parse_call),
    "openai_ft": Format(openai.detect, None, openai.parse_finetune),
}
_DETECTORS = tuple(dict.fromkeys(f.detect for f in FORMATS.values()))


def detect(obj: dict[str, Any]) -> str | None:
    """The name of the first format whose shape `obj` has, or None."""
    for check in _DETECTORS:
        name = check(obj)
        if name is not None:
            return name
    return None
