"""Generated malformed log lines, each of which ingest must quarantine, interleaved
with unique good ones it must keep.

Kinds: truncated JSON, wrong types, invalid UTF-8, lines over `MAX_RECORD_BYTES`,
unknown roles, top-level arrays / scalars / nulls, null or mistyped fields in
both the fine-tuning and the OpenAI proxy shapes. Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from factory.ingest import MAX_RECORD_BYTES

PROXY = {"id": "call-0", "timestamp": "2026-11-03T00:03:48.186Z",
         "metadata": {"agent": "fuzz-agent", "step": "fuzz", "session_id": "sess-0"},
         "request": {"model": "gpt-4o", "messages": [{"role": "system", "content": "Answer briefly."},
                                                     {"role": "user", "content": "q"}]},
         "response": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "a"},
                                   "finish_reason": "stop"}]}}


def good(i: int) -> dict:
    """A valid record, unique for `i`: fine-tuning shape for even i, proxy shape for odd."""
    if i % 2 == 0:
        return {"messages": [{"role": "user", "content": f"question {i}"},
                             {"role": "assistant", "content": f"answer {i}"}]}
    obj = json.loads(json.dumps(PROXY))
    obj["id"] = f"call-{i}"
    obj["request"]["messages"][1]["content"] = f"question {i}"
    obj["response"]["choices"][0]["message"]["content"] = f"answer {i}"
    return obj


def _mistyped(rng: random.Random, i: int) -> dict:
    obj = good(i)
    if "messages" in obj:
        where = rng.choice(["messages", "role", "content"])
        if where == "messages":
            obj["messages"] = rng.choice([None, 5, "text", True, 1.5, {"role": "user"}])
        elif where == "role":
            obj["messages"][0]["role"] = rng.choice([None, 5, [], True])
        else:
            obj["messages"][0]["content"] = rng.choice([5, True, 1.5, {"x": 1}])
    else:
        obj["request"]["messages"] = rng.choice([None, 5, "text", True])
    return obj


def bad_line(rng: random.Random, i: int) -> bytes:
    """One malformed line (no newline) of a random kind."""
    kind = rng.randrange(9)
    if kind == 3 and i % 100:  # keep the 1 MiB lines few: about 1 in 900
        kind = 1
    text = json.dumps(good(i))
    if kind == 0:  # truncated JSON
        return text[:rng.randrange(1, len(text) - 1)].encode()
    if kind == 1:  # wrong types
        return json.dumps(_mistyped(rng, i)).encode()
    if kind == 2:  # invalid UTF-8 inside a string
        cut = text.index("question") + 4
        return text[:cut].encode() + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"]) + text[cut:].encode()
    if kind == 3:  # over the size limit
        return b'{"messages": "' + b"x" * (MAX_RECORD_BYTES + rng.randrange(1, 1000)) + b'"}'
    if kind == 4:  # unknown role
        return text.replace('"role": "user"', f'"role": "{rng.choice(["robot", "", "USER!", "sys"])}"').encode()
    if kind == 5:  # arrays
        return rng.choice(["[]", "[1, 2]", f"[{text}]", "[null]"]).encode()
    if kind == 6:  # nulls and scalars
        return rng.choice(["null", "42", '"text"', "true", "-1.5e300"]).encode()
    if kind == 7:  # null fields
        return json.dumps({"messages": None} if i % 2 == 0 else {**good(i), "request": None}).encode()
    return json.dumps({"unrelated": i, "payload": [i]}).encode()  # an object of no known shape


def write(path: Path, bad: int, good_every: int, seed: int) -> tuple[int, int]:
    """Write `bad` malformed lines with a good one after every `good_every`; returns (bad, good)."""
    rng = random.Random(seed)
    lines, goods = [], 0
    for i in range(bad):
        lines.append(bad_line(rng, i))
        if i % good_every == 0:
            lines.append(json.dumps(good(10 * bad + goods)).encode())
            goods += 1
    path.write_bytes(b"\n".join(lines) + b"\n")
    return bad, goods
