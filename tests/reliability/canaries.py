"""PII and secret canaries planted in agent logs, and a scan for them in the outputs.

Each canary is a unique value of a kind the curate stage promises to scrub (e-mail,
phone, credit card, SSN, IP, API keys, tokens). `plant` rewrites real sample log
lines (OpenAI proxy shape) and fine-tuning export lines (`{"messages": [...]}`) so
their user turns, and some assistant turns, carry the canaries; `scan` reads every
file under the given folders, Parquet decoded to text (its pages are compressed),
and reports where a canary survived.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

CANARIES = {
    "email": "zq7.canary.alpha@example.org",
    "phone": "(415) 555-0147",
    "credit_card": "4539 0172 8510 0000",
    "ssn": "078-05-1120",
    "ip": "203.0.113.77",
    "openai_key": "sk-canaryQ7x3Zt9Lm2Pk4Rb8Wn6Yv1Hs5Jd0",
    "aws_key": "AKIACANARY7Q3X9ZT2LM",
    "github_token": "ghp_canary0Q7x3Zt9Lm2Pk4Rb8Wn6Yv1Hs5Jd0a",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjYW5hcnkifQ.c2lnbmF0dXJlY2FuYXJ5",
}
# what the scan looks for: the value and, for digit values, its bare digits
NEEDLES = {name: {value} | ({"".join(c for c in value if c.isdigit())} if name in {"phone", "credit_card", "ssn"}
                           else set()) for name, value in CANARIES.items()}


def sentence(i: int) -> str:
    names = list(CANARIES)
    a, b = names[i % len(names)], names[(i + 4) % len(names)]
    return f" My {a.replace('_', ' ')} is {CANARIES[a]} and my {b.replace('_', ' ')} is {CANARIES[b]}."


def _plant_in(messages: list[dict], i: int) -> None:
    for m in messages:
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            m["content"] += sentence(i)


def plant_proxy(lines: list[str], every: int = 3) -> tuple[list[str], int]:
    """Every `every`-th parseable proxy-log line gets canaries in its user turn (and, for
    free-text replies, in the assistant reply too). Returns the lines and how many
    canary values were planted."""
    out, planted = [], 0
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line)
            messages = obj["request"]["messages"]
        except (ValueError, KeyError, TypeError):
            out.append(line)
            continue
        if i % every == 0 and isinstance(messages, list):
            _plant_in(messages, i)
            planted += 2
            if obj.get("metadata", {}).get("step") == "draft_reply":
                message = obj["response"]["choices"][0]["message"]
                message["content"] = f"{message['content']} We will write to {CANARIES['email']}."
                planted += 1
            line = json.dumps(obj)
        out.append(line)
    return out, planted


def plant_finetune(lines: list[str]) -> tuple[list[str], int]:
    """Canaries in the user turn of every fine-tuning export line."""
    out = []
    for i, line in enumerate(lines):
        obj = json.loads(line)
        _plant_in(obj["messages"], i)
        out.append(json.dumps(obj))
    return out, 2 * len(out)


def _text(path: Path) -> str:
    if path.suffix == ".parquet":
        return json.dumps(pq.read_table(path).to_pylist(), default=str)
    return path.read_bytes().decode("utf-8", "replace")


def scan(paths: list[Path]) -> dict[str, list[str]]:
    """{canary name: [files holding it]} over every file under `paths` (files or folders)."""
    files = [f for p in paths if p.exists() for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    found: dict[str, list[str]] = {}
    for f in files:
        text = _text(f)
        for name, needles in NEEDLES.items():
            if any(n in text for n in needles):
                found.setdefault(name, []).append(str(f))
    return found
