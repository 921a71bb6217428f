"""Mine: group curated records into recurring subtasks and publish a dataset per task.

Discovery has two layers.

(a) Signature. Every record gets `(agent, step, template)`: the template is a hash of
    the system prompt with curate's PII tags (`<EMAIL_ADDRESS_1>`), quoted values, numbers
    and ids masked (`template_fingerprint`). Records with the same signature form a group;
    signatures with under `min_group_size` records are pooled per agent/step (template `*`),
    so a prompt carrying an unmasked per-call value (a name) does not make every call its
    own group. The tools a call offers are input, not identity: agents that retrieve their
    tools per request (tool-retrieval, MCP) offer a different list on every call of one
    step, so the tool names are a feature of a task (its `signature.tools`, the router's
    tie-breaker), never part of its key. `template_fingerprint(record)` is what the router
    looks requests up by.
(b) Embedding clustering. Inside each group every prompt (`prompt_text`: masked system
    prompt + last user message) is reduced to its *skeleton*: the tokens covered by a word
    3-gram that at least `template_share` of the group's prompts contain, the rest collapsed
    to `*`. Skeletons keep the instruction a subtask repeats on every call and drop the
    content it is applied to, so a generic step (one step name, or no system prompt and the
    task stated in the user message) splits by instruction, not by topic; they also dedupe
    massively (100k prompts give a few hundred). The `anchors_per_group` most frequent
    skeletons of each group (at most `max_anchors` in all) are embedded with
    all-MiniLM-L6-v2 (`embed_all`); rarer ones join their lexical nearest anchor (TF-IDF).
    All anchors are then clustered together by agglomerative clustering (average linkage,
    cosine distance <= `cluster_distance`) with two constraints: anchors whose outputs
    differ in shape (tool call, JSON, label of <= 4 words, text) or have a disjoint
    vocabulary (labels, JSON keys, tool names) never share a task, and anchors of different
    groups pay `cross_group_penalty`, so different signatures merge only when their
    templates are near-identical and their agent and step agree (an empty agent or
    step, as in a fine-tuning export, agrees with any). A skeleton whose outputs mix
    tool calls and text has the shape "turn", which may share a task with calls and with
    text: a router cannot know before the answer which it will be. A conversational step
    (a group whose outputs mix calls and text and whose requests mostly carry a dialogue so
    far) is one agent turn: what it answers depends on where the dialogue is (a question
    asks for a call, a tool result for a reply), not on a different instruction, and the
    router could not tell tasks of one template and step apart anyway. Finally a cluster under `min_examples` joins the
    nearest cluster of its own group and a fitting shape (a trainable one first), so a step
    whose prompts differ in content (per-call tools, the question asked) stays trainable.
    Agglomerative rather than HDBSCAN:
    skeletons stack many identical points, which defeats density estimates, and a cosine
    threshold is easy to reason about. Limits: a subtask under `template_share` of a generic
    group loses its instruction from the skeleton and joins its nearest neighbour; two
    subtasks behind one shared generic system prompt, with outputs of the same shape and
    semantically close instructions, may merge.

Each task's kind and output schema are inferred from its outputs (`factory.kinds.infer`).

Catalog (`tasks.yaml`): human-editable. A mined task continues an existing entry when they
share a signature no other entry or task has, or when the entry's stored centroid is within
`match_similarity` of the task's (this tells apart the tasks of a split generic step, which
share one signature, and keeps a task whose prompt was reworded), or, for an entry without
a centroid, when they share a signature or at least agent and step. It keeps the
entry's name (so renames persist) and description. To merge task B into A, set
`merged_into: A` on B: B stays as a `merged` tombstone that keeps claiming B's records for
A. Entries no longer matched stay with status `absent`.

Centroid (the router's fallback): `datasets/<task>/<version>/centroid.npy`, float32, unit
norm, the normalised mean of `embed_all([prompt_text(messages)])` over up to
`centroid_sample` distinct prompts of the task; the entry's `embedding` field gives the
model, that file (relative to the data folder) and `similarity_p05`, the 5th percentile of
the sampled prompts' similarity to it.

Splits are by session (session id, else the log's call id, else the record id), so no
session is in two splits of a task. Sessions of the task's previous dataset version keep
their split, so a test example never becomes a training example as new logs arrive. New
sessions, in seeded-hash order, each go to the split furthest below its share within their
stratum (the session's majority label for classification, one stratum otherwise): exact
stratification up to rounding. Trade-offs: splits depend on the previous version (mining
the same records from scratch may split them differently), and a session may be in
different splits of different tasks.

Dataset versions are content hashes of the three splits, written atomically (temp folder +
rename): `datasets/<task>/<version>/{train,validation,test}.jsonl`, `card.md`,
`centroid.npy`. Tasks under `min_examples` records are listed with status
`not_enough_data` and get no dataset.
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
from typing import Any, NamedTuple

import numpy as np
import yaml

from factory import kinds
from factory.catalog import CATALOG_HEADER, CatalogError, check_task_name, load_catalog
from factory.chat import text_of
from factory.embed import EMBEDDING_MODEL, embed_all
from factory.errors import FactoryError
from factory.io import SPLITS, write_atomic
from factory.kinds.agent_turn import MIN_CALL_SHARE
from factory.kinds.base import json_object
from factory.records import Record
from factory.schemas import CatalogEntry

_MASKS = [
    (re.compile(r"<[A-Z_]+_\d+>"), "<PII>"),
    (re.compile(r"(?<!\w)\"[^\"]*\"|(?<!\w)'[^'\n]*'(?!\w)"), "<Q>"),
    (re.compile(r"\b[0-9a-f]{8,}\b|\b[A-Za-z]*\d[\w.-]*\b"), "<N>"),
    (re.compile(r"\s+"), " "),
]
_TOKEN = re.compile(r"<\w+>|\w+|[^\w\s]")
_PART_CHARS = 600  # per prompt part: the two parts fit MiniLM's 256 word pieces
_INCOMPATIBLE = 2.0  # the largest cosine distance


class MineError(FactoryError, ValueError):
    """Mining settings that cannot work; the message names them (also a ValueError, as it was
    before `FactoryError`, for callers that catch that)."""


@dataclass(frozen=True)
class MineConfig:
    """Mining settings (see the module docstring); invalid shares or sizes raise MineError."""

    seed: int = 0
    test_share: float = 0.15
    # validation certifies the escalation threshold, whose bound tightens with its size: at a
    # target of 0.9 no fewer than 22 kept answers can pass, out of 35 at a 10% share of 351
    validation_share: float = 0.15
    min_examples: int = 50
    max_labels: int = 30
    template_share: float = 0.05
    anchors_per_group: int = 64
    max_anchors: int = 4096
    min_group_size: int = 5
    cluster_distance: float = 0.35
    cross_group_penalty: float = 0.2
    centroid_sample: int = 32
    match_similarity: float = 0.85

    def __post_init__(self) -> None:
        if not (0 <= self.test_share and 0 <= self.validation_share and self.test_share + self.validation_share < 1):
            raise MineError("test_share and validation_share must be >= 0 and leave a train share")
        if min(self.min_examples, self.anchors_per_group, self.max_anchors, self.min_group_size,
               self.centroid_sample) < 1:
            raise MineError("min_examples, anchors_per_group, max_anchors, min_group_size and centroid_sample "
                             "must be >= 1")
        if not 0 < self.template_share < 1:
            raise MineError("template_share must be in (0, 1)")


class Group(NamedTuple):
    """Layer (a): the full signature of a record."""

    agent: str
    step: str
    template: str

    def as_dict(self) -> dict[str, Any]:
        return {"agent": self.agent, "step": self.step, "template": self.template}


@dataclass
class Cluster:
    """A discovered task: record indexes and its most frequent skeleton (the template)."""

    members: list[int]
    skeleton: str


def mask_text(text: str) -> str:
    """`text` with PII tags, quoted values, numbers and ids masked, whitespace collapsed."""
    for pattern, mask in _MASKS:
        text = pattern.sub(mask, text)
    return text.strip()


def template_fingerprint(record: Record) -> str:
    """Hash of the system prompt with numbers, ids, quoted values and PII tags masked."""
    system = " ".join(text_of(m.get("content")) for m in record.messages if m.get("role") in ("system", "developer"))
    return hashlib.sha256(mask_text(system).lower().encode()).hexdigest()[:12]


def _tool_names(record: Record) -> tuple[str, ...]:
    return tuple(sorted(t.get("function", t).get("name", "") for t in record.tools))


def _tool_feature(records: list[Record], limit: int = 64) -> list[str]:
    """The names of the tools a task's calls offer (the `limit` most frequent), sorted: the router's tie-breaker."""
    counts = Counter(name for r in records for name in _tool_names(r))
    return sorted(name for name, _ in counts.most_common(limit))


def group_of(record: Record) -> Group:
    return Group(record.agent, record.step, template_fingerprint(record))


def group_keys(records: list[Record], config: MineConfig = MineConfig()) -> list[Group]:
    """Each record's group; signatures with under `min_group_size` records are pooled (template "*").

    Pooling guards against system prompts that carry an unmasked per-call value (a name),
    which would otherwise make every call its own group; the skeletons split the pool again.
    """
    keys = [group_of(r) for r in records]
    sizes = Counter(keys)
    return [k if sizes[k] >= config.min_group_size else k._replace(template="*") for k in keys]


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """The text a task is recognised by: masked, lower-cased system prompt and last user (or tool) message.

    Each part is cut to 600 characters so both fit the embedding model's window. The
    router embeds requests with this function and `embed_texts` to compare them with the
    stored centroids.
    """
    system = " ".join(text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
    last = next((text_of(m.get("content")) for m in reversed(messages)
                 if m.get("role") not in ("system", "developer", "assistant")), "")
    parts = [mask_text(system)[:_PART_CHARS], mask_text(last)[:_PART_CHARS]]
    return " | ".join(p for p in parts if p).lower()


def skeletons(texts: list[str], share: float) -> list[str]:
    """Each text reduced to the tokens of the word 3-grams that >= `share` of `texts` (and >= 3) contain.

    Runs of other tokens become `*`: what is left is the template the texts were filled from.
    """
    counts = Counter(texts)
    tokens = {text: _TOKEN.findall(text) for text in counts}
    frequency: Counter[tuple[str, ...]] = Counter()
    for text, toks in tokens.items():
        for gram in set(zip(toks, toks[1:], toks[2:])):
            frequency[gram] += counts[text]
    floor = max(3.0, share * len(texts))
    skeleton = {}
    for text, toks in tokens.items():
        keep = [False] * len(toks)
        for i, gram in enumerate(zip(toks, toks[1:], toks[2:])):
            if frequency[gram] >= floor:
                keep[i] = keep[i + 1] = keep[i + 2] = True
        out: list[str] = []
        for token, kept in zip(toks, keep):
            if kept:
                out.append(token)
            elif not out or out[-1] != "*":
                out.append("*")
        skeleton[text] = " ".join(out)
    return [skeleton[t] for t in texts]


def output_shape(record: Record) -> str:
    """"tool_call", "json", "label" (at most 4 words) or "text"."""
    if record.output_tool_calls:
        return "tool_call"
    if json_object(record.output_text) is not None:
        return "json"
    return "label" if len((record.output_text or "").split()) <= 4 else "text"


def _acts_or_answers(shapes: list[str]) -> bool:
    """Whether the outputs of one prompt skeleton mix tool calls and text: a step that either acts or answers."""
    calls = shapes.count("tool_call")
    return max(2, MIN_CALL_SHARE * len(shapes)) <= calls < 0.9 * len(shapes)


_TURN = ("turn", "tool_call", "label", "text")  # the shapes an agent turn's answers take


def _shapes_fit(a: str, b: str) -> bool:
    """Output shapes that may share a task: equal ones, and an agent turn with calls or text."""
    return a == b or {a, b} <= set(_TURN) and "turn" in (a, b)


def _has_history(record: Record) -> bool:
    """Whether the request carries a conversation so far: earlier replies, calls or tool results."""
    return any(m.get("role") in ("assistant", "tool", "function") for m in record.messages)


def _vocabulary(records: list[Record], shape: str) -> frozenset[str]:
    """What outputs of one shape are made of: tool names, JSON keys or repeated labels (none for text)."""
    if shape in ("tool_call", "turn"):
        return frozenset(c["name"] for r in records for c in r.output_tool_calls)
    if shape == "json":
        return frozenset(k for r in records for k in (json_object(r.output_text) or {}))
    if shape == "label":
        counts = Counter((r.output_text or "").strip() for r in records)
        return frozenset(label for label, n in counts.items() if n >= 2)
    return frozenset()


def _groups_agree(a: Group, b: Group) -> bool:
    return (not a.agent or not b.agent or a.agent == b.agent) and (
        not a.step or not b.step or a.step == b.step)


def _overlap(a: frozenset[str], b: frozenset[str]) -> bool:
    return not a or not b or len(a & b) >= 0.5 * min(len(a), len(b))


def _attach_tail(items: dict[str, list[int]], top: list[str], tail: list[str]) -> None:
    """Add each rare skeleton's records to the frequent skeleton it shares most words with (TF-IDF cosine)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(token_pattern=r"\S+", ngram_range=(1, 2), sublinear_tf=True).fit(top + tail)
    nearest = (vectorizer.transform(tail) @ vectorizer.transform(top).T).toarray().argmax(axis=1)
    for skeleton, j in zip(tail, nearest):
        items[top[j]].extend(items.pop(skeleton))


def discover(records: list[Record], config: MineConfig = MineConfig(),
             keys: list[Group] | None = None, engine: str | None = None) -> list[Cluster]:
    """Group `records` into tasks (see the module docstring); largest first, members in input order.

    `keys` are the records' groups when the caller has them (`group_keys`); `engine` maps the
    anchors' embeddings (`embed_all`).
    """
    if not records:
        return []
    from sklearn.cluster import AgglomerativeClustering

    texts = [prompt_text(r.messages) for r in records]
    groups: dict[Group, list[int]] = {}
    for i, key in enumerate(keys or group_keys(records, config)):
        groups.setdefault(key, []).append(i)
    anchors: list[tuple[int, str, list[int]]] = []  # (group number, skeleton, record indexes)
    for g, members in enumerate(groups.values()):
        items: dict[str, list[int]] = {}
        for i, skeleton in zip(members, skeletons([texts[i] for i in members], config.template_share)):
            items.setdefault(skeleton, []).append(i)
        ranked = sorted(items, key=lambda s: (-len(items[s]), s))
        quota = max(1, min(config.anchors_per_group, config.max_anchors * len(members) // len(records)))
        top, tail = ranked[:quota], ranked[quota:]
        if tail:
            _attach_tail(items, top, tail)
        anchors += [(g, s, sorted(items[s])) for s in top]
    if len(anchors) == 1:
        return [Cluster(anchors[0][2], anchors[0][1])]

    # constraints, per (group, output shape): same shape, agreeing signatures, overlapping vocabularies
    record_shapes = [output_shape(r) for r in records]
    dialogues = {g for g, members in enumerate(groups.values())
                 if _acts_or_answers([record_shapes[i] for i in members])
                 and sum(_has_history(records[i]) for i in members) >= 0.5 * len(members)}
    shapes = [Counter(record_shapes[i] for i in m).most_common(1)[0][0] for _, _, m in anchors]
    shapes = ["turn" if _acts_or_answers([record_shapes[i] for i in m]) or g in dialogues and shape in _TURN
              else shape for (g, _, m), shape in zip(anchors, shapes)]
    outputs: dict[tuple[int, str], list[Record]] = {}
    for (g, _, members), shape in zip(anchors, shapes):
        outputs.setdefault((g, shape), []).extend(records[i] for i in members)
    vocab = {kind: _vocabulary(rs, kind[1]) for kind, rs in outputs.items()}
    kinds, signatures = list(vocab), list(groups)
    agree = np.array([[_shapes_fit(a[1], b[1]) and _groups_agree(signatures[a[0]], signatures[b[0]])
                       and _overlap(vocab[a], vocab[b]) for b in kinds] for a in kinds])
    per_anchor = np.array([kinds.index((g, shape)) for (g, _, _), shape in zip(anchors, shapes)])
    group_ids = np.array([g for g, _, _ in anchors])
    vectors = embed_all([s for _, s, _ in anchors], engine)
    distance = np.clip(1.0 - vectors @ vectors.T, 0.0, 1.0)
    distance += config.cross_group_penalty * (group_ids[:, None] != group_ids[None, :])
    compatible = agree[per_anchor][:, per_anchor]
    in_dialogue = np.isin(group_ids, list(dialogues))
    distance[compatible & (group_ids[:, None] == group_ids[None, :]) & in_dialogue[:, None]] = 0.0
    distance[~compatible] = _INCOMPATIBLE
    np.fill_diagonal(distance, 0.0)
    labels = AgglomerativeClustering(n_clusters=None, metric="precomputed", linkage="average",
                                     distance_threshold=config.cluster_distance).fit_predict(distance)
    labels = _absorb_small(labels, [len(m) for _, _, m in anchors], vectors,
                           compatible & (group_ids[:, None] == group_ids[None, :]), config.min_examples)
    clusters: dict[int, list[tuple[str, list[int]]]] = {}
    for label, (_, skeleton, members) in zip(labels, anchors):
        clusters.setdefault(int(label), []).append((skeleton, members))
    found = [Cluster(sorted(i for _, m in parts for i in m), max(parts, key=lambda p: (len(p[1]), p[0]))[0])
             for parts in clusters.values()]
    return sorted(found, key=lambda c: (-len(c.members), c.members[0]))


def _absorb_small(labels: np.ndarray, sizes: list[int], vectors: np.ndarray, compatible: np.ndarray,
                  min_examples: int) -> np.ndarray:
    """Cluster labels of the anchors after small clusters joined their neighbours.

    A cluster under `min_examples` records joins the nearest cluster (cosine of the mean anchor
    embeddings) holding an anchor of its own group and a fitting shape (`compatible[a, b]`),
    a trainable one when there is one, until no small cluster has such a neighbour. Trade-off:
    two rare instructions of one generic step with outputs of one shape are trained as one
    task (their prompts still carry the instruction) instead of not at all.
    """
    labels, weights = labels.copy(), np.asarray(sizes, dtype=float)
    while True:
        ids, inverse = np.unique(labels, return_inverse=True)
        size = dict(zip(ids.tolist(), np.bincount(inverse, weights=weights).tolist()))
        for small in sorted((label for label in size if size[label] < min_examples), key=lambda lab: size[lab]):
            mine = labels == small
            near = set(labels[compatible[mine].any(axis=0)].tolist()) - {small}
            if near:
                centre = vectors[mine].mean(axis=0)
                labels[mine] = max(near, key=lambda b: (size[b] >= min_examples,
                                                        float(centre @ vectors[labels == b].mean(axis=0))))
                break
        else:
            return labels


# --- splits -----------------------------------------------------------------------------


def session_key(row: Record | dict[str, Any]) -> str:
    """The unit a split holds whole: session id, else the log's call id, else the record id."""
    if isinstance(row, dict):
        return row.get("session_id") or row.get("source_id") or row["id"]
    return row.session_id or row.source_id or row.id


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def assign_splits(sessions: dict[str, list[str]], previous: dict[str, str], config: MineConfig) -> dict[str, str]:
    """Split of each session; `sessions` maps a session to its records' strata, `previous` is kept.

    New sessions, in seeded-hash order within their stratum (the majority stratum of their
    records), each go to the split whose record count is furthest below its share.
    """
    shares = {"train": 1.0 - config.test_share - config.validation_share,
              "validation": config.validation_share, "test": config.test_share}
    strata: dict[str, list[str]] = {}
    for key, labels in sessions.items():
        strata.setdefault(min(Counter(labels).most_common(), key=lambda kv: (-kv[1], kv[0]))[0], []).append(key)
    result: dict[str, str] = {}
    for keys in strata.values():
        counts = Counter({s: 0 for s in SPLITS})
        for key in keys:
            if previous.get(key) in SPLITS:
                result[key] = previous[key]
                counts[result[key]] += len(sessions[key])
        total = sum(counts.values())
        for key in sorted((k for k in keys if k not in result), key=lambda k: _rank(config.seed, k)):
            total += len(sessions[key])
            result[key] = max(SPLITS, key=lambda s: shares[s] * total - counts[s])
            counts[result[key]] += len(sessions[key])
    return result


def _previous_splits(data_dir: Path, version: str | None) -> dict[str, str]:
    """session -> split in an earlier dataset version (found by its id, so renamed tasks keep theirs)."""
    folder = next(data_dir.glob(f"*/{version}"), None) if version else None
    if folder is None:
        return {}
    return {session_key(json.loads(line)): split for split in SPLITS if (folder / f"{split}.jsonl").exists()
            for line in (folder / f"{split}.jsonl").read_text().splitlines() if line}


def _row(record: Record) -> dict[str, Any]:
    return {
        "id": record.id,
        "source_id": record.source_id,
        "session_id": record.session_id,
        "messages": record.messages,
        "tools": record.tools,
        "output": {"content": record.output_text, "tool_calls": record.output_tool_calls},
    }


def load_centroid(data_dir: Path, entry: dict[str, Any]) -> np.ndarray | None:
    """A catalog entry's stored centroid (unit-norm float32), or None when it has none on disk."""
    path = (entry.get("embedding") or {}).get("centroid")
    return np.load(data_dir / path) if path and (data_dir / path).exists() else None


def _entry_groups(entry: dict[str, Any]) -> set[Group]:
    sigs = [entry["signature"], *entry.get("merged_signatures", [])]
    return {Group(str(s.get("agent", "")), str(s.get("step", "")), str(s.get("template", ""))) for s in sigs}


def _resolve_merge(old: dict[str, dict[str, Any]], name: str, path: Path) -> str:
    """The task `name` ends up in by following `merged_into`; raises CatalogError on a cycle."""
    seen = [name]
    while old[seen[-1]].get("merged_into"):
        seen.append(old[seen[-1]]["merged_into"])
        if seen[-1] in seen[:-1]:
            raise CatalogError(f"{path}: merged_into forms a cycle: {' -> '.join(seen)}")
    return seen[-1]


def _match(found: list[dict[str, Any]], old: dict[str, dict[str, Any]], data_dir: Path,
           config: MineConfig) -> list[str | None]:
    """The old catalog entry each found task continues, or None.

    A pair is a candidate when they share a signature that no other entry or task has; or,
    when the entry has a stored centroid, when it is within `match_similarity` (this decides
    between the tasks of a split generic step and keeps a reworded prompt's task); or, for
    an entry without a centroid, when they share a signature or at least agent, step and
    step. Greedy: shared signature first, then same agent/step, then similarity.
    """
    entry_groups = {name: _entry_groups(entry) for name, entry in old.items()}
    owners = Counter(g for groups in entry_groups.values() for g in groups)
    found_in = Counter(g for task in found for g in task["groups"])
    candidates = []
    for name, entry in old.items():
        centroid = load_centroid(data_dir, entry)
        steps = {(g.agent, g.step) for g in entry_groups[name] if g.step}
        for n, task in enumerate(found):
            shared = [g for g in task["groups"] if g in entry_groups[name]]
            level = 2 if shared else int(any((g.agent, g.step) in steps for g in task["groups"]))
            unique = any(owners[g] == 1 and found_in[g] == 1 for g in shared)
            similarity = float(task["centroid"] @ centroid) if centroid is not None else 0.0
            if unique or similarity >= config.match_similarity or centroid is None and level:
                candidates.append(((level, similarity, sum(task["groups"][g] for g in shared)), -n, name))
    matched: list[str | None] = [None] * len(found)
    for _, n, name in sorted(candidates, reverse=True):
        if matched[-n] is None and name not in matched:
            matched[-n] = name
    return matched


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48].strip("-")


def _distinctive_terms(skeletons_: list[str], top: int = 2) -> list[list[str]]:
    """The words that set each task's template apart from the others' (TF-IDF over the templates)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs = [s.replace("*", " ") for s in skeletons_]
    try:
        matrix = TfidfVectorizer(stop_words="english", token_pattern=r"\b[a-z][a-z]{2,}\b").fit(docs)
    except ValueError:  # no words at all
        return [[] for _ in docs]
    words = matrix.get_feature_names_out()
    scores = matrix.transform(docs).toarray()
    return [[words[j] for j in sorted(np.nonzero(row)[0], key=lambda j: (-row[j], words[j]))[:top]]
            for row in scores]


def _new_name(task: dict[str, Any], terms: list[str], unique_step: bool, taken: set[str]) -> str:
    agent, step = task["signature"].agent, task["signature"].step
    base = _slug(step) if step and unique_step else _slug("-".join([step or agent, *terms]))
    base = base or f"task-{task['signature'].template[:6]}"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def _centroids(groups: list[list[Record]], config: MineConfig, engine: str | None = None) -> list[tuple[np.ndarray, float]]:
    """Per group of records: the normalised mean embedding of up to `centroid_sample` of its distinct
    prompts (hash-chosen) and their p05 similarity to it; every group's prompts embedded in one
    `embed_all` (mapped by `engine`)."""
    samples = []
    for members in groups:
        chosen = sorted(members, key=lambda r: _rank(config.seed, r.id))[:4 * config.centroid_sample]
        samples.append(list(dict.fromkeys(prompt_text(r.messages) for r in chosen))[:config.centroid_sample])
    vectors = embed_all([text for sample in samples for text in sample], engine)
    ends = np.cumsum([len(sample) for sample in samples])
    return [_centroid_of(part) for part in np.split(vectors, ends[:-1])] if samples else []


def _centroid_of(vectors: np.ndarray) -> tuple[np.ndarray, float]:
    mean = vectors.mean(axis=0)
    mean = (mean / np.linalg.norm(mean)).astype(np.float32)
    return mean, round(float(np.percentile(vectors @ mean, 5)), 4)


def _write_version(task_dir: Path, splits: dict[str, list[dict]], card: str, centroid: np.ndarray) -> str:
    blobs = {s: "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in splits[s]) for s in SPLITS}
    version = hashlib.sha256("".join(blobs[s] for s in SPLITS).encode()).hexdigest()[:12]
    final = task_dir / version
    if final.exists():
        if not (final / "centroid.npy").exists():  # a version written before centroids were stored
            with open(final / ".centroid.npy.tmp", "wb") as f:
                np.save(f, centroid)
            os.replace(final / ".centroid.npy.tmp", final / "centroid.npy")
        return version
    tmp = task_dir / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, blob in blobs.items():
        (tmp / f"{split}.jsonl").write_text(blob)
    (tmp / "card.md").write_text(card)
    with open(tmp / "centroid.npy", "wb") as f:
        np.save(f, centroid)
    os.replace(tmp, final)
    return version


def _card(name: str, entry: dict[str, Any], splits: dict[str, list[dict]], template: str) -> str:
    sessions = {s: len({session_key(r) for r in splits[s]}) for s in SPLITS}
    lines = [f"# Dataset card: {name}", "", entry.get("description", ""), "",
             f"- kind: {entry['kind']}", f"- signature: `{json.dumps(entry['signature'])}`",
             f"- prompt template (skeleton): `{template[:300]}`",
             *[f"- {s}: {len(splits[s])} examples from {sessions[s]} sessions" for s in SPLITS],
             "- split by session; sessions of the previous version keep their split", ""]
    if entry["kind"] == "classification":
        counts = {s: Counter((r["output"]["content"] or "").strip() for r in splits[s]) for s in SPLITS}
        lines += ["## Label counts", "", "| label | train | validation | test |", "|---|---|---|---|",
                  *[f"| {label} | " + " | ".join(str(counts[s][label]) for s in SPLITS) + " |"
                    for label in entry["output_schema"]["labels"]], ""]
    elif entry["output_schema"]:
        lines += ["## Output schema", "", "```json", json.dumps(entry["output_schema"], indent=1)[:2000], "```", ""]
    lines += ["## Samples", ""]
    for row in splits["train"][:3]:
        prompt = text_of(row["messages"][-1].get("content")) if row["messages"] else ""
        lines += [f"- prompt: `{prompt[:200]}`", f"  output: `{json.dumps(row['output'], ensure_ascii=False)[:200]}`"]
    return "\n".join(lines) + "\n"


def _describe(task: dict[str, Any], kind: str) -> str:
    sig = task["signature"]
    template = re.sub(r"\s*'\s*", "'", re.sub(r"\s+([.,:;!?)])", r"\1", task["skeleton"]))[:160]
    return (f"{kind} task of {sig.agent or 'unknown agent'} (step {sig.step or 'unnamed'}); "
            f"prompt template: {template}")


def records_bytes(records: list[Record]) -> int:
    """About what the dataset splits of `records` take on disk: their text, plus 300 bytes of
    JSON keys and ids per record (`resources.check_disk` wants it before mining starts)."""
    total = 0
    for r in records:
        total += 300 + len(r.output_text or "") + sum(len(text_of(m.get("content"))) for m in r.messages)
        if r.tools or r.output_tool_calls:
            total += len(json.dumps([r.tools, r.output_tool_calls], default=str))
    return total


_STALE_TMP = re.compile(r"^\.[0-9a-f]{12}\.tmp$")


def _remove_stale_tmp(data_dir: Path) -> None:
    """Delete what a killed `mine` left half-written: `.<version>.tmp` folders, `.centroid.npy.tmp`
    and `.tasks.yaml.tmp`. Only called under the mine lock, so no other mine is writing them."""
    for path in [*data_dir.glob("*/.*.tmp"), *data_dir.glob("*/*/.centroid.npy.tmp"), data_dir / ".tasks.yaml.tmp"]:
        if path.is_dir() and _STALE_TMP.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.name in {".centroid.npy.tmp", ".tasks.yaml.tmp"}:
            path.unlink(missing_ok=True)


def mine(records: list[Record], data_dir: Path, config: MineConfig = MineConfig(),
         engine: str | None = None) -> dict[str, dict[str, Any]]:
    """Discover tasks in `records`, write a dataset version per task and the catalog; return the catalog.

    The embeddings (the anchors', the task centroids') are mapped by `engine` (`factory.engine`:
    local or ray, default $FACTORY_ENGINE), with the same results on both (`embed_all`).

    One mine at a time per data folder (a file lock, `.mine.lock`); it first deletes the
    temporary files a killed run left. Raises CatalogError when the existing catalog is
    malformed (naming the file and field), and `resources.ResourceError` before any work
    when the disk has no room for the datasets (both FactoryErrors and ValueErrors).
    """
    from filelock import FileLock

    from factory.resources import check_disk

    check_disk(data_dir, records_bytes(records))
    data_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(data_dir / ".mine.lock"):
        _remove_stale_tmp(data_dir)
        return _mine(records, data_dir, config, engine)


def _mine(records: list[Record], data_dir: Path, config: MineConfig, engine: str | None) -> dict[str, dict[str, Any]]:
    catalog_path = data_dir / "tasks.yaml"
    old = load_catalog(catalog_path)
    records = sorted(records, key=lambda r: (r.timestamp, r.id))
    keys = group_keys(records, config)
    found = []
    clusters = discover(records, config, keys, engine)
    members_of = [[records[i] for i in cluster.members] for cluster in clusters]
    for cluster, members, (centroid, p05) in zip(clusters, members_of, _centroids(members_of, config, engine)):
        groups = Counter(keys[i] for i in cluster.members)
        primary = max(groups, key=lambda g: (bool(g.step), bool(g.agent), groups[g], g))
        found.append({"members": members, "groups": groups, "signature": primary, "skeleton": cluster.skeleton,
                      "centroid": centroid, "p05": p05})

    # names: matched entries keep theirs; merged_into folds a task into its target
    matched = _match(found, old, data_dir, config)
    names: list[str] = []
    steps = Counter(task["signature"].step for task in found)
    terms = _distinctive_terms([task["skeleton"] for task in found])
    taken = set(old)
    for task, name, words in zip(found, matched, terms):
        if name is None:
            name = _new_name(task, words, steps[task["signature"].step] == 1, taken)
            taken.add(name)
        names.append(name)
    tasks: dict[str, dict[str, Any]] = {}
    tombstones: dict[str, dict[str, Any]] = {}
    for task, name in sorted(zip(found, names), key=lambda tn: -len(tn[0]["members"])):
        task["continues"] = [name] if name in old else []
        target = _resolve_merge(old, name, catalog_path) if name in old else name
        if target != name:
            tombstones[name] = dict(old[name], status="merged", size=len(task["members"]), dataset_version=None)
        if target in tasks:
            kept = tasks[target]
            kept["members"] = kept["members"] + task["members"]
            kept["groups"] = kept["groups"] + task["groups"]
            kept["continues"] = task["continues"] + kept["continues"]
            kept["centroid"], kept["p05"] = _centroids([kept["members"]], config, engine)[0]
        else:
            tasks[target] = task

    catalog: dict[str, dict[str, Any]] = {}
    for name, task in sorted(tasks.items(), key=lambda kv: (-len(kv[1]["members"]), kv[0])):
        previous: dict[str, str] = {}  # sessions of the versions this task continues; its own name wins
        for continued in task["continues"] + [name]:
            previous.update(_previous_splits(data_dir, old.get(continued, {}).get("dataset_version")))
        catalog[name] = _publish(name, task, old.get(name, {}), previous, data_dir, config)
    for name, entry in old.items():
        if name not in catalog and name not in tombstones:
            tombstones[name] = dict(entry, status="merged" if entry.get("merged_into") else "absent", size=0)
    catalog.update(sorted(tombstones.items()))
    for entry in catalog.values():
        CatalogEntry.model_validate(entry)  # every later stage reads it through this schema
    write_atomic(catalog_path, CATALOG_HEADER + yaml.safe_dump({"tasks": catalog}, sort_keys=False, allow_unicode=True))
    return catalog


def _publish(name: str, task: dict[str, Any], old_entry: dict[str, Any], previous: dict[str, str], data_dir: Path,
             config: MineConfig) -> dict[str, Any]:
    """The catalog entry of one task, writing its dataset version when it has enough records.

    `previous` maps sessions to their split in earlier versions (they keep it).
    """
    members = sorted(task["members"], key=lambda r: (r.timestamp, r.id))
    kind, schema = kinds.infer(members, config.max_labels)
    sig: Group = task["signature"]
    entry: dict[str, Any] = {
        "description": old_entry.get("description") or _describe(task, kind),
        "kind": kind,
        "size": len(members),
        "signature": {**sig.as_dict(), "tools": _tool_feature(members)},
        "merged_signatures": [g.as_dict() for g, _ in task["groups"].most_common() if g != sig],
        "output_schema": schema,
        "examples": [r.id for r in members[:3]],
    }
    if len(members) < config.min_examples:
        entry.update(status="not_enough_data", dataset_version=None)
        return entry
    label = (lambda r: (r.output_text or "").strip()) if kind == "classification" else (lambda r: "")
    sessions: dict[str, list[str]] = {}
    for record in members:
        sessions.setdefault(session_key(record), []).append(label(record))
    split_of = assign_splits(sessions, previous, config)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for record in members:
        splits[split_of[session_key(record)]].append(_row(record))
    version = _write_version(data_dir / check_task_name(name), splits, _card(name, entry, splits, task["skeleton"]),
                             task["centroid"])
    entry.update(status="ready", dataset_version=version,
                 embedding={"model": EMBEDDING_MODEL, "centroid": f"{name}/{version}/centroid.npy",
                            "similarity_p05": task["p05"]})
    return entry


