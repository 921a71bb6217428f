#!/usr/bin/env python3
"""Seeded generator for the sample logs of "acme-support", a fictional customer-support agent.

Usage:  python datasets/samples/generate.py [--seed 0] [--sessions 750] [--out datasets/samples]

Python stdlib only; the same seed always writes byte-identical files (one random.Random(seed),
no clock). Every file is written atomically (temp file in the same folder, then os.replace).

What is planted, and why
------------------------
A session runs `classify_intent` first, then 1-3 of `order_action`, `extract_ticket`,
`draft_reply` (in that order). These are the four subtasks a factory should find and distill:

1. classify_intent  label: billing | shipping | returns | technical | account | other
2. order_action     exactly one tool call: get_order_status / cancel_order / issue_refund
3. extract_ticket   compact JSON {product, issue, urgency, order_id}
4. draft_reply      one-two sentence reply = opening(intent) + body(order status)

Each correct output is a deterministic function of the input (the issue phrase is copied
verbatim, urgency follows cue phrases, the reply follows two small template tables), so a 135M
model can learn it from a few hundred examples. Prompts are short; user messages vary a lot
(templates x products x order ids x openers/closers) so accidental exact duplicates are rare.

Dirt, as exact rates of the calls (counts for the defaults, seed 0 and 750 sessions, in brackets):
- teacher mistakes 4% of the non-failed calls: wrong label, wrong tool or argument, wrong JSON
  field, off-topic reply [86]
- failed calls 3%: half `response.error` rate_limit_error with no choices [33], half
  `metadata.status = "error"` with the output logged but the step failed [33]
- exact duplicates 2%: the same line written twice, same id [44]
- near duplicates 2%: the same request with a whitespace/case/punctuation change, new id,
  same correct output [44]
- PII in ~15% of user messages: emails, US phone numbers, Luhn-valid card numbers, a few "sk-"
  and "AKIA" keys [353 of 2,255 calls]. PII appears ONLY in inputs, never in an output, so
  scrubbing inputs never changes a ground truth (checked by an assert at the end)
- 10 malformed lines: 2 truncated JSON, 2 non-JSON, 1 JSON array, 2 missing "request",
  2 with an unknown message role, 1 with invalid UTF-8 bytes
Defaults give 2,211 calls + 44 near duplicates = 2,255 logged calls, 2,189 of them not failed.

Files (under --out): logs/support-agent-2026-11-0{3,4,5,6}.jsonl (proxy-logged calls, one file per
day), logs/finetune-export.jsonl (120 classify_intent records in the fine-tuning chat shape),
truth.jsonl (per logged call id: task, the CORRECT output, teacher_correct - false where the
logged output is wrong or missing - and planted tags), README.md (counts; written from this run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import string
import tempfile
from pathlib import Path
from random import Random

AGENT, MODEL = "acme-support", "gpt-4o-2024-08-06"
DAYS = [dt.datetime(2026, 11, d) for d in (3, 4, 5, 6)]
RATES = {"failed": 0.03, "teacher_wrong": 0.04, "exact_dup": 0.02, "near_dup": 0.02, "pii": 0.15}
N_FINETUNE = 120
INTENTS = ["billing", "shipping", "returns", "technical", "account", "other"]

SYSTEM = {
    "classify_intent": "Classify the customer's message into exactly one intent: billing, shipping, "
    "returns, technical, account, other. Answer with the intent label only.",
    "order_action": "You are Acme's order assistant. Call the right tool for the customer's request.",
    "extract_ticket": 'Extract the support ticket as compact JSON with keys product (string), issue '
    '(short phrase), urgency ("low"|"medium"|"high"), order_id (string or null). Answer with JSON only.',
    "draft_reply": "Write a short, polite reply (one or two sentences) to the customer.",
}


def _tool(name: str, desc: str, props: dict, required: list[str]) -> dict:
    params = {"type": "object", "properties": props, "required": required}
    return {"type": "function", "function": {"name": name, "description": desc, "parameters": params}}


_OID = {"type": "string", "description": "Order id, e.g. A12345"}
TOOLS = [
    _tool("get_order_status", "Look up the status of an order.", {"order_id": _OID}, ["order_id"]),
    _tool("cancel_order", "Cancel an order that has not shipped.",
          {"order_id": _OID, "reason": {"type": "string"}}, ["order_id"]),
    _tool("issue_refund", "Refund an amount in USD for an order.",
          {"order_id": _OID, "amount": {"type": "number"}}, ["order_id", "amount"]),
]

PRODUCTS = ["wireless earbuds", "smart thermostat", "robot vacuum", "coffee grinder", "fitness tracker",
            "bluetooth speaker", "electric kettle", "desk lamp", "webcam", "mechanical keyboard",
            "air purifier", "baby monitor", "smart doorbell", "portable charger", "gaming mouse",
            "standing desk", "water filter", "hair dryer", "security camera", "e-reader"]
CITIES = ["Denver", "Austin", "Portland", "Boston", "Chicago", "Seattle", "Miami", "Phoenix"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
OPENERS = [""] * 4 + ["Hi.", "Hello!", "Hi there.", "Good morning.", "Hello team.", "Hey.", "Hi Acme.",
                      "Quick question."]
CLOSERS = [""] * 4 + ["Thanks!", "Thank you.", "Please help.", "Any update?", "Appreciate it.", "Thanks in advance.",
                      "Cheers.", "Thanks a lot."]

CLASSIFY = {
    "billing": ["I was charged twice for my {product} order {oid}.", "My invoice for order {oid} has the wrong total.",
                "Why is there a charge of ${amt} on my statement?", "I see a pending charge of ${amt} I don't know.",
                "I was billed ${amt} but the {product} was on sale.", "My payment for the {product} keeps failing.",
                "Can you explain the extra ${amt} fee on my last bill?"],
    "shipping": ["Where is my order {oid}? It hasn't arrived yet.", "Can I change the delivery address for {oid}?",
                 "My {product} was due {day} but tracking hasn't updated.",
                 "The tracking number for my {product} doesn't work.", "How long does shipping to {city} usually take?",
                 "My package says delivered but I never got the {product}.",
                 "Is expedited shipping available for the {product}?"],
    "returns": ["I want to return the {product} I bought last week.", "How do I send back order {oid}?",
                "The {product} isn't what I expected, can I exchange it?", "I need a return label for my {product}.",
                "What is your return policy for an opened {product}?",
                "I returned order {oid} two weeks ago and heard nothing."],
    "technical": ["My {product} won't turn on after charging overnight.", "The {product} keeps dropping the wifi.",
                  "How do I reset my {product} to factory settings?", "The app won't pair with my {product}.",
                  "My {product} shows error code E{code}.", "The latest firmware update broke my {product}."],
    "account": ["I can't log in to my account since {day}.", "Can I merge my two accounts? One has order {oid}.",
                "How do I change the email on the account for order {oid}?",
                "Please delete my account and all my data after order {oid}.",
                "I asked for a password reset on {day} but never got the link.",
                "My account got locked after {n} login attempts."],
    "other": ["Do you have a store in {city}?", "Are you hiring in {city} for the holiday season?",
              "What are your opening hours on {day}?", "Do your {city} stores sell gift cards?",
              "I just wanted to say the {product} is great!", "Where can I leave a review for the {product}?"],
}
STATUS_T = ["Where is my order {oid}?", "Can you check the status of order {oid}?", "Has order {oid} shipped yet?",
            "Any news on {oid}? I ordered a {product}.", "Please track order {oid} for me."]
CANCEL_T = ["Cancel order {oid}, reason: {reason}.", "Please cancel {oid} - {reason}.",
            "I want to cancel order {oid} ({reason})."]
CANCEL_BARE = ["Please cancel my order {oid}.", "Cancel {oid} right away.", "I need order {oid} cancelled."]
REASONS = ["ordered by mistake", "found a better price elsewhere", "no longer needed", "delivery is too slow"]
REFUND_T = ["I'd like a refund of ${amt} for order {oid}.", "Refund {oid} for ${amt} please.",
            "Please refund ${amt} on order {oid}, the {product} was damaged.",
            "The {product} from order {oid} was missing, refund me ${amt}."]
EXTRACT_T = ["My {product}{order} {issue}.", "The {product} I bought{order} {issue}.",
             "Problem with my {product}{order}: it {issue}.", "Ugh, the new {product}{order} {issue}."]
ORDER_PART = [" (order {oid})", " from order {oid}", ", order {oid},"]
ISSUES = ["won't turn on", "arrived damaged", "stopped charging", "keeps disconnecting", "makes a loud buzzing noise",
          "is missing parts", "has a cracked screen", "overheats quickly", "drains the battery fast",
          "shows the wrong time", "will not pair", "leaks water"]
URGENCY_CUES = {"high": ["This is urgent.", "Please fix this ASAP.", "I need it working today."],
                "low": ["No rush.", "Whenever you have time.", "It can wait a few days."],
                "medium": ["", "", "Please take a look."]}
REPLY_OPEN = {"billing": "Thanks for contacting us about your bill.",
              "shipping": "Thanks for checking on your delivery.",
              "returns": "Thanks for reaching out about your return.",
              "technical": "Sorry your device is giving you trouble.",
              "account": "Thanks for contacting us about your account.",
              "other": "Thanks for reaching out to Acme."}
REPLY_BODY = {"shipped": "Your order {oid} has shipped and should arrive on {day}.",
              "processing": "Your order {oid} is being processed and will ship soon.",
              "delivered": "Our records show order {oid} was delivered on {day}.",
              "refunded": "A refund of ${amt} for order {oid} has been issued and should appear within 5-7 days.",
              "cancelled": "Order {oid} has been cancelled, so you will not be charged."}
STATUS_FACT = {"shipped": "shipped, arriving {day}", "processing": "processing", "delivered": "delivered on {day}",
               "refunded": "refund of ${amt} issued", "cancelled": "cancelled"}
OFF_TOPIC = ["Our stores are open 9am to 6pm, Monday through Saturday.",
             "Check out our new winter collection, now 20% off!", "Have you tried turning it off and on again?"]
ERRORS = ["order service timeout after 30000 ms", "tool execution failed: upstream 502",
          "guardrail rejected the output"]
NAMES = ["john.smith", "maria.garcia", "li.wei", "sam.o.connor", "priya.patel", "jane_doe", "tom.b", "ana.silva"]
DOMAINS = ["gmail.com", "yahoo.com", "outlook.com", "proton.me", "example.org", "icloud.com"]


# ---------------------------------------------------------------- PII (inputs only)

def luhn_card(rng: Random) -> str:
    digits = [4] if rng.random() < 0.6 else [5, rng.randint(1, 5)]
    digits += [rng.randint(0, 9) for _ in range(15 - len(digits))]
    total = sum(d if i % 2 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(reversed(digits)))
    digits.append((10 - total % 10) % 10)
    s = "".join(map(str, digits))
    sep = rng.choice([" ", "-", ""])
    return sep.join(s[i:i + 4] for i in range(0, 16, 4))


def phone(rng: Random) -> str:
    a, b, c = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
    return rng.choice(["({a}) {b}-{c:04d}", "{a}-{b}-{c:04d}", "{a}.{b}.{c:04d}", "+1 {a} {b} {c:04d}",
                       "+1-{a}-{b}-{c:04d}"]).format(a=a, b=b, c=c)


def pii_sentence(rng: Random) -> tuple[str, str]:
    kind = rng.choices(["email", "phone", "card", "sk", "aws"], weights=[37, 32, 25, 3, 3])[0]
    if kind == "email":
        v = f"{rng.choice(NAMES)}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}"
        return rng.choice(["You can reach me at {v}.", "My email is {v}."]).format(v=v), v
    if kind == "phone":
        v = phone(rng)
        return rng.choice(["Call me at {v}.", "My number is {v}."]).format(v=v), v
    if kind == "card":
        v = luhn_card(rng)
        return rng.choice(["My card is {v}.", "I paid with card {v}."]).format(v=v), v
    alnum = string.ascii_letters + string.digits
    v = ("sk-" + "".join(rng.choice(alnum) for _ in range(40)) if kind == "sk"
         else "AKIA" + "".join(rng.choice(string.ascii_uppercase + "234567") for _ in range(16)))
    return f"I pasted my key {v} into the app settings.", v


def dress(rng: Random, core: str, pii: set[str], extra: str = "") -> str:
    """Wrap a core request in an optional opener/closer, sometimes with a PII sentence."""
    parts = [rng.choice(OPENERS), core, extra]
    if rng.random() < RATES["pii"]:
        sentence, value = pii_sentence(rng)
        pii.add(value)
        parts.append(sentence)
    parts.append(rng.choice(CLOSERS))
    return " ".join(p for p in parts if p)


# ---------------------------------------------------------------- the four subtasks

def new_scene(rng: Random) -> dict:
    status = rng.choice(list(REPLY_BODY))
    return {"intent": rng.choice(INTENTS), "product": rng.choice(PRODUCTS), "status": status,
            "oid": f"A{rng.randint(10000, 99999)}", "amt": f"{rng.uniform(5, 300):.2f}",
            "day": rng.choice(WEEKDAYS), "city": rng.choice(CITIES), "code": rng.randint(10, 99),
            "n": rng.randint(3, 9)}


def classify_intent(rng: Random, sc: dict, pii: set[str]) -> tuple[str, dict]:
    core = rng.choice(CLASSIFY[sc["intent"]]).format(**sc)
    return dress(rng, core, pii), {"content": sc["intent"]}


def order_action(rng: Random, sc: dict, pii: set[str]) -> tuple[str, dict]:
    kind = rng.choice(["get_order_status", "cancel_order", "issue_refund"])
    args = {"order_id": sc["oid"]}
    if kind == "get_order_status":
        core = rng.choice(STATUS_T).format(**sc)
    elif kind == "cancel_order" and rng.random() < 0.6:
        args["reason"] = rng.choice(REASONS)
        core = rng.choice(CANCEL_T).format(reason=args["reason"], **sc)
    elif kind == "cancel_order":
        core = rng.choice(CANCEL_BARE).format(**sc)
    else:
        args["amount"] = float(sc["amt"])
        core = rng.choice(REFUND_T).format(**sc)
    return dress(rng, core, pii), {"tool_calls": [{"name": kind, "arguments": args}]}


def extract_ticket(rng: Random, sc: dict, pii: set[str]) -> tuple[str, dict]:
    issue, urgency = rng.choice(ISSUES), rng.choice(list(URGENCY_CUES))
    oid = sc["oid"] if rng.random() < 0.6 else None
    order = rng.choice(ORDER_PART).format(oid=oid) if oid else ""
    core = rng.choice(EXTRACT_T).format(product=sc["product"], order=order, issue=issue)
    ticket = {"product": sc["product"], "issue": issue, "urgency": urgency, "order_id": oid}
    return dress(rng, core, pii, rng.choice(URGENCY_CUES[urgency])), {"content": compact(ticket)}


def draft_reply(sc: dict, message: str) -> tuple[str, dict]:
    fact = STATUS_FACT[sc["status"]].format(**sc)
    user = f"Customer intent: {sc['intent']}. Order {sc['oid']} status: {fact}. Message: {message}"
    reply = REPLY_OPEN[sc["intent"]] + " " + REPLY_BODY[sc["status"]].format(**sc)
    return user, {"content": reply}


def wrong_output(rng: Random, task: str, out: dict) -> dict:
    """A plausible teacher mistake for `out`."""
    if task == "classify_intent":
        return {"content": rng.choice([i for i in INTENTS if i != out["content"]])}
    if task == "order_action":
        call = out["tool_calls"][0]
        oid = call["arguments"]["order_id"]
        if rng.random() < 0.5:  # wrong tool
            name = rng.choice([t["function"]["name"] for t in TOOLS if t["function"]["name"] != call["name"]])
            args = {"order_id": oid, "amount": 10.0} if name == "issue_refund" else {"order_id": oid}
        else:  # wrong argument: an order id digit off by one, or a wrong amount
            name, args = call["name"], dict(call["arguments"])
            args["order_id"] = oid[:-1] + str((int(oid[-1]) + 1) % 10)
            if "amount" in args and rng.random() < 0.5:
                args = {"order_id": oid, "amount": round(args["amount"] * 10, 2)}
        return {"tool_calls": [{"name": name, "arguments": args}]}
    if task == "extract_ticket":
        ticket = json.loads(out["content"])
        field = rng.choice(["urgency", "issue", "order_id"])
        if field == "urgency":
            ticket["urgency"] = rng.choice([u for u in URGENCY_CUES if u != ticket["urgency"]])
        elif field == "issue":
            ticket["issue"] = rng.choice([i for i in ISSUES if i != ticket["issue"]])
        else:
            ticket["order_id"] = None if ticket["order_id"] else "A00000"
        return {"content": compact(ticket)}
    return {"content": rng.choice(OFF_TOPIC)}


# ---------------------------------------------------------------- log shapes

def compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def hexid(rng: Random, bits: int = 96) -> str:
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


def make_session(rng: Random, pii: set[str]) -> list[dict]:
    """One session: classify first, then 1-3 of the other steps, a few seconds apart."""
    sc, day, sess = new_scene(rng), rng.randrange(len(DAYS)), "sess-" + hexid(rng, 64)
    message, out = classify_intent(rng, sc, pii)
    steps = [("classify_intent", message, out)]
    for step in sorted(rng.sample(["order_action", "extract_ticket", "draft_reply"], rng.randint(1, 3)),
                       key=["order_action", "extract_ticket", "draft_reply"].index):
        if step == "draft_reply":
            steps.append((step, *draft_reply(sc, message)))
        else:
            steps.append((step, *(order_action if step == "order_action" else extract_ticket)(rng, sc, pii)))
    t = rng.uniform(0, 86000)
    calls = []
    for step, user, out in steps:
        calls.append({"id": "call-" + hexid(rng), "day": day, "t": t, "session": sess, "step": step,
                      "user": user, "output": out})
        t += rng.uniform(1.5, 12)
    return calls


def entry(rng: Random, call: dict, logged: dict | None, failure: str | None) -> dict:
    """A call as an OpenAI-compatible proxy logs it (shape a)."""
    messages = [{"role": "system", "content": SYSTEM[call["step"]]}, {"role": "user", "content": call["user"]}]
    request = {"model": MODEL, "messages": messages}
    if call["step"] == "order_action":
        request["tools"] = TOOLS
    request["temperature"] = 0
    meta = {"agent": AGENT, "step": call["step"], "session_id": call["session"]}
    if failure == "status_error":
        meta.update(status="error", error=rng.choice(ERRORS))
    ts = (DAYS[call["day"]] + dt.timedelta(seconds=call["t"])).isoformat(timespec="milliseconds") + "Z"
    if failure == "rate_limit":
        wait = rng.uniform(0.2, 3)
        response = {"error": {"type": "rate_limit_error", "message": f"Rate limit reached for {MODEL} on tokens "
                              f"per min (TPM). Please try again in {wait:.1f}s."}}
        return {"id": call["id"], "timestamp": ts, "metadata": meta, "request": request, "response": response,
                "latency_ms": round(rng.uniform(20, 90), 1)}
    message = {"role": "assistant", "content": logged.get("content")}
    if "tool_calls" in logged:
        message["tool_calls"] = [{"id": "call_" + hexid(rng), "type": "function",
                                  "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
                                 for c in logged["tool_calls"]]
    prompt = sum(len(m["content"]) for m in messages) // 4 + 8 + (110 if "tools" in request else 0)
    completion = max(1, len(json.dumps(logged)) // 4 - 3)
    response = {"id": "chatcmpl-" + hexid(rng, 112), "object": "chat.completion", "model": MODEL,
                "choices": [{"index": 0, "message": message,
                             "finish_reason": "tool_calls" if "tool_calls" in logged else "stop"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}
    return {"id": call["id"], "timestamp": ts, "metadata": meta, "request": request, "response": response,
            "latency_ms": round(rng.uniform(250, 1800) + 4 * completion, 1)}


def line(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def perturb(rng: Random, text: str) -> str:
    """A trivial whitespace / case / punctuation change (a near duplicate)."""
    words = text.split(" ")
    choice = rng.randrange(4)
    plain = [i for i in range(1, len(words)) if not any(ch.isdigit() for ch in words[i - 1] + words[i])]
    if choice == 0 and plain:  # never inside a number (phone numbers and cards contain spaces)
        i = rng.choice(plain)
        words[i] = " " + words[i]
        return " ".join(words)
    if choice == 1 and text[-1] in ".!?":
        return text[:-1] if rng.random() < 0.5 else text[:-1] + "!!"
    if choice == 2 and text[0].isupper():
        return text[0].lower() + text[1:]
    return text + "  "


def malformed(rng: Random, call: dict) -> bytes:
    """One of 10 broken lines, built from an extra call that gets no truth line."""
    obj = entry(rng, call, call["output"], None)
    kind = call["bad"]
    if kind == "truncated":
        raw = line(obj)
        return raw[: len(raw) // 2] + b"\n"
    if kind == "non_json":
        return rng.choice([b"WARN proxy: upstream connection reset, retrying\n",
                           b"--- log rotated at 00:00:00 UTC ---\n"])
    if kind == "array":
        return line([obj])
    if kind == "missing_request":
        del obj["request"]
    if kind == "unknown_role":
        obj["request"]["messages"][1]["role"] = "customer"
    if kind == "bad_utf8":
        obj["request"]["messages"][1]["content"] += " MARK"
        return line(obj).replace(b" MARK", b" Merci, caf\xe9 cr\xe8me")  # latin-1 bytes
    return line(obj)


BAD_KINDS = ["truncated", "truncated", "non_json", "non_json", "array", "missing_request", "missing_request",
             "unknown_role", "unknown_role", "bad_utf8"]


# ---------------------------------------------------------------- assembling the files

def plant(rng: Random, n: int) -> dict[str, set[int]]:
    """Which call indexes get which dirt (exact counts, disjoint where it matters)."""
    failed = rng.sample(range(n), round(n * RATES["failed"]))
    half = len(failed) // 2
    failed_set = set(failed)
    ok = [i for i in range(n) if i not in failed_set]
    wrong = set(rng.sample(ok, round(len(ok) * RATES["teacher_wrong"])))
    near = rng.sample([i for i in ok if i not in wrong], round(n * RATES["near_dup"]))
    return {"rate_limit": set(failed[:half]), "status_error": set(failed[half:]), "teacher_wrong": wrong,
            "near_duplicate": set(near), "exact_duplicate": set(rng.sample(range(n), round(n * RATES["exact_dup"])))}


def truth_line(call: dict, tags: list[str], correct: bool, pii: set[str]) -> dict:
    tags = tags + (["pii"] if any(v in call["user"] for v in pii) else [])
    return {"id": call["id"], "task": call["step"], "output": call["output"], "teacher_correct": correct,
            "planted": tags}


def log_calls(rng: Random, calls: list[dict], dirt: dict, pii: set[str]) -> tuple[list[tuple], list[dict]]:
    """Log every call (with its planted dirt): rows (day, seconds, line bytes) and truth lines."""
    rows, truth = [], []
    for i, call in enumerate(calls):
        tags = [name for name, idx in dirt.items() if i in idx and name != "near_duplicate"]
        failure = next((t for t in tags if t in ("rate_limit", "status_error")), None)
        wrong = "teacher_wrong" in tags
        logged = wrong_output(rng, call["step"], call["output"]) if wrong else call["output"]
        raw = line(entry(rng, call, logged, failure))
        rows += [(call["day"], call["t"], raw)] * (2 if "exact_duplicate" in tags else 1)
        truth.append(truth_line(call, tags, failure != "rate_limit" and not wrong, pii))
        if i in dirt["near_duplicate"]:  # a retry a few seconds later with a trivially different request
            dup = dict(call, id="call-" + hexid(rng), t=call["t"] + rng.uniform(0.5, 4),
                       user=perturb(rng, call["user"]))
            rows.append((dup["day"], dup["t"], line(entry(rng, dup, dup["output"], None))))
            truth.append(truth_line(dup, ["near_duplicate"], True, pii))
    return rows, truth


def daily_files(rng: Random, rows: list[tuple], pii: set[str]) -> dict[str, bytes]:
    """One time-ordered file per day, with the malformed lines spread over them."""
    days = [[raw for _, _, raw in sorted((r for r in rows if r[0] == d), key=lambda r: r[1])] for d in range(len(DAYS))]
    for j, kind in enumerate(BAD_KINDS):
        extra = make_session(rng, pii)[0]
        extra.update(bad=kind, day=j % len(DAYS))
        lines = days[extra["day"]]
        lines.insert(rng.randint(min(1, len(lines)), len(lines)), malformed(rng, extra))
    return {f"logs/support-agent-{d:%Y-%m-%d}.jsonl": b"".join(lines) for d, lines in zip(DAYS, days)}


def finetune_export(rng: Random, pii: set[str]) -> bytes:
    """classify_intent records in the OpenAI fine-tuning chat shape."""
    records = []
    for _ in range(N_FINETUNE):
        user, out = classify_intent(rng, new_scene(rng), pii)
        records.append({"messages": [{"role": "system", "content": SYSTEM["classify_intent"]},
                                     {"role": "user", "content": user},
                                     {"role": "assistant", "content": out["content"]}]})
    return b"".join(line(r) for r in records)


def generate(seed: int, sessions: int) -> tuple[dict[str, bytes], dict]:
    rng, pii = Random(seed), set()
    calls = [c for _ in range(sessions) for c in make_session(rng, pii)]
    dirt = plant(rng, len(calls))
    rows, truth = log_calls(rng, calls, dirt, pii)
    files = daily_files(rng, rows, pii)
    files["logs/finetune-export.jsonl"] = finetune_export(rng, pii)
    files["truth.jsonl"] = b"".join(line(t) for t in truth)

    outputs = json.dumps([t["output"] for t in truth]) + json.dumps(OFF_TOPIC)
    leaked = [v for v in pii if v in outputs]
    assert not leaked, f"PII leaked into outputs: {leaked[:3]}"
    counts = {"sessions": sessions, "calls": len(calls), "truth_lines": len(truth),
              **{name: len(idx) for name, idx in dirt.items()},
              "pii": sum("pii" in t["planted"] for t in truth), "malformed": len(BAD_KINDS),
              "finetune_records": N_FINETUNE, "per_task": {s: sum(c["step"] == s for c in calls) for s in SYSTEM}}
    files["README.md"] = readme(seed, counts).encode()
    return files, counts


def readme(seed: int, c: dict) -> str:
    tasks = ", ".join(f"{k} {v}" for k, v in c["per_task"].items())
    return f"""# Sample logs: acme-support

Synthetic, seeded logs of a fictional deployed customer-support agent, with planted subtasks and dirt.
Regenerate (stdlib only, deterministic): `python datasets/samples/generate.py --seed {seed} --sessions {c['sessions']}`.
The docstring of `generate.py` explains what is planted and why.

- `logs/support-agent-2026-11-0D.jsonl`: calls as an OpenAI-compatible proxy logs them, one file per day
- `logs/finetune-export.jsonl`: {c['finetune_records']} `classify_intent` records in the OpenAI fine-tuning chat shape
- `truth.jsonl`: one line per logged, non-malformed call id: `task`, the CORRECT `output`
  (`{{"content": ...}}` or `{{"tool_calls": [{{"name", "arguments"}}]}}`), `teacher_correct`, `planted` tags

Planted with seed {seed}:
- {c['calls']} calls in {c['sessions']} sessions ({tasks})
- {c['near_duplicate']} near duplicates (new id, trivially changed request, same output): {c['truth_lines']} truth lines
- {c['teacher_wrong']} teacher mistakes (`teacher_correct: false`, the logged output is wrong)
- {c['rate_limit']} rate-limited calls (no choices) and {c['status_error']} with `metadata.status = "error"`
- {c['exact_duplicate']} exact duplicate lines (the same id twice)
- PII in the user message of {c['pii']} truth calls (inputs only, never in any output)
- {c['malformed']} malformed lines: 2 truncated, 2 non-JSON, 1 array, 2 missing "request", 2 unknown role,
  1 invalid UTF-8
"""


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sessions", type=int, default=750)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="default: this folder")
    args = ap.parse_args()
    files, counts = generate(args.seed, args.sessions)
    for rel, data in files.items():
        write_atomic(args.out / rel, data)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
