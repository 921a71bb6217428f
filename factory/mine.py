"""Mine: group curated records into recurring subtasks and publish a dataset per task.

A task is identified by its signature: the masked fingerprint of the system prompt
template plus the set of tool names (agent and step are recorded for routing but
do not split a task, so the same template logged by a proxy and by a fine-tuning
export lands in one task). Its kind is inferred from the outputs.

The catalog (`tasks.yaml`) is human-editable: a task is matched to its catalog
entry by signature, so a rename or a new description made there survives
re-mining. Splits are assigned per session by a seeded hash, which keeps every
session in one split and keeps old sessions in the same split as new logs arrive
(no test example ever becomes a training example in a later version). The
trade-off is that split sizes are only approximately the configured shares and
classification splits are not exactly stratified.

Dataset versions are content hashes written atomically (temp folder + rename):
`datasets/<task>/<version>/{train,validation,test}.jsonl` and `card.md`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from factory.records import Record

SPLITS = ("train", "validation", "test")
TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_MASKS = [
    (re.compile(r"<[A-Z_]+_\d+>"), "<PII>"),
    (re.compile(r"\"[^\"]*\"|'[^']*'"), "<Q>"),
    (re.compile(r"\b[0-9a-f]{8,}\b|\b[A-Za-z]*\d[\w-]*\b"), "<N>"),
    (re.compile(r"\s+"), " "),
]


@dataclass(frozen=True)
class MineConfig:
    seed: int = 0
    test_share: float = 0.15
    validation_share: float = 0.10
    min_examples: int = 50
    max_labels: int = 30


def check_task_name(name: str) -> str:
    """Raise ValueError unless `name` is a safe slug (it becomes a folder and a model name)."""
    if not TASK_NAME.match(name):
        raise ValueError(f"invalid task name {name!r}: use 1-64 lower-case letters, digits, '-' or '_'")
    return name


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return content or ""


def template_fingerprint(record: Record) -> str:
    """Hash of the system prompt with numbers, ids, quoted values and PII placeholders masked."""
    system = " ".join(_text(m.get("content")) for m in record.messages if m.get("role") in ("system", "developer"))
    for pattern, mask in _MASKS:
        system = pattern.sub(mask, system)
    return hashlib.sha256(system.strip().lower().encode()).hexdigest()[:12]


def signature(record: Record) -> tuple[str, tuple[str, ...]]:
    tools = tuple(sorted(t.get("function", t).get("name", "") for t in record.tools))
    return template_fingerprint(record), tools


def _json_object(text: str | None) -> dict | None:
    try:
        value = json.loads(text or "")
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def infer_kind(records: list[Record], max_labels: int) -> tuple[str, dict[str, Any]]:
    """Infer (kind, output schema) from a task's outputs; the majority shape wins (>= 90%)."""
    n = len(records)
    if sum(bool(r.output_tool_calls) for r in records) >= 0.9 * n:
        names = {c["name"] for r in records for c in r.output_tool_calls}
        tools = [t for t in records[0].tools if t.get("function", t).get("name") in names] or records[0].tools
        return "tool_call", {"tools": tools}
    objects = [o for o in (_json_object(r.output_text) for r in records) if o is not None]
    if len(objects) >= 0.9 * n:
        return "json_extraction", {"json_schema": _json_schema(objects)}
    labels = Counter((r.output_text or "").strip() for r in records)
    frequent = [label for label, count in labels.most_common() if count >= 2]
    covered = sum(labels[label] for label in frequent)
    if len(frequent) <= max_labels and covered >= 0.95 * n and all(len(label.split()) <= 4 for label in frequent):
        return "classification", {"labels": sorted(frequent)}
    return "free_text", {}


def _json_schema(objects: list[dict]) -> dict[str, Any]:
    """A JSON schema for the keys every object has (types from the values seen, null allowed)."""
    required = set.intersection(*(set(o) for o in objects))
    properties: dict[str, Any] = {}
    for key in sorted({k for o in objects for k in o}):
        types = sorted({_JSON_TYPES.get(type(o[key]), "null") for o in objects if key in o and o[key] is not None})
        if any(key in o and o[key] is None for o in objects):
            types.append("null")
        properties[key] = {"type": types[0] if len(types) == 1 else types}
    return {"type": "object", "properties": properties, "required": sorted(required)}


def _split_of(record: Record, config: MineConfig) -> str:
    key = record.session_id or record.source_id or record.id
    bucket = int(hashlib.sha256(f"{config.seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < config.test_share:
        return "test"
    if bucket < config.test_share + config.validation_share:
        return "validation"
    return "train"


def _row(record: Record) -> dict[str, Any]:
    return {
        "id": record.id,
        "source_id": record.source_id,
        "session_id": record.session_id,
        "messages": record.messages,
        "tools": record.tools,
        "output": {"content": record.output_text, "tool_calls": record.output_tool_calls},
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:64]


def _name_for(records: list[Record], fingerprint: str, taken: set[str]) -> str:
    steps = Counter(r.step for r in records if r.step)
    agents = Counter(r.agent for r in records if r.agent)
    base = _slug(steps.most_common(1)[0][0]) if steps else ""
    if not base:
        base = _slug(f"{agents.most_common(1)[0][0] if agents else 'task'}-{fingerprint[:6]}")
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def load_catalog(path: Path) -> dict[str, dict[str, Any]]:
    """Read `tasks.yaml`; raises ValueError naming the file when it is not a mapping of tasks."""
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict):
        raise ValueError(f"{path}: expected a top-level 'tasks' mapping")
    for name in tasks:
        check_task_name(str(name))
    return tasks


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_version(task_dir: Path, splits: dict[str, list[dict]], card: str) -> str:
    blobs = {s: "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in splits[s]) for s in SPLITS}
    version = hashlib.sha256("".join(blobs[s] for s in SPLITS).encode()).hexdigest()[:12]
    final = task_dir / version
    if final.exists():
        return version
    tmp = task_dir / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, blob in blobs.items():
        (tmp / f"{split}.jsonl").write_text(blob)
    (tmp / "card.md").write_text(card)
    os.replace(tmp, final)
    return version


def _card(name: str, entry: dict[str, Any], splits: dict[str, list[dict]]) -> str:
    lines = [f"# Dataset card: {name}", "", entry.get("description", ""), "",
             f"- kind: {entry['kind']}", f"- signature: `{json.dumps(entry['signature'])}`",
             *[f"- {split}: {len(splits[split])} examples" for split in SPLITS], ""]
    if entry["kind"] == "classification":
        counts = Counter((r["output"]["content"] or "").strip() for r in splits["train"])
        lines += ["## Train label counts", "", *[f"- {k}: {v}" for k, v in counts.most_common()], ""]
    lines += ["## Samples", ""]
    for row in splits["train"][:3]:
        prompt = _text(row["messages"][-1].get("content"))
        lines += [f"- prompt: `{prompt[:200]}`", f"  output: `{json.dumps(row['output'], ensure_ascii=False)[:200]}`"]
    return "\n".join(lines) + "\n"


def mine(records: list[Record], data_dir: Path, config: MineConfig = MineConfig()) -> dict[str, dict[str, Any]]:
    """Group `records` into tasks, write a dataset version per task and the catalog; return the catalog."""
    catalog_path = data_dir / "tasks.yaml"
    old = load_catalog(catalog_path)
    by_signature = {(e["signature"]["template"], tuple(e["signature"]["tools"])): name for name, e in old.items()}
    groups: dict[tuple[str, tuple[str, ...]], list[Record]] = {}
    for record in sorted(records, key=lambda r: (r.timestamp, r.id)):
        groups.setdefault(signature(record), []).append(record)

    catalog: dict[str, dict[str, Any]] = {}
    taken = set(old)
    for sig, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        name = by_signature.get(sig) or _name_for(members, sig[0], taken)
        taken.add(name)
        kind, schema = infer_kind(members, config.max_labels)
        steps = Counter(r.step for r in members if r.step)
        agents = Counter(r.agent for r in members if r.agent)
        entry = {
            "description": old.get(name, {}).get("description")
            or f"{kind} task of {agents.most_common(1)[0][0] if agents else 'unknown agent'}"
               f" (step {steps.most_common(1)[0][0] if steps else 'unnamed'})",
            "kind": kind,
            "size": len(members),
            "signature": {"agent": agents.most_common(1)[0][0] if agents else "",
                          "step": steps.most_common(1)[0][0] if steps else "",
                          "template": sig[0], "tools": list(sig[1])},
            "output_schema": schema,
            "examples": [r.id for r in members[:3]],
        }
        if len(members) < config.min_examples:
            entry.update(status="not_enough_data", dataset_version=None)
        else:
            splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
            for record in members:
                splits[_split_of(record, config)].append(_row(record))
            entry.update(status="ready", dataset_version=_write_version(data_dir / name, splits,
                                                                        _card(name, entry, splits)))
        catalog[name] = entry
    write_atomic(catalog_path, yaml.safe_dump({"tasks": catalog}, sort_keys=False, allow_unicode=True))
    return catalog


def load_split(data_dir: Path, task: str, version: str, split: str) -> list[dict[str, Any]]:
    path = data_dir / check_task_name(task) / version / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]
