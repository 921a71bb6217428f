"""Relabel: the teacher answers what the logs could not teach, and the flywheel's escalations become preferences.

A mine-stage step, run after `factory mine` (`factory relabel TASK --teacher URL`):

(a) Relabelled: the task's calls that curate dropped as `failed` or `negative_feedback`
    (data/quarantine/curate.jsonl, already scrubbed) are sent again to the teacher, an
    OpenAI-compatible endpoint (the upstream `factory serve` escalates to); its answer
    becomes a training example.
(b) Synthetic: new inputs made from the task's own training examples by deterministic
    perturbation (`perturb`): the values a prompt carries (numbers, ids, quoted strings) are
    swapped for values other examples of the task carry or fresh ones of the same shape (digits
    redrawn), and a tool list is rotated; the
    teacher answers each. Trade-off against asking the teacher for paraphrases: reproducible,
    no teacher tokens spent on writing inputs, and the inputs stay in the task's own
    distribution (its templates, its tools), but the wording never changes, so a task whose
    prompts carry no such values gets only tool-order variants (the report says how many
    were made). Inputs are only made until the task reaches `target_examples`.

Relabelled and synthetic rows carry `"origin"` ("relabelled" / "synthetic"; logged rows
have none) and the teacher's model name; answers the task's kind cannot use (`Kind.usable`: a
label outside the task's labels, a call to no offered tool) are left out and counted. They go
to the train split only (never validation or test; a failed call of a held-out session and any
perturbation of a held-out example are left out, so nothing of a held-out session leaks into
training), and are capped at
`Relabel.max_share` of the train split (recipe `relabel:` section). The new dataset version
and its card (which counts them) are written as `factory mine` writes them, and the
catalog entry points to it. Every teacher answer is kept in `data/records/relabel/<task>.jsonl`
(0600, keyed by the input's content hash): a rerun, or a rerun after `factory mine`
replaced the version, asks the teacher only about inputs it has not answered yet. A failing
teacher raises `RelabelError` naming the endpoint and the record; the answers already
received are saved first and the dataset and catalog are left as they were.

Preference pairs (`preference_pairs`): a request the router escalated after its specialist
answered logs that answer (`metadata.specialist_answer`, factory.serve.requestlog); when
the teacher's logged answer differs, the pair (chosen: the teacher's, rejected: the
specialist's) is a DPO example. `write_preferences` stores a task's pairs of its training
sessions next to its dataset version (`preference.jsonl`), which `method: dpo` trains on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

import httpx
import pyarrow.parquet as pq
import yaml

from factory import kinds
from factory import mine as mine_stage
from factory.catalog import CATALOG_HEADER, check_task_name, load_catalog
from factory.errors import FactoryError
from factory.io import SPLITS, load_split, private_dir, write_atomic
from factory.records import Record, content_id, from_table
from factory.schemas import CatalogEntry

ORIGINS = ("relabelled", "synthetic")
RELABEL_REASONS = ("failed", "negative_feedback")
PREFERENCES = "preference.jsonl"
# the values `perturb` swaps: quoted strings, then numbers and ids (mine's masks, which the
# router also ignores, so a variant is still recognised as the task)
_SLOTS = re.compile(r"(?<!\w)\"[^\"\n]{1,80}\"|\$?\b[A-Za-z]*\d[\w.-]*\b")


class RelabelError(FactoryError, ValueError):
    """A teacher that fails or answers nothing usable, or a task that cannot be relabelled; the message
    names the endpoint, record or setting."""


@dataclass(frozen=True)
class Teacher:
    """An OpenAI-compatible chat endpoint: `url` is its base (".../v1"), as `factory serve --upstream` takes it."""

    url: str
    model: str = "teacher"
    api_key: str | None = None
    timeout: float = 120.0
    max_tokens: int = 256

    def answer(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], client: httpx.Client,
               what: str) -> dict[str, Any]:
        """The teacher's answer as {"content", "tool_calls": [{"name", "arguments"}]}; RelabelError naming
        `what` (the record) and the endpoint when it fails, times out or answers nothing."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                                "temperature": 0}
        if tools:
            body["tools"] = tools
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        endpoint = self.url.rstrip("/") + "/chat/completions"
        try:
            response = client.post(endpoint, json=body, headers=headers, timeout=self.timeout)
        except httpx.HTTPError as err:
            raise RelabelError(f"teacher {endpoint} failed on {what}: {type(err).__name__}: {err}") from None
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code != 200 or not isinstance(data, dict) or not data.get("choices"):
            detail = (data or {}).get("error") if isinstance(data, dict) else response.text[:200]
            raise RelabelError(f"teacher {endpoint} answered HTTP {response.status_code} on {what}: {detail}")
        message = data["choices"][0].get("message") or {}
        calls = []
        for call in message.get("tool_calls") or []:
            function = call.get("function", call)
            arguments = function.get("arguments", {})
            try:
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            except ValueError:
                raise RelabelError(f"teacher {endpoint} answered {what} with tool arguments that are not JSON: "
                                   f"{arguments[:200]!r}") from None
            calls.append({"name": function.get("name", ""), "arguments": arguments})
        content = message.get("content")
        if not calls and not (content or "").strip():
            raise RelabelError(f"teacher {endpoint} answered {what} with neither content nor tool calls")
        return {"content": content if content else None, "tool_calls": calls}


# --- which records are the task's ----------------------------------------------------------


def _groups(entry: dict[str, Any]) -> set[mine_stage.Group]:
    return mine_stage._entry_groups(entry)


def _belongs(record: Record, groups: set[mine_stage.Group]) -> bool:
    group = mine_stage.group_of(record)
    return group in groups or group._replace(template="*") in groups


def _claimed_elsewhere(data_dir: Path, catalog: dict[str, dict[str, Any]], task: str,
                       groups: set[mine_stage.Group]) -> set[str]:
    """Record ids in the datasets of other ready tasks sharing a signature with `task` (a split generic step)."""
    ids: set[str] = set()
    for name, entry in catalog.items():
        if name != task and entry.get("dataset_version") and _groups(entry) & groups:
            for split in SPLITS:
                ids.update(r["id"] for r in load_split(data_dir, name, entry["dataset_version"], split))
    return ids


def logged_rows(task: str, entry: dict[str, Any], catalog: dict[str, dict[str, Any]], data_dir: Path,
                seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The task's logged examples per split: its dataset version's (generated rows dropped) when it has
    one, else its curated records (matched by signature) split as `factory mine` splits them, the
    sessions of its newest version on disk (an earlier relabel's) keeping their split."""
    if entry.get("dataset_version"):
        return {s: [r for r in load_split(data_dir, task, entry["dataset_version"], s) if "origin" not in r]
                for s in SPLITS}
    path = data_dir / "records" / "curated.parquet"
    if not path.exists():
        raise RelabelError(f"no curated records at {path}: run `factory curate` and `factory mine` first")
    groups = _groups(entry)
    taken = _claimed_elsewhere(data_dir, catalog, task, groups)
    members = [r for r in from_table(pq.read_table(path)) if _belongs(r, groups) and r.id not in taken]
    members.sort(key=lambda r: (r.timestamp, r.id))
    label = (lambda r: (r.output_text or "").strip()) if entry["kind"] == "classification" else (lambda r: "")
    sessions: dict[str, list[str]] = {}
    for record in members:
        sessions.setdefault(mine_stage.session_key(record), []).append(label(record))
    # a re-mine drops a relabelled version from the catalog; its sessions keep their splits all the same
    versions = sorted((p for p in (data_dir / task).glob("*") if (p / "train.jsonl").exists()),
                      key=lambda p: p.stat().st_mtime)
    previous = mine_stage._previous_splits(data_dir, versions[-1].name) if versions else {}
    split_of = mine_stage.assign_splits(sessions, previous, mine_stage.MineConfig(seed=seed))
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for record in members:
        rows[split_of[mine_stage.session_key(record)]].append(mine_stage._row(record))
    return rows


def failed_records(data_dir: Path, entry: dict[str, Any]) -> list[Record]:
    """The task's calls curate quarantined as failed or negatively rated (scrubbed), by signature."""
    path = data_dir / "quarantine" / "curate.jsonl"
    if not path.exists():
        return []
    groups, found = _groups(entry), []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            reason = row.pop("reason")
            row.pop("detail", None)  # where a pii_in_output_only row's PII was found
            record = Record.from_row(row)
        except (ValueError, KeyError, TypeError) as err:
            raise RelabelError(f"{path}:{n}: not a quarantined record: {err}") from None
        if reason in RELABEL_REASONS and _belongs(record, groups):
            found.append(record)
    return found


# --- synthetic inputs ----------------------------------------------------------------------


def _last_user(messages: list[dict[str, Any]]) -> int | None:
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"
                 and isinstance(messages[i].get("content"), str)), None)


def perturb(rows: list[dict[str, Any]], count: int, seed: int = 0,
            exclude: set[str] = frozenset()) -> list[dict[str, Any]]:
    """Up to `count` new inputs ({"messages", "tools", "seed_id"}) made from `rows` (a task's training examples).

    Each variant takes a seed row (seeded order, round robin) and replaces every value slot of its
    last user message (a quoted string, a number or an id) by, at even odds, a value of the same
    shape another row carries or a fresh one (its digits redrawn: A12345 -> A80417), and rotates
    its tool list when it offers several tools. Variants whose input equals a row's, another
    variant's or one in `exclude` (input keys, `_input_key`: the held-out examples') are skipped;
    fewer than `count` come back when the rows give no more.
    """
    rng = Random(seed)
    pool: dict[str, list[str]] = {}
    for row in rows:
        i = _last_user(row["messages"])
        for value in _SLOTS.findall(row["messages"][i]["content"]) if i is not None else []:
            pool.setdefault(_shape(value), []).append(value)
    pool = {shape: sorted(set(values)) for shape, values in pool.items()}

    def swap(match: re.Match) -> str:
        value = match.group()
        if rng.random() < 0.5 and len(pool.get(_shape(value), [])) > 1:
            return rng.choice(pool[_shape(value)])
        return re.sub(r"\d", lambda _: str(rng.randrange(10)), value)

    seen = set(exclude) | {_input_key(r["messages"], r.get("tools") or []) for r in rows}
    out: list[dict[str, Any]] = []
    order = sorted(rows, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    for attempt in range(8 * count):
        if len(out) >= count or not order:
            break
        row = order[attempt % len(order)]
        messages = [dict(m) for m in row["messages"]]
        tools = list(row.get("tools") or [])
        i = _last_user(messages)
        if i is not None:
            messages[i]["content"] = _SLOTS.sub(swap, messages[i]["content"])
        if len(tools) > 1:
            shift = 1 + attempt // len(order) % (len(tools) - 1)
            tools = tools[shift:] + tools[:shift]
        key = _input_key(messages, tools)
        if key not in seen:
            seen.add(key)
            out.append({"messages": messages, "tools": tools, "seed_id": row["id"]})
    return out


def _shape(value: str) -> str:
    """A slot's shape: quoted, or its characters as classes (A12345 -> Ad, 12.50 -> d.d)."""
    if value.startswith('"'):
        return "quoted"
    return re.sub(r"(\w)\1+", r"\1", re.sub(r"[A-Za-z]", "A", re.sub(r"\d", "d", value)))


def _input_key(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    return content_id(messages, tools, None, [])


# --- the teacher's answers, kept -----------------------------------------------------------


def _store_path(data_dir: Path, task: str) -> Path:
    return data_dir / "records" / "relabel" / f"{check_task_name(task)}.jsonl"


def _load_store(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    store = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            item = json.loads(line)
            store[item["key"]] = item
        except (ValueError, KeyError, TypeError) as err:
            raise RelabelError(f"{path}:{n}: not a stored teacher answer: {err}") from None
    return store


def _save_store(path: Path, store: dict[str, dict[str, Any]]) -> None:
    private_dir(path.parent)  # the inputs are scrubbed, the teacher's answers may not be: owner only
    write_atomic(path, "".join(json.dumps(v, ensure_ascii=False, sort_keys=True) + "\n" for v in store.values()),
                 private=True)


def ask(teacher: Teacher, items: list[dict[str, Any]], store: dict[str, dict[str, Any]], workers: int = 4) -> int:
    """Have the teacher answer every item ({"key", "messages", "tools", "origin", ...}) not yet in `store`,
    `workers` requests at a time; answers go into `store`. Returns how many were asked. Raises
    RelabelError on the first failure, after every answer received so far is in `store`."""
    todo = [item for item in items if item["key"] not in store]
    failure: RelabelError | None = None
    with httpx.Client() as client, ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [(item, pool.submit(teacher.answer, item["messages"], item["tools"], client,
                                      item.get("what", item["key"]))) for item in todo]
        for item, future in futures:
            try:
                output = future.result()
            except RelabelError as err:
                failure = failure or err
                continue
            store[item["key"]] = {**{k: v for k, v in item.items() if k != "what"}, "output": output,
                                  "teacher": teacher.model}
    if failure is not None:
        raise failure
    return len(todo)


# --- the step ------------------------------------------------------------------------------


def relabel(task: str, data_dir: Path, teacher: Teacher, max_share: float = 0.6, target_examples: int = 50,
            workers: int = 4, seed: int = 0) -> dict[str, Any]:
    """Relabel `task`'s failed calls, add synthetic examples until it has `target_examples`, publish a dataset
    version; returns a report (counts, version). See the module docstring.

    Raises RelabelError for an unknown task, a teacher failure (answers so far kept, dataset and
    catalog unchanged) or when even the cap allows too few examples to reach `target_examples`.
    """
    from filelock import FileLock

    catalog_path = data_dir / "tasks.yaml"
    catalog = load_catalog(catalog_path)
    if task not in catalog:
        raise RelabelError(f"unknown task {task!r} in {catalog_path}; known: {', '.join(sorted(catalog)) or 'none'}")
    entry = catalog[task]
    if entry.get("status") in ("merged", "absent"):
        raise RelabelError(f"task {task!r} is {entry['status']} in {catalog_path}: nothing to relabel")
    rows = logged_rows(task, entry, catalog, data_dir, seed)
    held_out = {mine_stage.session_key(r) for s in ("validation", "test") for r in rows[s]}
    logged = sum(len(v) for v in rows.values())
    train_logged = len(rows["train"])
    if not train_logged:
        raise RelabelError(f"task {task!r} has no logged training example to start from")
    cap = int(max_share * train_logged / (1 - max_share))  # generated <= max_share of the train split

    store_path = _store_path(data_dir, task)
    store = _load_store(store_path)
    failed = [r for r in failed_records(data_dir, entry) if mine_stage.session_key(r) not in held_out]
    items = [{"key": _input_key(r.messages, r.tools), "origin": "relabelled", "source_record": r.id,
              "session_id": mine_stage.session_key(r), "messages": r.messages, "tools": r.tools,
              "what": f"quarantined record {r.id} ({r.location})"} for r in failed]
    items = list({item["key"]: item for item in items}.values())[:cap]
    wanted = max(0, min(cap - len(items), target_examples - logged - len(items)))
    held_out_inputs = {_input_key(r["messages"], r.get("tools") or []) for s in ("validation", "test") for r in rows[s]}
    for variant in perturb(rows["train"], wanted, seed, held_out_inputs):
        key = _input_key(variant["messages"], variant["tools"])
        items.append({"key": key, "origin": "synthetic", "source_record": variant["seed_id"],
                      "session_id": f"synthetic-{key[:16]}", "messages": variant["messages"],
                      "tools": variant["tools"], "what": f"synthetic input from {variant['seed_id']}"})
    try:
        asked = ask(teacher, items, store, workers)
    finally:
        _save_store(store_path, store)
    kind = kinds.get(entry["kind"])
    answered = [_generated_row(store[item["key"]]) for item in items]
    generated = [r for r in answered if kind.usable(r["output"], entry["output_schema"], r["tools"])]
    total = logged + len(generated)
    if total < target_examples:
        raise RelabelError(f"task {task!r}: {logged} logged + {len(generated)} generated examples (cap "
                           f"max_share={max_share} of {train_logged} logged training examples; "
                           f"{len(answered) - len(generated)} teacher answers unusable as a {entry['kind']} answer "
                           f"left out) < {target_examples}; raise relabel.max_share or log more calls")
    splits = {s: list(rows[s]) for s in SPLITS}
    splits["train"] += generated
    counts = Counter(row["origin"] for row in generated)
    report = {"task": task, "logged": logged, "relabelled": counts["relabelled"], "synthetic": counts["synthetic"],
              "unusable": len(answered) - len(generated), "teacher_calls": asked, "cap": cap, "max_share": max_share,
              "store": str(store_path)}
    with FileLock(data_dir / ".mine.lock"):  # the catalog and dataset folders are mine's
        catalog = load_catalog(catalog_path)
        report["dataset_version"] = _publish(task, catalog[task], splits, data_dir, report)
        catalog[task] = {**catalog[task], "status": "ready", "dataset_version": report["dataset_version"],
                         "size": total}
        centroid = Path(task) / report["dataset_version"] / "centroid.npy"
        catalog[task]["embedding"] = {"model": mine_stage.EMBEDDING_MODEL, "centroid": str(centroid),
                                      "similarity_p05": report.pop("similarity_p05")}
        CatalogEntry.model_validate(catalog[task])
        write_atomic(catalog_path, CATALOG_HEADER + yaml.safe_dump({"tasks": catalog}, sort_keys=False,
                                                                   allow_unicode=True))
    return report


def _generated_row(item: dict[str, Any]) -> dict[str, Any]:
    output = item["output"]
    return {"id": content_id(item["messages"], item["tools"], output["content"], output["tool_calls"]),
            "source_id": item["source_record"], "session_id": item["session_id"], "messages": item["messages"],
            "tools": item["tools"], "output": output, "origin": item["origin"], "teacher": item["teacher"]}


def _publish(task: str, entry: dict[str, Any], splits: dict[str, list[dict]], data_dir: Path,
             report: dict[str, Any]) -> str:
    """Write the dataset version (mine's layout and card, plus the generated examples' section); its version."""
    logged = [r for s in SPLITS for r in splits[s] if "origin" not in r]
    centroid, p05 = mine_stage._centroids([[_as_record(r) for r in logged]], mine_stage.MineConfig())[0]
    template = entry.get("description", "")
    card = mine_stage._card(task, entry, splits, template)
    train = len(splits["train"])
    card += ("\n## Teacher-generated examples\n\n"
             f"- relabelled (failed or negatively rated calls answered again): {report['relabelled']}\n"
             f"- synthetic (perturbed inputs of training examples, answered by the teacher): {report['synthetic']}\n"
             f"- {report['relabelled'] + report['synthetic']} of {train} training examples "
             f"(cap: max_share {report['max_share']}); none in validation or test\n"
             f"- teacher answers left out as unusable for a {entry['kind']} task: {report['unusable']}\n"
             "- marked in the rows by `origin` and `teacher`\n")
    version = mine_stage._write_version(data_dir / check_task_name(task), splits, card, centroid)
    report["similarity_p05"] = p05
    return version


def _as_record(row: dict[str, Any]) -> Record:
    output = row["output"]
    return Record(id=row["id"], source="dataset", location="", messages=row["messages"], tools=row.get("tools") or [],
                  output_text=output.get("content"), output_tool_calls=output.get("tool_calls") or [])


# --- preference pairs ----------------------------------------------------------------------


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    norm = lambda o: ((o.get("content") or "").strip(), json.dumps(o.get("tool_calls") or [], sort_keys=True))
    return norm(a) == norm(b)


def preference_pairs(records: list[Record], task: str,
                     exclude_sessions: set[str] = frozenset()) -> list[dict[str, Any]]:
    """DPO pairs of `task` from escalated calls: {"id", "session_id", "messages", "tools", "chosen", "rejected"}.

    A record is one when the router escalated it (`metadata.route == "upstream"`) for this task
    after the specialist answered (`metadata.specialist_answer`), the teacher's answer succeeded
    and differs from the specialist's. Sessions in `exclude_sessions` (held-out splits) are left out.
    """
    pairs = []
    for r in records:
        meta = r.metadata
        rejected = meta.get("specialist_answer")
        if (meta.get("route") != "upstream" or meta.get("task") != task or not isinstance(rejected, dict)
                or r.outcome != "ok" or mine_stage.session_key(r) in exclude_sessions):
            continue
        rejected = {"content": rejected.get("content"), "tool_calls": rejected.get("tool_calls") or []}
        if not _same(r.output, rejected):
            pairs.append({"id": r.id, "session_id": mine_stage.session_key(r), "messages": r.messages,
                          "tools": r.tools, "chosen": r.output, "rejected": rejected})
    return pairs


def write_preferences(task: str, entry: dict[str, Any], records: list[Record], data_dir: Path) -> int:
    """Store `task`'s preference pairs of its training sessions beside its dataset version; how many."""
    version = entry.get("dataset_version")
    if not version:
        return 0
    held_out = {mine_stage.session_key(r) for s in ("validation", "test")
                for r in load_split(data_dir, task, version, s)}
    pairs = preference_pairs(records, task, held_out)
    write_atomic(data_dir / check_task_name(task) / version / PREFERENCES,
                 "".join(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in pairs))
    return len(pairs)


def load_preferences(data_dir: Path, task: str, version: str) -> list[dict[str, Any]]:
    path = data_dir / check_task_name(task) / version / PREFERENCES
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line] if path.exists() else []
