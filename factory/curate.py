"""Curate stage: turn ingested records into training-safe ones.

Every record read is first scrubbed of PII and secrets (Presidio), then dropped
if it failed, was rated negatively, is too long, would teach a placeholder the
request never showed (PII found in its output only), or duplicates a record already
kept: exactly (same id), or nearly (MinHash LSH over the latest turns and the
output, never across different tool calls, different offered tools or different
turns of one session). Removed records are returned, scrubbed, so the caller can
quarantine them without storing raw PII.

Structured values are where tool-calling data lives, so phone, SSN and IP matches
are read in their field's context: under an argument or JSON key, or after a word,
that names a date, id, amount, version or code (`to_date`, `order_id`, "Order",
"version") they are not PII, nor when shaped like a date or part of a longer number.
The trade-off: a real phone number filed under such a name survives (one under a
phone-named key is scrubbed whatever its format).

Records stream through in small chunks (their strings are analysed in one
batch); memory holds the kept list, the LSH index with one MinHash per kept
record (~1 KB each), and a bounded cache of analysis results for repeated
strings (system prompts recur in every record).

The scrub is per record, so `curate_store` hands it to `factory.engine` (every local
core, or a Ray cluster: `ScrubBatch`); the filters and duplicate checks that follow
depend on the records kept before, so they run in order in the calling process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from itertools import islice
from pathlib import Path
from typing import Any, Literal, TextIO

import pyarrow as pa
import pyarrow.parquet as pq
import regex
import spacy
import tldextract
from datasketch import LeanMinHash, MinHash, MinHashLSH
from presidio_analyzer import (
    AnalyzerEngine,
    BatchAnalyzerEngine,
    Pattern,
    PatternRecognizer,
    RecognizerRegistry,
    RecognizerResult,
)
from presidio_analyzer.nlp_engine import SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    IpRecognizer,
    PhoneRecognizer,
    SpacyRecognizer,
    UsSsnRecognizer,
)
from pydantic import BaseModel, ConfigDict, Field
from spacy.language import Language

from factory.engine import map_sorted_parquet
from factory.io import private_dir
from factory.progress import progress
from factory.records import SCHEMA, Record, content_id, from_table, to_table

SCRUB_BATCH = 256  # records a worker scrubs per batch: small enough to spread 1,000 records over 4 workers
REASONS = ("failed", "negative_feedback", "served_by_specialist", "too_long", "pii_in_output_only", "duplicate",
           "near_duplicate")

# Presidio entity type -> placeholder label: <EMAIL_1>, <API_KEY_2>, ...
LABELS = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "CREDIT_CARD": "CREDIT_CARD",
    "IBAN_CODE": "IBAN",
    "IP_ADDRESS": "IP_ADDRESS",
    "US_SSN": "SSN",
    "PERSON": "PERSON",
    "API_KEY": "API_KEY",
    "AUTH_TOKEN": "AUTH_TOKEN",
    "PRIVATE_KEY": "PRIVATE_KEY",
}
# Values of these types are compared on their letters and digits only, so
# "4111 1111 1111 1111" and "4111-1111-1111-1111" share one placeholder.
_CANONICAL_DIGITS = {"PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN"}

# Preferred first: lg has the more accurate NER, sm is the faster fallback.
NER_MODELS = ("en_core_web_lg", "en_core_web_sm")

# Keys whose values are structure, not content: never scanned for PII.
_STRUCTURAL_KEYS = frozenset({"role", "type", "id", "tool_call_id"})

# PhoneRecognizer (python-phonenumbers) reports only numbers valid in their
# region, so a formatted number with an unassigned area code ("call me at
# 371.483.2287", "+1-611-279-2215") would survive; these catch the formats.
# Separators are required, so bare digit runs (order ids) and dates are not matched.
_FORMATTED_PHONES = [
    Pattern("nanp", r"(?<![\w+-])(?:\+?1[-. ]?)?(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}(?![\w-])", 0.4),
    Pattern("international", r"(?<![\w+])\+(?=(?:[-. ()]*\d){8})\d{1,3}(?:[-. ]\(?\d{1,6}\)?){2,5}(?![\w-])", 0.4),
]

# --- context: what a field or the word before a value says it is ---
# Entities whose patterns also match structured values (dates, ids, versions, dotted codes).
_SHAPED = frozenset({"PHONE_NUMBER", "US_SSN", "IP_ADDRESS"})
_PHONE_WORDS = frozenset({"phone", "tel", "telephone", "mobile", "cell", "fax", "msisdn", "whatsapp", "sms"})
_PERSONAL_WORDS = _PHONE_WORDS | {"email", "mail", "ssn", "social", "card", "iban", "ip", "ipv4", "ipv6", "host",
                                  "contact", "name", "person", "customer", "user"}
_STRUCTURED_WORDS = frozenset({
    "date", "time", "datetime", "timestamp", "day", "month", "year", "eta", "deadline", "check", "checkin", "checkout",
    "id", "ids", "uuid", "code", "ref", "reference", "order", "booking", "reservation", "ticket", "invoice",
    "tracking", "confirmation", "account", "case", "sku", "serial", "part", "item", "product", "flight", "pnr", "isbn",
    "version", "ver", "build", "release", "revision", "amount", "price", "total", "cost", "fee", "budget", "balance",
    "quantity", "qty", "count", "zip", "zipcode", "postal", "postcode", "section", "oid", "rule", "clause",
    "chapter", "tariff", "hs",
})
# Words skipped between a context word and its value: "order number is 123-456-7890".
_FILLERS = frozenset({"is", "was", "are", "no", "nr", "num", "number", "the", "my", "your", "our", "a"})
_WORDS = regex.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_PHONE_VALUE = regex.compile(r"\+?[\s().-]*(?:\d[\s().-]*){7,15}")
# Phone matches shaped like a date, an amount or arithmetic on amounts: 07-20-2022, 20220720, 1683.29,
# 123.11 - 155.53.
_NOT_PHONE = regex.compile(
    r"\d{1,3}(?:,\d{3})*\.\d{2}|\d+\.\d{2}"
    r"|\d+(?:\.\d{1,2})?(?:\s*[-+*/]\s*\d+(?:\.\d{1,2})?)*\s*[-+*/]\s*\d+\.\d{1,2}"  # 100 - 155.53
    r"|\d+\.\d{1,2}(?:\s*[-+*/]\s*\d+(?:\.\d{1,2})?)+"  # 123.11 - 155"
    r"|(?:0?[1-9]|1[0-2])[-./](?:0?[1-9]|[12]\d|3[01])[-./](?:\d{2}|(?:19|20)\d{2})"  # 07-20-2022, 7/20/22
    r"|(?:0?[1-9]|[12]\d|3[01])[-./](?:0?[1-9]|1[0-2])[-./](?:19|20)\d{2}"  # 20.07.2022
    r"|(?:19|20)\d{2}[-./]?(?:0[1-9]|1[0-2])[-./]?(?:0[1-9]|[12]\d|3[01])"  # 2022-07-20, 20220720
)

# Unlike Presidio's default flags, no IGNORECASE: key prefixes are case-sensitive.
_SECRET_FLAGS = regex.DOTALL | regex.MULTILINE
_SECRETS = {
    "API_KEY": [
        Pattern("openai_key", r"(?<![A-Za-z0-9_-])sk-(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9_-]{20,}", 0.95),
        Pattern("aws_access_key", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", 0.95),
        Pattern("github_token", r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,})\b", 0.95),
        Pattern("slack_token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}", 0.95),
    ],
    "AUTH_TOKEN": [
        Pattern("jwt", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", 0.95),
        Pattern("bearer", r"(?<=\b(?i:bearer)\s{1,5})[A-Za-z0-9._~+/-]{16,}=*", 0.9),
    ],
    "PRIVATE_KEY": [
        # A block cut off by log truncation is scrubbed to the end of the string.
        Pattern(
            "pem_private_key",
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|.*)",
            1.0,
        ),
    ],
}


class CurateConfig(BaseModel):
    """Curate settings; invalid values raise pydantic.ValidationError (a ValueError).

    score_threshold: minimum Presidio confidence to scrub. 0.4 keeps phone
    numbers (PhoneRecognizer scores 0.4) and dashed SSNs (0.5) while dropping
    Presidio's "very weak" SSN patterns (0.05: any 9-digit number or ddddd-dddd),
    which would otherwise eat order ids and ZIP+4 codes; a context word
    ("ssn", "social security") within a few words lifts those to 0.4.
    near_dup_shingle: "word" (3-word shingles, the default: faster, and edits
    to short texts like a changed order id fall well under 0.9) or "char"
    (5-char shingles: also catches typo-level edits in short texts, and also
    flags template-generated requests that differ only in an id, unless their
    tool calls differ: those are never near duplicates).
    analysis_cache_size: distinct strings whose analysis is kept (LRU), so the
    system prompt sent with every call is analysed once.
    scrub_chunk: records whose new strings are analysed in one batch.
    drop_specialist_served: drop calls that `factory serve` answered with a
    specialist (metadata.route == "specialist"): training on them would teach
    the next specialist its predecessor's mistakes; escalated calls are kept,
    they carry the teacher's answer.
    """

    model_config = ConfigDict(extra="forbid")

    drop_failed: bool = True
    drop_negative_feedback: bool = True
    drop_specialist_served: bool = True
    near_dup_threshold: float = Field(0.9, gt=0, le=1)
    near_dup_shingle: Literal["word", "char"] = "word"
    num_perm: int = Field(128, ge=16)
    max_tokens: int | None = Field(None, gt=0)
    score_threshold: float = Field(0.4, ge=0, le=1)
    analysis_cache_size: int = Field(16384, ge=1)
    scrub_chunk: int = Field(64, ge=1)


@dataclass
class CurateResult:
    kept: list[Record] = field(default_factory=list)
    removed: list[tuple[Record, str]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


# --- analyzer -----------------------------------------------------------------


def _field_kind(name: str) -> Literal["phone", "structured"] | None:
    """What a field name says its value is: "phone" (a phone word: `contact_phone`), "structured"
    (a date, id, amount, version or code word: `to_date`, `orderId`, "Order"), or None (anything
    else, and any name with a personal word: `customer_ip`, `email_id`)."""
    words = {w.lower() for w in _WORDS.findall(name)}
    if words & _PHONE_WORDS:
        return "phone"
    if words & _STRUCTURED_WORDS and not words & _PERSONAL_WORDS:
        return "structured"
    return None


def _lead_kind(text: str, start: int) -> Literal["phone", "structured"] | None:
    """`_field_kind` of the word before `text[start:]` (a JSON key or a word of prose, past
    filler words and punctuation); None when a number or nothing comes first."""
    tokens = regex.findall(r"[A-Za-z_]+|\d+", text[max(0, start - 48) : start])
    word = next((t for t in reversed(tokens) if t.lower() not in _FILLERS), "")
    return _field_kind(word)


def _glued(text: str, start: int, end: int) -> bool:
    """True when the span is part of a longer number: "164.00" in "3,164.00", "1.3.6.1" in "1.3.6.1.4.1"."""
    before, after = text[max(0, start - 2) : start], text[end : end + 2]
    return (before[-1:].isdigit() or (before[-1:] in {".", ",", "-", "/"} and before[:1].isdigit())
            or after[:1].isdigit() or (after[:1] in {".", ",", "-", "/"} and after[1:].isdigit()))


def _structured(text: str, result: RecognizerResult) -> bool:
    """True when a phone, SSN or IP match is a structured value: shaped like a date or an amount (phones only),
    part of a longer number, or after a word naming a date, id, amount, version or code."""
    if result.entity_type not in _SHAPED:
        return False
    value = text[result.start : result.end]
    if result.entity_type == "PHONE_NUMBER" and _NOT_PHONE.fullmatch(value.strip()):
        return True
    return _glued(text, result.start, result.end) or _lead_kind(text, result.start) == "structured"


@Language.component("slm_factory_lower_lemma")
def _lower_lemma(doc):
    """Lower-cased text as lemma, so Presidio's context words work on a blank pipeline."""
    for token in doc:
        token.lemma_ = token.lower_
    return doc


class _LoadedSpacyNlpEngine(SpacyNlpEngine):
    """SpacyNlpEngine over an already built pipeline (Presidio only loads by name)."""

    def __init__(self, nlp: Language):
        super().__init__(models=[{"lang_code": "en", "model_name": nlp.meta.get("name", "blank")}])
        self.nlp = {"en": nlp}


class _OfflineEmailRecognizer(EmailRecognizer):
    """EmailRecognizer whose TLD check uses tldextract's bundled suffix list.

    The stock recognizer fetches the public suffix list over the network on
    first use (and hangs where outbound traffic is dropped) and writes a cache
    under ~/.cache; the bundled snapshot is enough to validate a domain.
    """

    _tld = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    def validate_result(self, pattern_text: str) -> bool:
        return self._tld(pattern_text).fqdn != ""


def ner_model() -> str | None:
    """Name of the installed spaCy English NER model, or None when there is none."""
    return next((name for name in NER_MODELS if importlib.util.find_spec(name)), None)


@lru_cache(maxsize=1)
def build_analyzer() -> AnalyzerEngine:
    """The Presidio analyzer, built once per process.

    Building takes ~0.2-0.4 s on the blank pipeline (plus the spaCy model
    load when one is installed); importing presidio itself takes ~6 s.

    Recognizers for emails, phones (python-phonenumbers plus formatted-number
    patterns), cards, IBANs, IPs, US SSNs and secrets always run. PERSON is
    detected only when `ner_model()` finds a spaCy NER model; otherwise a blank
    English pipeline supplies tokens (and lower-cased lemmas for context words).
    """
    model = ner_model()
    nlp = spacy.load(model) if model else spacy.blank("en")
    if not model:
        nlp.add_pipe("slm_factory_lower_lemma")
    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in (
        _OfflineEmailRecognizer(),
        PhoneRecognizer(),
        CreditCardRecognizer(),
        IbanRecognizer(),
        IpRecognizer(),
        UsSsnRecognizer(),
    ):
        registry.add_recognizer(recognizer)
    registry.add_recognizer(
        PatternRecognizer(
            supported_entity="PHONE_NUMBER",
            name="FormattedPhoneRecognizer",
            patterns=_FORMATTED_PHONES,
            context=PhoneRecognizer.CONTEXT,
        )
    )
    for entity, patterns in _SECRETS.items():
        registry.add_recognizer(
            PatternRecognizer(supported_entity=entity, patterns=patterns, global_regex_flags=_SECRET_FLAGS)
        )
    if model:
        registry.add_recognizer(SpacyRecognizer(supported_entities=["PERSON"]))
    return AnalyzerEngine(registry=registry, nlp_engine=_LoadedSpacyNlpEngine(nlp), supported_languages=["en"])


Span = tuple[int, int, str]  # (start, end, Presidio entity type)


def _select(results: list[RecognizerResult]) -> tuple[Span, ...]:
    """Non-overlapping spans sorted by start.

    Overlaps across entity types (a phone-like run inside a PEM block, a
    number read as both SSN and phone) keep the longer span, then the higher score.
    """
    chosen: list[Span] = []
    for r in sorted(results, key=lambda r: (r.start - r.end, -r.score, r.start)):
        if all(r.end <= s or r.start >= e for s, e, _ in chosen):
            chosen.append((r.start, r.end, r.entity_type))
    return tuple(sorted(chosen))


def _trimmed(text: str, result: RecognizerResult) -> RecognizerResult:
    """An e-mail match without the `name='` or `name="` of code it swallowed (the recognizer's
    local part allows = and quotes): `email='ann@example.com'` gives ann@example.com, the
    value its request holds."""
    if result.entity_type == "EMAIL_ADDRESS":
        lead = regex.match(r"[\w.-]*=['\"`]", text[result.start : result.end])
        if lead:
            result.start += lead.end()
    return result


class _SpanFinder:
    """text -> PII spans, analysed in batches and cached per distinct string; phone, SSN and IP
    matches that `_structured` calls structured values are dropped, e-mails `_trimmed`.

    `prefetch` runs new strings through BatchAnalyzerEngine, which feeds
    spaCy's `pipe`: on the blank pipeline it measures the same as one
    `analyze` per text (tokenising is cheap), with an NER model batching is
    what spaCy recommends. The cache is a bounded LRU: a system prompt sent
    with every call is analysed once (2.4x the records/s on short chats).
    """

    def __init__(self, threshold: float, cache_size: int):
        self.batch = BatchAnalyzerEngine(build_analyzer())
        self.threshold = threshold
        self.cache_size = cache_size
        self.cache: OrderedDict[str, tuple[Span, ...]] = OrderedDict()

    def prefetch(self, texts: Iterable[str]) -> None:
        new = list(dict.fromkeys(t for t in texts if t not in self.cache))
        results = self.batch.analyze_iterator(new, language="en", batch_size=64, score_threshold=self.threshold)
        for text, found in zip(new, results):
            self.cache[text] = _select([_trimmed(text, r) for r in found if not _structured(text, r)])
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)

    def __call__(self, text: str) -> tuple[Span, ...]:
        if text not in self.cache:
            self.prefetch([text])
        self.cache.move_to_end(text)
        return self.cache[text]


# --- scrubbing ----------------------------------------------------------------


class _Placeholders:
    """Per-record value -> placeholder map, numbered per label in order of first use; `raw`
    holds each value as written (every spelling of it) with its placeholder."""

    def __init__(self) -> None:
        self.by_value: dict[tuple[str, str], str] = {}
        self.per_label: Counter[str] = Counter()
        self.raw: dict[str, str] = {}

    def get(self, entity: str, value: str) -> str:
        label = LABELS[entity]
        canonical = value
        if entity in _CANONICAL_DIGITS:
            canonical = "".join(ch for ch in value.lower() if ch.isalnum())
        elif entity == "EMAIL_ADDRESS":
            canonical = value.lower()
        key = (label, canonical)
        if key not in self.by_value:
            self.per_label[label] += 1
            self.by_value[key] = f"<{label}_{self.per_label[label]}>"
        self.raw.setdefault(value, self.by_value[key])
        return self.by_value[key]


def _map_strings(obj: Any, fn: Callable[[str, str | None], str], key: str | None = None) -> Any:
    """Copy of a JSON-like value with `fn(string, key)` applied to every string value, `key` being
    the dict key it sits under (list items get their list's; None outside any dict).

    Dict keys and the values of structural keys (role, type, ids) are left as is.
    """
    if isinstance(obj, str):
        return fn(obj, key)
    if isinstance(obj, dict):
        return {k: v if k in _STRUCTURAL_KEYS else _map_strings(v, fn, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_strings(v, fn, key) for v in obj]
    return obj


def _content_parts(record: Record) -> list[Any]:
    """The scanned parts, in placeholder-numbering order: messages, output text,
    tool-call arguments, metadata. Tool schemas and identifier fields
    (session_id, source_id, ...) are not scanned."""
    arguments = [call.get("arguments") for call in record.output_tool_calls]
    return [record.messages, record.output_text, arguments, record.metadata]


def _record_strings(record: Record) -> list[str]:
    found: list[str] = []

    def collect(text: str, key: str | None) -> str:
        found.append(text)
        return text

    _map_strings(_content_parts(record), collect)
    return found


def _keyed_spans(find: _SpanFinder, text: str, key: str | None) -> tuple[Span, ...]:
    """The PII spans of `text` held under the field `key`: none of phone, SSN or IP type under
    a structured name (`to_date`, `order_id`); the whole value as a phone under a phone name
    (`contact_phone`) when it is only digits and phone punctuation but no recognizer took it."""
    spans = find(text)
    kind = _field_kind(key) if key else None
    if kind == "structured":
        return tuple(span for span in spans if span[2] not in _SHAPED)
    if kind == "phone" and not spans and _PHONE_VALUE.fullmatch(text.strip()):
        return ((0, len(text), "PHONE_NUMBER"),)
    return spans


def _scrub_record(record: Record, find: _SpanFinder) -> tuple[Record, Counter[str], list[str]]:
    """Record with every PII span replaced by its placeholder, and the id recomputed; its
    placeholders counted per label; and where its output holds a placeholder its input (the
    messages) does not, as "field: LABEL" ("output_tool_calls[0].arguments.to: PHONE").

    A value found anywhere in the record is replaced wherever else it is written too (word
    bounded), so a value the input and the output share gets one placeholder even where
    only one side was recognised; the cost is one regex pass per string of a record with PII.
    """
    placeholders = _Placeholders()
    spans: dict[tuple[str, str | None], tuple[Span, ...]] = {}

    def register(text: str, key: str | None) -> str:
        found = spans[text, key] = _keyed_spans(find, text, key)
        for start, end, entity in found:
            placeholders.get(entity, text[start:end])
        return text

    _map_strings(_content_parts(record), register)
    raw = placeholders.raw
    # most records hold no PII: no pattern to build or run for them
    known = regex.compile(r"(?<!\w)(?:%s)(?!\w)" % "|".join(map(regex.escape, sorted(raw, key=len, reverse=True)))) \
        if raw else None

    def scrub(field: str, emitted: set[tuple[str, str]], text: str, key: str | None) -> str:
        where = f"{field}.{key}" if key else field

        def put(placeholder: str) -> str:
            emitted.add((where, placeholder))
            return placeholder

        def fill(segment: str) -> str:
            return known.sub(lambda m: put(raw[m.group()]), segment) if known else segment

        parts, last = [], 0
        for start, end, entity in spans[text, key]:
            parts += [fill(text[last:start]), put(placeholders.get(entity, text[start:end]))]
            last = end
        return "".join(parts) + fill(text[last:])

    given: set[tuple[str, str]] = set()
    messages = _map_strings(record.messages, partial(scrub, "messages", given))
    shown: set[tuple[str, str]] = set()
    output_text = _map_strings(record.output_text, partial(scrub, "output_text", shown))
    tool_calls = [{**call, "arguments": _map_strings(call.get("arguments"),
                                                     partial(scrub, f"output_tool_calls[{i}].arguments", shown))}
                  for i, call in enumerate(record.output_tool_calls)]
    metadata = _map_strings(record.metadata, partial(scrub, "metadata", set()))
    in_input = {placeholder for _, placeholder in given}
    output_only = sorted({f"{where}: {p[1:].rsplit('_', 1)[0]}" for where, p in shown if p not in in_input})
    scrubbed = replace(
        record,
        id=content_id(messages, record.tools, output_text, tool_calls),
        messages=messages,
        output_text=output_text,
        output_tool_calls=tool_calls,
        metadata=metadata,
    )
    return scrubbed, placeholders.per_label, output_only


# --- filters ------------------------------------------------------------------


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    text = content if isinstance(content, str) else ""
    if message.get("tool_calls"):
        text += " " + json.dumps(message["tool_calls"], sort_keys=True, ensure_ascii=False)
    return text


def _output_text(record: Record) -> str:
    calls = json.dumps(record.output_tool_calls, sort_keys=True, ensure_ascii=False) if record.output_tool_calls else ""
    return f"{record.output_text or ''} {calls}"


def _latest_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages after the last assistant one (the new user message and/or tool results).

    A request that ends with an assistant message (a prefilled answer) keeps the turns
    before it too: only an assistant message followed by others closes the history.
    """
    cut = max((i for i, m in enumerate(messages[:-1]) if m.get("role") == "assistant"), default=-1)
    return messages[cut + 1 :]


def _dedup_text(record: Record) -> str:
    """Normalised latest turns + output, for near-duplicate detection.

    Left out: system messages (one agent step sends the same, often long, system prompt
    with every call) and the history before the last assistant message (consecutive turns
    of one dialogue share it). The trade-off: two calls of different dialogues that end in
    the same new message and get the same output compare as near duplicates whatever
    came before.
    """
    latest = [m for m in _latest_turns(record.messages) if m.get("role") != "system"]
    parts = [f"{m.get('role')}: {_message_text(m)}" for m in latest]
    parts.append(f"output: {_output_text(record)}")
    return " ".join(" ".join(parts).lower().split())


def _offered_tools(record: Record) -> list[list[Any]]:
    """The request's tools as sorted [name, sorted parameter names] pairs (OpenAI shape, or a
    bare function spec); what a schema says beyond its names is left out."""
    offered = []
    for tool in record.tools:
        spec = tool.get("function", tool) if isinstance(tool, dict) else {}
        spec = spec if isinstance(spec, dict) else {}
        parameters = spec.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        offered.append([str(spec.get("name")), sorted(properties) if isinstance(properties, dict) else []])
    return sorted(offered)


def _dedup_guard(record: Record) -> tuple[bytes, str, int]:
    """What two near duplicates must share: the exact tool calls and the offered tools' and
    their parameters' names (an 8-byte digest of both, canonical JSON: a call with other
    argument values is another answer, and the same request offered other tools teaches
    choosing among them, however alike the text), and, within one session, the number of
    messages (another turn of the dialogue). Tool descriptions are left out, so the same
    tools with a reworded description still make near duplicates."""
    calls = json.dumps([record.output_tool_calls, _offered_tools(record)], sort_keys=True, ensure_ascii=False,
                       separators=(",", ":"))
    digest = hashlib.blake2b(calls.encode(), digest_size=8).digest()
    return digest, record.session_id, len(record.messages)


def _compatible(a: tuple[bytes, str, int], b: tuple[bytes, str, int]) -> bool:
    """False when the guards tell two records apart (see `_dedup_guard`)."""
    (calls_a, session_a, turns_a), (calls_b, session_b, turns_b) = a, b
    return calls_a == calls_b and not (session_a and session_a == session_b and turns_a != turns_b)


def _shingles(text: str, kind: str) -> set[bytes]:
    if kind == "word":
        words = text.split()
        grams = {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))}
    else:
        grams = {text[i : i + 5] for i in range(max(1, len(text) - 4))}
    return {g.encode() for g in grams}


def _token_text(record: Record) -> str:
    """Text whose token count approximates the training example's length.

    Chat-template tokens (role markers, separators) are not counted, so keep
    `max_tokens` a little under the real context limit.
    """
    parts = [_message_text(m) for m in record.messages]
    if record.tools:
        parts.append(json.dumps(record.tools, ensure_ascii=False))
    parts.append(_output_text(record))
    return "\n".join(parts)


class _NearDuplicates:
    """MinHash LSH index of kept records; a candidate is confirmed on estimated Jaccard
    and on `_compatible` guards (~200 bytes per kept record next to its ~1 KB MinHash)."""

    def __init__(self, config: CurateConfig):
        self.threshold = config.near_dup_threshold
        self.num_perm = config.num_perm
        self.shingle = config.near_dup_shingle
        self.lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        self.signatures: dict[int, LeanMinHash] = {}
        self.guards: dict[int, tuple[bytes, str, int]] = {}

    def check_and_add(self, record: Record) -> bool:
        """True if `record` nearly duplicates an indexed one; otherwise index it."""
        minhash = MinHash(num_perm=self.num_perm)
        minhash.update_batch(_shingles(_dedup_text(record), self.shingle))
        guard = _dedup_guard(record)
        if any(
            _compatible(guard, self.guards[key]) and minhash.jaccard(self.signatures[key]) >= self.threshold
            for key in self.lsh.query(minhash)
        ):
            return True
        key = len(self.signatures)
        self.signatures[key] = LeanMinHash(minhash)
        self.guards[key] = guard
        self.lsh.insert(key, self.signatures[key])
        return False


# --- stage --------------------------------------------------------------------


Scrubbed = tuple[Record, list[str]]  # a scrubbed record and its output-only placeholders (see `_scrub_record`)


def _scrubbed(records: Iterable[Record], find: _SpanFinder,
              chunk: int) -> Iterator[tuple[Record, Counter[str], list[str]]]:
    """`_scrub_record` of each record, in order; strings are analysed `chunk` records at a time."""
    records = iter(records)
    while batch := list(islice(records, chunk)):
        find.prefetch(text for record in batch for text in _record_strings(record))
        for record in batch:
            yield _scrub_record(record, find)


def _decisions(
    scrubbed: Iterable[Scrubbed], config: CurateConfig, count_tokens: Callable[[str], int] | None
) -> Iterator[tuple[Record, str | None, str | None]]:
    """Each scrubbed record with the reason it is removed (None: kept) and, for
    pii_in_output_only, the fields and labels; in order; sequential, since whether a record
    duplicates another depends on every record kept before it."""
    seen_ids: set[str] = set()
    near = _NearDuplicates(config)
    for record, output_only in scrubbed:
        if config.drop_failed and record.outcome == "error":
            reason = "failed"
        elif config.drop_negative_feedback and record.feedback is not None and record.feedback < 0:
            reason = "negative_feedback"
        elif config.drop_specialist_served and record.metadata.get("route") == "specialist":
            reason = "served_by_specialist"
        elif config.max_tokens is not None and count_tokens(_token_text(record)) > config.max_tokens:
            reason = "too_long"
        elif output_only:
            reason = "pii_in_output_only"
        elif record.id in seen_ids:
            reason = "duplicate"
        elif near.check_and_add(record):
            reason = "near_duplicate"
        else:
            seen_ids.add(record.id)
            reason = None
        yield record, reason, ", ".join(output_only) if reason == "pii_in_output_only" else None


class ScrubBatch:
    """The per-record scrub as a batch function for `factory.engine`: an Arrow table of records
    in, the scrubbed records out with a `pii` column (each record's placeholder counts, JSON)
    and a `pii_output_only` one (its output-only placeholders, JSON).

    Built once per worker (the Presidio analyzer and its cache of analysed strings)."""

    def __init__(self, config: CurateConfig):
        self.find = _SpanFinder(config.score_threshold, config.analysis_cache_size)
        self.chunk = config.scrub_chunk

    def __call__(self, table: pa.Table) -> pa.Table:
        done = list(_scrubbed(from_table(table.select(SCHEMA.names)), self.find, self.chunk))
        counts = pa.array([json.dumps(dict(c)) for _, c, _ in done], pa.string())
        output_only = pa.array([json.dumps(o) for _, _, o in done], pa.string())
        table = to_table([record for record, _, _ in done])
        return table.append_column("pii", counts).append_column("pii_output_only", output_only)


def _unpack(tables: Iterable[pa.Table], pii: Counter[str]) -> Iterator[Scrubbed]:
    """The records of `ScrubBatch`'s output tables with their output-only placeholders, their
    placeholder counts added to `pii`."""
    for table in tables:
        for counts in table.column("pii").to_pylist():
            pii.update(json.loads(counts))
        output_only = [json.loads(o) for o in table.column("pii_output_only").to_pylist()]
        yield from zip(from_table(table.select(SCHEMA.names)), output_only)


def curate(
    records: Iterable[Record], config: CurateConfig | None = None, count_tokens: Callable[[str], int] | None = None
) -> CurateResult:
    """Scrub, filter and deduplicate `records`, keeping the first of any duplicates.

    Checks run in order failed, negative_feedback, served_by_specialist, too_long,
    pii_in_output_only, duplicate, near_duplicate; a record removed for an earlier
    reason never enters the duplicate indexes, so a later good copy of it is kept.
    pii_in_output_only: the scrubbed output holds a placeholder for a value the request's
    messages never held (a teacher's date read as a phone, an address it made up); trained
    on, the specialist would learn to write the placeholder, so the record is set aside
    (scrubbed, as every removed record) rather than kept.

    Raises ValueError when `config.max_tokens` is set without `count_tokens`.
    """
    config = config or CurateConfig()
    if config.max_tokens is not None and count_tokens is None:
        raise ValueError("max_tokens needs a count_tokens function")
    pii: Counter[str] = Counter()
    result = CurateResult()
    find = _SpanFinder(config.score_threshold, config.analysis_cache_size)

    def scrubbed() -> Iterator[Scrubbed]:
        for record, counts, output_only in _scrubbed(records, find, config.scrub_chunk):
            pii.update(counts)
            yield record, output_only

    for record, reason, _ in _decisions(scrubbed(), config, count_tokens):
        if reason is None:
            result.kept.append(record)
        else:
            result.removed.append((record, reason))
    removed = Counter(reason for _, reason in result.removed)
    result.report = {
        "read": len(result.kept) + len(result.removed),
        "kept": len(result.kept),
        "removed": {reason: removed[reason] for reason in REASONS},
        "pii_placeholders": dict(sorted(pii.items())),
    }
    return result


def token_counter(base_model: str | None = None) -> Callable[[str], int]:
    """Count tokens with the tokenizer of `base_model` (a recipe's base_model name;
    None: the default recipe's, or the embedded model where no recipes folder is found).

    Resolved with `factory.base_model.resolve_base` and loaded with transformers'
    AutoTokenizer, locally only (the embedded model is converted on first use).
    Special tokens are not counted. Raises ValueError / FileNotFoundError for a
    bad name and OSError when no tokenizer can be loaded from it.
    """
    from transformers import AutoTokenizer

    from factory.base_model import EMBEDDED_NAME, resolve_base
    from factory.recipe import RecipeError, load_recipe

    if base_model is None:
        try:
            base_model = load_recipe()[0].base_model
        except RecipeError:
            base_model = EMBEDDED_NAME
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(base_model))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


def _open_private(path: Path) -> TextIO:
    """`path` opened for writing text, truncated and 0600 (also when a crashed run left it
    behind with other modes). Raises OSError as os.open does."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "w", encoding="utf-8")


def curate_store(
    raw_dir: Path,
    out: Path,
    quarantine: Path,
    report_path: Path,
    config: CurateConfig | None = None,
    count_tokens: Callable[[str], int] | None = None,
    batch_size: int = 2_000,
    engine: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Curate every record of the Parquet folder `raw_dir`, oldest first (ties by id);
    write the kept ones to `out` (Parquet), the removed ones, scrubbed, with their reason
    to `quarantine` (JSONL, 0600 in a 0700 folder: scrubbing misses what no recognizer
    knows, so it stays readable by its owner alone), and the report to `report_path`;
    return the report.

    The scrub (Presidio, ~2 ms a record) is per record, so `factory.engine` maps it in
    batches of `SCRUB_BATCH` records over `workers` local processes (default: every core) or
    a Ray cluster (`engine`, default $FACTORY_ENGINE or local); the filters and the duplicate
    indexes then run here, in order, on the scrubbed stream, so every engine writes the same
    bytes. Memory here holds the few batches in flight, the duplicate indexes and
    `batch_size` kept records (written out in row groups); the local engine also holds the
    raw records' Arrow buffers (sorting needs them all; Ray sorts in its object store): ~6 GB
    in all here for 1M sample records, each worker ~0.6 GB (`bench/million.py`).
    Every file is written to a temporary name and renamed. A progress bar counts the
    records on stderr when it is a terminal (`factory.progress`). Raises ValueError as
    `curate` does, FactoryError for a bad engine or worker count.
    """
    config = config or CurateConfig()
    if config.max_tokens is not None and count_tokens is None:
        raise ValueError("max_tokens needs a count_tokens function")
    parts = sorted(raw_dir.glob("*.parquet"))
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    pii: Counter[str] = Counter()
    removed: Counter[str] = Counter()
    kept: list[Record] = []
    read = 0
    out_tmp, quarantine_tmp = out.with_name(f".{out.name}.tmp"), quarantine.with_name(f".{quarantine.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    private_dir(quarantine.parent)
    tables = map_sorted_parquet(partial(ScrubBatch, config), parts, SCHEMA, ["timestamp", "id"], SCRUB_BATCH,
                                engine, workers)
    try:
        with pq.ParquetWriter(out_tmp, SCHEMA) as writer, _open_private(quarantine_tmp) as rejects:
            decisions = _decisions(_unpack(tables, pii), config, count_tokens)
            for record, reason, detail in progress(decisions, total, "curate", "record"):
                read += 1
                if reason is None:
                    kept.append(record)
                    if len(kept) >= batch_size:
                        writer.write_table(to_table(kept))
                        kept = []
                else:
                    removed[reason] += 1
                    row = {"reason": reason, **({"detail": detail} if detail else {}), **record.to_row()}
                    rejects.write(json.dumps(row, ensure_ascii=False) + "\n")
            writer.write_table(to_table(kept))
    except BaseException:  # a worker lost, an interrupt: the previous outputs stay as they were
        out_tmp.unlink(missing_ok=True)
        quarantine_tmp.unlink(missing_ok=True)
        raise
    report = {
        "read": read,
        "kept": read - sum(removed.values()),
        "removed": {reason: removed[reason] for reason in REASONS},
        "pii_placeholders": dict(sorted(pii.items())),
    }
    report_tmp = report_path.with_name(f".{report_path.name}.tmp")
    report_tmp.write_text(json.dumps(report, indent=2))
    os.replace(out_tmp, out)
    os.replace(quarantine_tmp, quarantine)
    os.replace(report_tmp, report_path)
    return report
