"""json_extraction: the answer is a JSON object; scored by field-level F1 (`metrics.json_field_f1`)."""

from __future__ import annotations

from typing import Any

import jsonschema
from jsonschema.validators import validator_for

from factory.kinds.base import Kind, json_object
from factory.metrics import json_field_f1, mean, parse_json_object

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def json_schema(objects: list[dict]) -> dict[str, Any]:
    """A JSON schema for the keys every object has (types from the values seen, null allowed)."""
    required = set.intersection(*(set(o) for o in objects))
    properties: dict[str, Any] = {}
    for key in sorted({k for o in objects for k in o}):
        types = sorted({_JSON_TYPES.get(type(o[key]), "null") for o in objects if key in o and o[key] is not None})
        if any(key in o and o[key] is None for o in objects):
            types.append("null")
        properties[key] = {"type": types[0] if len(types) == 1 else types}
    return {"type": "object", "properties": properties, "required": sorted(required)}


class JsonExtraction(Kind):
    name = "json_extraction"
    score_name = "field F1"

    def infer(self, records, max_labels):
        objects = [o for o in (json_object(r.output_text) for r in records) if o is not None]
        return {"json_schema": json_schema(objects)} if len(objects) >= 0.9 * len(records) else None

    def usable(self, output, schema, tools):
        try:
            jsonschema.validate(json_object(output.get("content")), schema.get("json_schema", {"type": "object"}))
        except jsonschema.ValidationError:
            return False
        return True

    def score(self, pred, ref, schema, tools):
        """Raises ValueError for a reference that is not a JSON object (a dataset bug, not a 0)."""
        return json_field_f1(pred, ref)

    def extras(self, preds, refs, schema, tools, embed):
        """`valid_json` (parses as an object) and, with a "json_schema", `schema_valid`; raises
        jsonschema.SchemaError when that schema is itself invalid."""
        parsed = [parse_json_object(p) for p in preds]
        out = {"valid_json": mean([obj is not None for obj in parsed])}
        if "json_schema" in schema:
            cls = validator_for(schema["json_schema"])
            cls.check_schema(schema["json_schema"])
            validator = cls(schema["json_schema"])
            out["schema_valid"] = mean([obj is not None and validator.is_valid(obj) for obj in parsed])
        return out
