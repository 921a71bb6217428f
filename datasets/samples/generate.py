#!/usr/bin/env python3
"""Seeded generator for the sample logs of two fictional agents: "acme-support", a customer-support
agent with one fixed prompt per subtask, and "acme-desk", a tool-retrieval assistant and a multi-turn
customer-service assistant.

Usage:  python datasets/samples/generate.py [--seed 0] [--sessions 750] [--out datasets/samples]

Python stdlib only; the same seed always writes byte-identical files (random.Random(seed) for
acme-support, random.Random(f"{seed}-desk") for acme-desk, so adding to one leaves the other's files
as they were; no clock). Every file is written atomically (temp file in the same folder, then os.replace).

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

acme-desk has two steps, each a subtask whose correct output is a deterministic function of the input:

5. call_tool   360 calls, one session each, as tool-retrieval / MCP agents send them: a short fixed
               system prompt, 2-6 tools drawn per request from a catalog of 24 (weather, currency,
               units, calendar, flights, stocks, translation, reminders, ...; 1-3 typed parameters
               each), the right one among them; the user's templated question states the argument
               values and the answer is one call to the right tool copying exactly those values
               (numbers as JSON numbers; an optional parameter only when the question names it)
6. respond     140 conversations of 2-4 logged assistant turns [431 calls], each request the
               conversation so far (user turns, earlier tool calls with their `tool` results, earlier
               replies) under a ~430-word policy prompt and 5 fixed tools. The policy decides every turn:
               a question about an order -> get_order_status, then a reply stating the item and dates;
               a cancel, refund or return -> ask for the email on the order unless given, look the order
               up, refuse when the emails differ, then act (cancel_order / issue_refund / start_return)
               and confirm, or refuse by status or 30-day window (a refund over the order total is
               offered at the total, and made when the customer agrees); a request for a person
               -> transfer_to_human; shipping and return-window questions -> a reply from the policy.
               About 45% of the outputs are tool calls [189]; ~10% of the calls send the user's
               messages as OpenAI content parts [38]
Dirt at the same rates [31 teacher mistakes, 12 + 12 failed, 16 exact and 16 near duplicates, the
latter only where the last message is the user's]; PII only in inputs: the email a customer gives for
the identity check and the one get_order_status returns travel on in every later request, and never
appear in an output. No malformed lines. Defaults give 791 calls + 16 near duplicates = 807 truth lines.

Files (under --out): logs/support-agent-2026-11-0{3,4,5,6}.jsonl (proxy-logged calls, one file per
day), logs/finetune-export.jsonl (120 classify_intent records in the fine-tuning chat shape),
logs/desk-agent-2026-11-0{3,4,5,6}.jsonl (acme-desk's calls, same shape), truth.jsonl (per logged
call id, acme-support's lines first: task, the CORRECT output, teacher_correct - false where the
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
    """An acme-support call as an OpenAI-compatible proxy logs it (shape a)."""
    messages = [{"role": "system", "content": SYSTEM[call["step"]]}, {"role": "user", "content": call["user"]}]
    request = {"model": MODEL, "messages": messages}
    if call["step"] == "order_action":
        request["tools"] = TOOLS
    request["temperature"] = 0
    prompt = sum(len(m["content"]) for m in messages) // 4 + 8 + (110 if "tools" in request else 0)
    return proxy_entry(rng, call, AGENT, request, logged, failure, prompt)


def proxy_entry(rng: Random, call: dict, agent: str, request: dict, logged: dict | None, failure: str | None,
                prompt: int) -> dict:
    """The logged line around `request`: metadata, the response (or a rate-limit error), usage, latency.

    The ids of logged tool calls come from `call["call_ids"]` when the conversation already used
    them (later turns send them back), else from `rng`."""
    meta = {"agent": agent, "step": call["step"], "session_id": call["session"]}
    if failure == "status_error":
        meta.update(status="error", error=rng.choice(ERRORS))
    ts = (DAYS[call["day"]] + dt.timedelta(seconds=call["t"])).isoformat(timespec="milliseconds") + "Z"
    model = request["model"]
    if failure == "rate_limit":
        wait = rng.uniform(0.2, 3)
        response = {"error": {"type": "rate_limit_error", "message": f"Rate limit reached for {model} on tokens "
                              f"per min (TPM). Please try again in {wait:.1f}s."}}
        return {"id": call["id"], "timestamp": ts, "metadata": meta, "request": request, "response": response,
                "latency_ms": round(rng.uniform(20, 90), 1)}
    message = {"role": "assistant", "content": logged.get("content")}
    if "tool_calls" in logged:
        ids = call.get("call_ids") or ["call_" + hexid(rng) for _ in logged["tool_calls"]]
        message["tool_calls"] = [{"id": i, "type": "function",
                                  "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
                                 for i, c in zip(ids, logged["tool_calls"])]
    completion = max(1, len(json.dumps(logged)) // 4 - 3)
    response = {"id": "chatcmpl-" + hexid(rng, 112), "object": "chat.completion", "model": model,
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

def plant(rng: Random, n: int, retryable: set[int] | None = None) -> dict[str, set[int]]:
    """Which call indexes get which dirt (exact counts, disjoint where it matters); near duplicates
    only among `retryable` calls (None: all)."""
    failed = rng.sample(range(n), round(n * RATES["failed"]))
    half = len(failed) // 2
    failed_set = set(failed)
    ok = [i for i in range(n) if i not in failed_set]
    wrong = set(rng.sample(ok, round(len(ok) * RATES["teacher_wrong"])))
    near = rng.sample([i for i in ok if i not in wrong and (retryable is None or i in retryable)],
                      round(n * RATES["near_dup"]))
    return {"rate_limit": set(failed[:half]), "status_error": set(failed[half:]), "teacher_wrong": wrong,
            "near_duplicate": set(near), "exact_duplicate": set(rng.sample(range(n), round(n * RATES["exact_dup"])))}


def truth_line(call: dict, tags: list[str], correct: bool, pii: set[str]) -> dict:
    sent = call["user"] if "user" in call else json.dumps(call["messages"], ensure_ascii=False)
    tags = tags + (["pii"] if any(v in sent for v in pii) else [])
    return {"id": call["id"], "task": call["step"], "output": call["output"], "teacher_correct": correct,
            "planted": tags}


def wrong_support(rng: Random, call: dict) -> dict:
    return wrong_output(rng, call["step"], call["output"])


def retry_support(rng: Random, call: dict) -> dict:
    """A retry a few seconds later with a trivially different request: a near duplicate."""
    return dict(call, id="call-" + hexid(rng), t=call["t"] + rng.uniform(0.5, 4), user=perturb(rng, call["user"]))


def log_calls(rng: Random, calls: list[dict], dirt: dict, pii: set[str], log_entry=entry, wrong=wrong_support,
              retry=retry_support) -> tuple[list[tuple], list[dict]]:
    """Log every call (with its planted dirt): rows (day, seconds, line bytes) and truth lines.

    `log_entry`, `wrong` and `retry` are the agent's own: its log line, a teacher mistake, a retry."""
    rows, truth = [], []
    for i, call in enumerate(calls):
        tags = [name for name, idx in dirt.items() if i in idx and name != "near_duplicate"]
        failure = next((t for t in tags if t in ("rate_limit", "status_error")), None)
        logged = wrong(rng, call) if "teacher_wrong" in tags else call["output"]
        raw = line(log_entry(rng, call, logged, failure))
        rows += [(call["day"], call["t"], raw)] * (2 if "exact_duplicate" in tags else 1)
        truth.append(truth_line(call, tags, failure != "rate_limit" and "teacher_wrong" not in tags, pii))
        if i in dirt["near_duplicate"]:
            dup = retry(rng, call)
            rows.append((dup["day"], dup["t"], line(log_entry(rng, dup, dup["output"], None))))
            truth.append(truth_line(dup, ["near_duplicate"], True, pii))
    return rows, truth


def by_day(rows: list[tuple]) -> list[list[bytes]]:
    """The logged lines of each day, in time order."""
    return [[raw for _, _, raw in sorted((r for r in rows if r[0] == d), key=lambda r: r[1])] for d in range(len(DAYS))]


def daily_files(rng: Random, rows: list[tuple], pii: set[str]) -> dict[str, bytes]:
    """One time-ordered file per day, with the malformed lines spread over them."""
    days = by_day(rows)
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


# ---------------------------------------------------------------- acme-desk: a second agent

DESK_AGENT, DESK_MODEL = "acme-desk", "gpt-4.1-2025-04-14"
DESK_TOOL_CALLS, DESK_CONVERSATIONS = 360, 140
DESK_POLICY = """You are Ava, the customer-service assistant of Acme Home, an online shop for home and kitchen \
goods. You chat with customers about their orders and act on them with the tools you are given. Follow this \
policy exactly.

Identity. Anyone may ask where an order is. Before you cancel an order, refund it or open a return, the \
customer must tell you the email address on the order. If they have not given one in this conversation, ask \
for it and do nothing else. Then look the order up with get_order_status: if the email on the order differs \
from the one the customer gave, say that it does not match and make no change. Never read out the email, \
phone number or address on file.

Order status. When a customer asks about an order, call get_order_status and tell them what it returns: the \
item, and the expected delivery date of a shipped order or the delivery date of a delivered one.

Cancellations. Only orders that are still processing can be cancelled: call cancel_order with the reason the \
customer gave, or "customer request" when they gave none, and confirm the refund of the order total. A \
shipped or delivered order cannot be cancelled; explain that it can be returned within 30 days of delivery.

Refunds. Refunds are for delivered orders that arrived damaged or incomplete, within 30 days of delivery. \
Refund the amount the customer asks for with issue_refund when it is no more than the order total; when it \
is more, offer the order total and refund that once they agree. Outside the 30-day window, refuse politely \
and offer to connect them with a colleague.

Returns. Delivered orders can be returned within 30 days of delivery: open the return with start_return and \
give the customer the label number. After 30 days, refuse politely.

Escalation. If the customer asks for a person, a manager or a supervisor, call transfer_to_human with a \
one-line summary and tell them their place in the queue. Do not argue.

General questions. Answer from this policy: we ship to the United States, Canada and Mexico (3-5 business \
days), and returns are accepted within 30 days of delivery.

Tone. Be brief, friendly and factual: one to three sentences, no emojis, no discounts or vouchers, no \
promises you cannot keep. Name the order id when you refer to an order. Do not invent order details: when \
you need them, call get_order_status. Never ask for passwords or card numbers, and if a customer shares \
one, do not repeat it. Call at most one tool per turn."""
DESK_SYSTEM = {
    "call_tool": "You are Acme's operations assistant. Call the one tool that fulfils the user's request.",
    "respond": DESK_POLICY,
}


def _arg(kind: str, desc: str, enum: list[str] | None = None) -> dict:
    return {"type": kind, "description": desc, **({"enum": enum} if enum else {})}


W_CITIES = ["Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Toronto", "Sydney", "Cairo", "Berlin", "Mumbai",
            "Lisbon", "Santiago", "Seoul", "Denver"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "INR", "MXN", "SEK"]
UNIT_PAIRS = [("kilometers", "miles"), ("kilograms", "pounds"), ("liters", "gallons"), ("meters", "feet"),
              ("celsius", "fahrenheit")]
UNITS = sorted({u for pair in UNIT_PAIRS for u in pair})
AIRPORTS = ["JFK", "LHR", "CDG", "NRT", "SFO", "DXB", "FRA", "SIN", "LAX", "ORD", "GRU", "SYD"]
LANGUAGES = ["French", "German", "Spanish", "Japanese", "Italian", "Portuguese"]
TOPICS = ["business", "technology", "sports", "science", "health"]
CARRIERS = ["ups", "fedex", "dhl", "usps"]


def _date(rng: Random) -> str:
    return (DAYS[0] + dt.timedelta(days=rng.randint(4, 120))).date().isoformat()


def _amount(rng: Random) -> float | int:
    whole, cents = rng.randint(10, 5000), round(rng.uniform(5, 5000), 2)
    return whole if rng.random() < 0.5 else cents


def _code(rng: Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_uppercase + "23456789") for _ in range(n))


def _convert(rng: Random) -> dict:
    pair = list(rng.choice(UNIT_PAIRS))
    rng.shuffle(pair)
    return {"value": _amount(rng), "from_unit": pair[0], "to_unit": pair[1]}


def _pair(rng: Random, pool: list[str]) -> list[str]:
    return rng.sample(pool, 2)


# name -> (description, parameters, phrasings, values): a call passes exactly the parameters
# its phrasing names; those named in every phrasing are required.
CATALOG = {
    "get_weather": (
        "Current weather for a city.",
        {"city": _arg("string", "City name"), "unit": _arg("string", "Temperature unit", ["celsius", "fahrenheit"])},
        ["What's the weather in {city} right now?", "Give me the current weather for {city} in {unit}.",
         "How warm is it in {city}? Answer in {unit}."],
        lambda r: {"city": r.choice(W_CITIES), "unit": r.choice(["celsius", "fahrenheit"])}),
    "convert_currency": (
        "Convert an amount between two currencies at today's rate.",
        {"amount": _arg("number", "Amount to convert"),
         "from_currency": _arg("string", "ISO 4217 code of the source currency"),
         "to_currency": _arg("string", "ISO 4217 code of the target currency")},
        ["Convert {amount} {from_currency} to {to_currency}.", "How much is {amount} {from_currency} in {to_currency}?",
         "I need {amount} {from_currency} expressed in {to_currency}."],
        lambda r: dict(zip(["amount", "from_currency", "to_currency"], [_amount(r), *_pair(r, CURRENCIES)]))),
    "convert_units": (
        "Convert a measurement from one unit to another.",
        {"value": _arg("number", "Value to convert"), "from_unit": _arg("string", "Unit of the value", UNITS),
         "to_unit": _arg("string", "Unit to convert to", UNITS)},
        ["Convert {value} {from_unit} to {to_unit}.", "How many {to_unit} is {value} {from_unit}?"],
        _convert),
    "create_calendar_event": (
        "Add an event to the user's calendar.",
        {"title": _arg("string", "Event title"), "date": _arg("string", "Date, YYYY-MM-DD"),
         "duration_minutes": _arg("integer", "Length in minutes")},
        ['Add "{title}" to my calendar on {date}.', 'Schedule "{title}" on {date} for {duration_minutes} minutes.',
         'Put a {duration_minutes}-minute event called "{title}" in my calendar on {date}.'],
        lambda r: {"title": r.choice(["Quarterly review", "Dentist appointment", "Team lunch", "Budget planning",
                                      "Vendor call", "Offsite prep", "Interview debrief"]),
                   "date": _date(r), "duration_minutes": r.choice([15, 30, 45, 60, 90, 120])}),
    "search_flights": (
        "Search flights between two airports on a date.",
        {"origin": _arg("string", "IATA code of the departure airport"),
         "destination": _arg("string", "IATA code of the arrival airport"),
         "date": _arg("string", "Departure date, YYYY-MM-DD")},
        ["Find flights from {origin} to {destination} on {date}.", "Any flights {origin} to {destination} on {date}?",
         "Search {origin}-{destination} flights departing {date}."],
        lambda r: dict(zip(["origin", "destination", "date"], [*_pair(r, AIRPORTS), _date(r)]))),
    "get_stock_quote": (
        "Latest price of a stock.",
        {"symbol": _arg("string", "Ticker symbol")},
        ["What's {symbol} trading at?", "Get me the latest stock quote for {symbol}."],
        lambda r: {"symbol": r.choice(["AAPL", "MSFT", "NVDA", "AMZN", "TSLA", "GOOGL", "SAP", "ASML"])}),
    "translate_text": (
        "Translate a text into another language.",
        {"text": _arg("string", "Text to translate"), "target_language": _arg("string", "Language", LANGUAGES)},
        ['Translate "{text}" into {target_language}.', 'How do you say "{text}" in {target_language}?'],
        lambda r: {"text": r.choice(["Where is the train station?", "The meeting starts at noon.",
                                     "Thank you for your order.", "Please close the door.",
                                     "The invoice is attached."]),
                   "target_language": r.choice(LANGUAGES)}),
    "set_reminder": (
        "Remind the user of something at a date and time.",
        {"message": _arg("string", "What to remind of"), "date": _arg("string", "Date, YYYY-MM-DD"),
         "time": _arg("string", "Time, HH:MM (24h)")},
        ["Remind me to {message} on {date} at {time}.", "Set a reminder for {date} at {time}: {message}."],
        lambda r: {"message": r.choice(["call the landlord", "renew the parking permit", "send the invoice",
                                        "water the plants", "book the car service", "back up the laptop"]),
                   "date": _date(r), "time": f"{r.randint(7, 20):02d}:{r.choice([0, 15, 30, 45]):02d}"}),
    "get_local_time": (
        "Current local time in a time zone.",
        {"timezone": _arg("string", "IANA time zone name")},
        ["What time is it in {timezone}?", "Tell me the current local time for the {timezone} time zone."],
        lambda r: {"timezone": r.choice(["Europe/Paris", "Asia/Tokyo", "America/Chicago", "Australia/Sydney",
                                         "Africa/Nairobi", "America/Sao_Paulo"])}),
    "track_package": (
        "Where a parcel is.",
        {"tracking_number": _arg("string", "Tracking number"), "carrier": _arg("string", "Carrier", CARRIERS)},
        ["Where is package {tracking_number}?", "Track my {carrier} package {tracking_number}.",
         "Can you check the {carrier} shipment {tracking_number}?"],
        lambda r: {"tracking_number": _code(r, 10), "carrier": r.choice(CARRIERS)}),
    "book_restaurant": (
        "Reserve a table at a restaurant.",
        {"restaurant": _arg("string", "Restaurant name"), "date": _arg("string", "Date, YYYY-MM-DD"),
         "party_size": _arg("integer", "Number of guests")},
        ["Book a table for {party_size} at {restaurant} on {date}.",
         "Reserve {restaurant} on {date} for {party_size} people."],
        lambda r: {"restaurant": r.choice(["Blue Lotus", "Trattoria Roma", "The Copper Pot", "Sakura House",
                                           "El Mercado", "Green Fork"]),
                   "date": _date(r), "party_size": r.randint(2, 12)}),
    "search_recipes": (
        "Find recipes with an ingredient.",
        {"ingredient": _arg("string", "Main ingredient"), "max_minutes": _arg("integer", "Longest cooking time")},
        ["Find a recipe with {ingredient}.", "Suggest a {ingredient} recipe that takes under {max_minutes} minutes."],
        lambda r: {"ingredient": r.choice(["chickpeas", "salmon", "mushrooms", "lentils", "spinach", "tofu"]),
                   "max_minutes": r.choice([15, 20, 30, 45, 60])}),
    "get_news_headlines": (
        "Top news headlines on a topic.",
        {"topic": _arg("string", "Topic", TOPICS), "count": _arg("integer", "How many headlines")},
        ["Show me the top {count} {topic} headlines.", "What's new in {topic} today?"],
        lambda r: {"topic": r.choice(TOPICS), "count": r.randint(3, 10)}),
    "calculate_tip": (
        "Tip for a restaurant bill.",
        {"bill_amount": _arg("number", "Bill total"), "percent": _arg("integer", "Tip percentage")},
        ["What's a {percent}% tip on a {bill_amount} bill?", "Calculate a {percent} percent tip for {bill_amount}."],
        lambda r: {"bill_amount": round(r.uniform(12, 400), 2), "percent": r.choice([10, 12, 15, 18, 20, 22])}),
    "get_air_quality": (
        "Air quality index of a city.",
        {"city": _arg("string", "City name")},
        ["How is the air quality in {city} today?", "Check the AQI for {city}."],
        lambda r: {"city": r.choice(W_CITIES)}),
    "find_hotels": (
        "Search hotels in a city.",
        {"city": _arg("string", "City name"), "check_in": _arg("string", "Check-in date, YYYY-MM-DD"),
         "nights": _arg("integer", "Number of nights")},
        ["Find hotels in {city} from {check_in} for {nights} nights.",
         "I need a hotel in {city}, checking in {check_in}, {nights} nights."],
        lambda r: {"city": r.choice(W_CITIES), "check_in": _date(r), "nights": r.randint(1, 14)}),
    "get_movie_showtimes": (
        "Showtimes of a film in a city.",
        {"movie": _arg("string", "Film title"), "city": _arg("string", "City name")},
        ['When is "{movie}" playing in {city}?', 'Showtimes for "{movie}" in {city}, please.'],
        lambda r: {"movie": r.choice(["The Last Orbit", "Paper Tigers", "Midnight Harbor", "Glass Garden",
                                      "Northbound"]), "city": r.choice(W_CITIES)}),
    "send_team_message": (
        "Post a message in a team chat channel.",
        {"channel": _arg("string", "Channel name, e.g. #ops"), "text": _arg("string", "Message text")},
        ['Post "{text}" in {channel}.', 'Send "{text}" to the {channel} channel.'],
        lambda r: {"channel": r.choice(["#ops", "#sales", "#design", "#it-help", "#general"]),
                   "text": r.choice(["Deploy finished", "Standup moves to 10:30", "Printer on floor 3 is fixed",
                                     "Lunch is here", "Backups completed"])}),
    "create_support_ticket": (
        "Open an IT support ticket.",
        {"subject": _arg("string", "Short subject"), "priority": _arg("string", "Priority", ["low", "medium", "high"])},
        ['Open a {priority} priority ticket: "{subject}".',
         'File a ticket titled "{subject}" with {priority} priority.'],
        lambda r: {"subject": r.choice(["VPN keeps disconnecting", "Laptop battery swollen", "Need access to the CRM",
                                        "Monitor flickers", "Password reset for the wiki"]),
                   "priority": r.choice(["low", "medium", "high"])}),
    "check_flight_status": (
        "Status of a flight today.",
        {"flight_number": _arg("string", "Flight number, e.g. LH432")},
        ["Is flight {flight_number} on time?", "What's the status of flight {flight_number}?"],
        lambda r: {"flight_number": r.choice(["LH", "BA", "UA", "AF", "NH", "QF"]) + str(r.randint(10, 999))}),
    "get_public_holidays": (
        "Public holidays of a country in a year.",
        {"country_code": _arg("string", "ISO 3166-1 alpha-2 code"), "year": _arg("integer", "Year")},
        ["List the public holidays in {country_code} for {year}.",
         "Which public holidays does {country_code} have in {year}?"],
        lambda r: {"country_code": r.choice(["US", "DE", "FR", "JP", "BR", "IN", "KE"]),
                   "year": r.choice([2026, 2027])}),
    "start_timer": (
        "Start a countdown timer.",
        {"minutes": _arg("integer", "Length in minutes"), "label": _arg("string", "Label")},
        ["Start a {minutes}-minute timer.", 'Set a timer for {minutes} minutes labelled "{label}".'],
        lambda r: {"minutes": r.choice([3, 5, 10, 15, 25, 40]),
                   "label": r.choice(["tea", "pasta", "focus", "laundry"])}),
    "define_word": (
        "Dictionary definition of a word.",
        {"word": _arg("string", "The word")},
        ['What does "{word}" mean?', 'Define the word "{word}".'],
        lambda r: {"word": r.choice(["ephemeral", "ubiquitous", "laconic", "serendipity", "pragmatic", "candor"])}),
    "calculate_loan_payment": (
        "Monthly payment of a fixed-rate loan.",
        {"principal": _arg("number", "Amount borrowed"), "annual_rate": _arg("number", "Annual interest rate, percent"),
         "years": _arg("integer", "Term in years")},
        ["What's the monthly payment on a {principal} loan at {annual_rate}% over {years} years?",
         "Monthly payment for borrowing {principal} at {annual_rate} percent for {years} years?"],
        lambda r: {"principal": r.choice([5000, 12000, 25000, 150000, 320000]),
                   "annual_rate": round(r.uniform(2, 9), 1), "years": r.choice([3, 5, 10, 15, 30])}),
}


def catalog_tool(name: str) -> dict:
    desc, params, phrasings, _ = CATALOG[name]
    required = [p for p in params if all("{" + p + "}" in ph for ph in phrasings)]
    return _tool(name, desc, params, required)


def call_tool(rng: Random, pii: set[str]) -> tuple[list[dict], list[dict], dict]:
    """One request to the operations assistant: (messages, tools offered, correct output).

    2-6 tools from the catalog, the right one among them; the question names every argument
    value, and the answer copies exactly those (numbers as JSON numbers)."""
    name = rng.choice(list(CATALOG))
    _, params, phrasings, values = CATALOG[name]
    phrasing, args = rng.choice(phrasings), values(rng)
    offered = [name, *rng.sample([n for n in CATALOG if n != name], rng.randint(1, 5))]
    rng.shuffle(offered)
    user = dress(rng, phrasing.format(**args), pii)
    output = {"tool_calls": [{"name": name, "arguments": {p: args[p] for p in params if "{" + p + "}" in phrasing}}]}
    return [{"role": "user", "content": user}], [catalog_tool(n) for n in offered], output


# -- respond: the policy-bound customer-service dialogue

RESPOND_TOOLS = [
    _tool("get_order_status", "Look up an order: status, item, total, email on file and dates.",
          {"order_id": {"type": "string", "description": "Order id, e.g. D12345"}}, ["order_id"]),
    _tool("cancel_order", "Cancel an order that is still processing and refund its total.",
          {"order_id": {"type": "string", "description": "Order id"},
           "reason": {"type": "string", "description": "The customer's reason, or \"customer request\""}},
          ["order_id", "reason"]),
    _tool("issue_refund", "Refund an amount in USD for a delivered order.",
          {"order_id": {"type": "string", "description": "Order id"},
           "amount": {"type": "number", "description": "Amount in USD, at most the order total"}},
          ["order_id", "amount"]),
    _tool("start_return", "Open a return for a delivered order and create its label.",
          {"order_id": {"type": "string", "description": "Order id"}}, ["order_id"]),
    _tool("transfer_to_human", "Hand the conversation to a human colleague.",
          {"summary": {"type": "string", "description": "One line on what the customer needs"}}, ["summary"]),
]
DESK_ITEMS = ["espresso machine", "office chair", "noise-cancelling headphones", "stand mixer", "air fryer",
              "cast-iron skillet", "duvet set", "floor lamp", "rice cooker", "vacuum sealer", "knife block",
              "bath towel set"]
ASK_STATUS = ["Where is my order {oid}?", "Can you tell me the status of order {oid}?", "Has order {oid} shipped yet?",
              "Any news on my {item}? The order is {oid}."]
ASK_TWO = ["Where are my orders {oid} and {oid2}?", "Can you check orders {oid} and {oid2} for me?",
           "What's the status of {oid} and {oid2}?"]
ASK_ALSO = ["And order {oid2}?", "What about {oid2}?", "Could you also check {oid2}?"]
ASK_CANCEL = ["Please cancel order {oid}{why}.", "I want to cancel my order {oid}{why}.", "Can you cancel {oid}{why}?"]
ASK_REFUND = ["My {item} from order {oid} arrived damaged. Please refund ${amount}.",
              "Order {oid} was missing parts, I'd like a refund of ${amount}.",
              "Please refund ${amount} on order {oid}, the {item} is broken."]
ASK_RETURN = ["I'd like to return the {item} from order {oid}.", "How do I send back order {oid}?",
              "Please start a return for order {oid}."]
ASK_HUMAN = ["I want to talk to a real person about order {oid}.", "Let me speak to a manager about {oid}, please.",
             "Get me a human, this is about order {oid}."]
GIVE_EMAIL = ["My email is {email}.", "The order is under {email}.", "You can verify me with {email}."]
ANSWER_EMAIL = ["It's {email}.", "Sure: {email}", "{email}"]
AGREE = ["Yes, please refund ${total}.", "OK, go ahead with ${total}.", "Fine, refund ${total} then."]
THANKS = ["Thanks!", "Great, thank you.", "Perfect, thanks for your help.", "OK, thanks."]
ASK_SHIPPING = ["Do you ship to {country}?", "Can you deliver to {country}?", "Is shipping to {country} possible?"]
ASK_WINDOW = ["Can I still return a {item} I received {n} days ago?",
              "I got a {item} {n} days ago. Is it too late to return it?"]
SHIP_TO = ["United States", "Canada", "Mexico"]
NO_SHIP = ["Brazil", "Germany", "Japan", "Australia", "India", "France"]
SAY = {
    "status": {"processing": "Order {oid} ({item}) is being prepared and will ship within 2 business days.",
               "shipped": "Order {oid} ({item}) has shipped and should arrive on {eta}.",
               "delivered": "Order {oid} ({item}) was delivered on {delivered_on}.",
               "cancelled": "Order {oid} ({item}) was cancelled, so you have not been charged."},
    "no_cancel": {"shipped": "Order {oid} has already shipped, so it can no longer be cancelled. Once it arrives "
                             "you can return it within 30 days of delivery for a full refund.",
                  "delivered": "Order {oid} was delivered on {delivered_on}, so it can no longer be cancelled, "
                               "but you can return it within 30 days of delivery.",
                  "cancelled": "Order {oid} is already cancelled, so there is nothing more to do."},
    "ask_email": "I can help with order {oid}. To make changes I first need to verify your identity: what is the "
                 "email address on the order?",
    "mismatch": "I'm sorry, the email you gave doesn't match the one on order {oid}, so I can't make changes to "
                "it. Please write to us from the email address you used for the order.",
    "cancelled": "Order {oid} is cancelled. The ${total} you paid will be refunded to your original payment "
                 "method within 5 business days.",
    "refunded": "I've refunded ${amount} for order {oid} (reference {refund_id}). It will reach your account "
                "within 5-7 business days.",
    "over_total": "I can refund at most ${total}, the total of order {oid}. Shall I refund ${total}?",
    "late": "Order {oid} was delivered {days} days ago, outside our 30-day window, so I can't {what}. I can "
            "connect you with a colleague if you'd like.",
    "return_open": "Your return for order {oid} is open. Print label {label} and drop the parcel at any carrier "
                   "point within 14 days.",
    "transferred": "I've passed your question about order {oid} to a colleague. You are number {queue} in the queue.",
    "closing": "You're welcome! If order {oid} needs anything else, just ask. Enjoy your {item}!",
    "ships": "Yes, we ship to {country}; standard delivery takes 3-5 business days.",
    "no_ship": "Sorry, we don't ship to {country} yet. We currently ship to the United States, Canada and Mexico.",
    "window_ok": "Yes: a {item} can be returned within 30 days of delivery, so {n} days is fine. Tell me the order "
                 "id and I'll open the return.",
    "window_late": "I'm sorry, returns are accepted within 30 days of delivery, and {n} days is past that window.",
}
DESK_OFF_TOPIC = ["Our autumn sale starts Friday: 20% off all kitchen goods!",
                  "Have you tried unplugging the appliance and plugging it back in?",
                  "I have cancelled your order and refunded the full amount."]
FLOWS = {"status": 28, "cancel": 24, "refund": 16, "return": 14, "human": 8, "faq": 10}


def desk_order(rng: Random, day: int, status: str, days_since: int, pii: set[str]) -> dict:
    """An order as get_order_status returns it (dates relative to the day of the conversation)."""
    today = DAYS[day].date()
    order = {"order_id": f"D{rng.randint(10000, 99999)}", "status": status, "item": rng.choice(DESK_ITEMS),
             "total": round(rng.uniform(15, 400), 2),
             "email": f"{rng.choice(NAMES)}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}"}
    pii.add(order["email"])  # sent back in every later request, never in an output
    if status == "shipped":
        order["eta"] = (today + dt.timedelta(days=rng.randint(1, 6))).isoformat()
    if status == "delivered":
        order.update(delivered_on=(today - dt.timedelta(days=days_since)).isoformat(), days_since_delivery=days_since)
    return order


def _call(name: str, result: dict, **arguments) -> tuple:
    return ("assistant", {"tool_calls": [{"name": name, "arguments": arguments}]}, result)


def _reply(text: str) -> tuple:
    return ("assistant", {"content": text}, None)


def _facts(order: dict) -> dict:
    """What replies quote about an order (amounts with two decimals)."""
    return {"oid": order["order_id"], **order, "total": f"{order['total']:.2f}"}


def change_opening(rng: Random, order: dict, ask: str, pii: set[str], email_first: bool) -> tuple[list, bool]:
    """The turns up to the status lookup of a change request (the email given with it, or asked
    for), and whether the email matches the order's."""
    stranger = rng.random() >= 0.88
    email = f"{rng.choice(NAMES)}{rng.randint(100, 199)}@{rng.choice(DOMAINS)}" if stranger else order["email"]
    pii.add(email)
    facts = _facts(order)
    lookup = _call("get_order_status", order, order_id=order["order_id"])
    if email_first:
        turns = [("user", dress(rng, ask, pii, rng.choice(GIVE_EMAIL).format(email=email))), lookup]
    else:
        turns = [("user", dress(rng, ask, pii)), _reply(SAY["ask_email"].format(**facts)),
                 ("user", rng.choice(ANSWER_EMAIL).format(email=email)), lookup]
    return turns, email == order["email"]


def desk_flow(rng: Random, day: int, pii: set[str]) -> list[tuple]:
    """One conversation as turns: ("user", text) or ("assistant", correct output, tool result or None)."""
    kind = rng.choices(list(FLOWS), weights=list(FLOWS.values()))[0]
    if kind == "faq":
        turns = []
        for _ in range(rng.randint(2, 3)):
            if rng.random() < 0.5:
                country = rng.choice(SHIP_TO + NO_SHIP)
                ask, say = rng.choice(ASK_SHIPPING), SAY["ships" if country in SHIP_TO else "no_ship"]
                facts = {"country": country}
            else:
                facts = {"item": rng.choice(DESK_ITEMS), "n": rng.randint(2, 60)}
                ask, say = rng.choice(ASK_WINDOW), SAY["window_ok" if facts["n"] <= 30 else "window_late"]
            turns += [("user", dress(rng, ask.format(**facts), pii)), _reply(say.format(**facts))]
        return turns
    late = kind in ("refund", "return") and rng.random() < 0.2
    if kind == "status":
        status = rng.choice(["processing", "shipped", "delivered", "cancelled"])
    elif kind == "cancel":
        status = rng.choice(["processing"] * 3 + ["shipped", "delivered", "cancelled"])
    else:
        status = "delivered"
    order = desk_order(rng, day, status, rng.randint(31, 75) if late else rng.randint(1, 30), pii)
    facts = _facts(order)
    oid = order["order_id"]
    if kind == "status":
        turns = status_flow(rng, day, order, pii)
    elif kind == "human":
        summary = f"Customer asks for a human agent about order {oid}."
        queue = {"transferred": True, "queue_position": rng.randint(1, 9)}
        turns = [("user", dress(rng, rng.choice(ASK_HUMAN).format(**facts), pii)),
                 _call("transfer_to_human", queue, summary=summary),
                 _reply(SAY["transferred"].format(queue=queue["queue_position"], **facts))]
    else:
        turns = change_flow(rng, kind, order, late, pii)
    if len([t for t in turns if t[0] == "assistant"]) < 4 and rng.random() < 0.5:
        turns += [("user", rng.choice(THANKS)), _reply(SAY["closing"].format(**facts))]
    return turns


def status_flow(rng: Random, day: int, order: dict, pii: set[str]) -> list[tuple]:
    """One order looked up and reported; or two, asked together (one lookup per turn, then one
    answer) or one after the other."""
    shape = rng.choices(["one", "both", "one_then_other"], weights=[33, 40, 27])[0]
    facts = _facts(order)
    lookup = _call("get_order_status", order, order_id=order["order_id"])
    answer = SAY["status"][order["status"]].format(**facts)
    if shape == "one":
        return [("user", dress(rng, rng.choice(ASK_STATUS).format(**facts), pii)), lookup, _reply(answer)]
    other = desk_order(rng, day, rng.choice(["processing", "shipped", "delivered"]), rng.randint(1, 30), pii)
    lookup_other = _call("get_order_status", other, order_id=other["order_id"])
    answer_other = SAY["status"][other["status"]].format(**_facts(other))
    if shape == "both":
        ask = rng.choice(ASK_TWO).format(oid2=other["order_id"], **facts)
        return [("user", dress(rng, ask, pii)), lookup, lookup_other, _reply(f"{answer} {answer_other}")]
    return [("user", dress(rng, rng.choice(ASK_STATUS).format(**facts), pii)), lookup, _reply(answer),
            ("user", rng.choice(ASK_ALSO).format(oid2=other["order_id"])), lookup_other, _reply(answer_other)]


def change_flow(rng: Random, kind: str, order: dict, late: bool, pii: set[str]) -> list[tuple]:
    """Cancel, refund or return: identity first, then the policy's answer to the order's state."""
    facts, oid = _facts(order), order["order_id"]
    over = kind == "refund" and not late and rng.random() < 0.3
    if kind == "cancel":
        reason = rng.choice(REASONS) if rng.random() < 0.6 else None
        ask = rng.choice(ASK_CANCEL).format(why=f" ({reason})" if reason else "", **facts)
    elif kind == "refund":
        share = rng.uniform(1.05, 1.5) if over else rng.choice([1, 1, 0.5, 0.25])
        amount = round(order["total"] * share, 2)
        ask = rng.choice(ASK_REFUND).format(**dict(facts, amount=f"{amount:.2f}"))
    else:
        ask = rng.choice(ASK_RETURN).format(**facts)
    turns, same = change_opening(rng, order, ask, pii, over or rng.random() < 0.7)
    if not same:
        return turns + [_reply(SAY["mismatch"].format(**facts))]
    if kind == "cancel" and order["status"] != "processing":
        return turns + [_reply(SAY["no_cancel"][order["status"]].format(**facts))]
    if kind == "cancel":
        done = {"order_id": oid, "status": "cancelled", "refund_amount": order["total"]}
        return turns + [_call("cancel_order", done, order_id=oid, reason=reason or "customer request"),
                        _reply(SAY["cancelled"].format(**facts))]
    if late:
        what = "refund it" if kind == "refund" else "accept its return"
        return turns + [_reply(SAY["late"].format(days=order["days_since_delivery"], what=what, **facts))]
    if kind == "return":
        label = {"order_id": oid, "return_label": "RL-" + _code(rng, 6)}
        return turns + [_call("start_return", label, order_id=oid),
                        _reply(SAY["return_open"].format(label=label["return_label"], **facts))]
    if over:
        turns += [_reply(SAY["over_total"].format(**facts)), ("user", rng.choice(AGREE).format(**facts))]
        amount = order["total"]
    refund = {"order_id": oid, "refund_id": "RF-" + _code(rng, 6), "amount": amount}
    done = SAY["refunded"].format(**dict(facts, amount=f"{amount:.2f}", refund_id=refund["refund_id"]))
    return turns + [_call("issue_refund", refund, order_id=oid, amount=amount), _reply(done)]


def desk_conversation(rng: Random, pii: set[str]) -> list[dict]:
    """The logged calls of one conversation: each request is the conversation so far."""
    day, session = rng.randrange(len(DAYS)), "desk-" + hexid(rng, 64)
    turns = desk_flow(rng, day, pii)
    parts = rng.random() < 0.08  # this client sends OpenAI content parts
    t, messages, calls = rng.uniform(0, 82000), [], []
    for role, *rest in turns:
        if role == "user":
            text = rest[0]
            messages.append({"role": "user", "content": [{"type": "text", "text": text}] if parts else text})
            t += rng.uniform(8, 60)
            continue
        output, result = rest
        call = {"id": "call-" + hexid(rng), "day": day, "t": t, "session": session, "step": "respond",
                "messages": list(messages), "tools": RESPOND_TOOLS, "output": output}
        if result is None:
            messages.append({"role": "assistant", "content": output["content"]})
        else:
            (tool_call,) = output["tool_calls"]
            call["call_ids"] = ["call_" + hexid(rng, 64)]
            function = {"name": tool_call["name"], "arguments": json.dumps(tool_call["arguments"])}
            messages += [{"role": "assistant", "content": None,
                          "tool_calls": [{"id": call["call_ids"][0], "type": "function", "function": function}]},
                         {"role": "tool", "tool_call_id": call["call_ids"][0], "name": tool_call["name"],
                          "content": json.dumps(result)}]
            t += rng.uniform(0.5, 2.5)
        calls.append(call)
    return calls


def desk_entry(rng: Random, call: dict, logged: dict | None, failure: str | None) -> dict:
    """An acme-desk call as the proxy logs it: the system prompt, the conversation so far, its tools."""
    messages = [{"role": "system", "content": DESK_SYSTEM[call["step"]]}, *call["messages"]]
    request = {"model": DESK_MODEL, "messages": messages, "tools": call["tools"], "temperature": 0}
    prompt = (len(json.dumps(messages)) + len(json.dumps(call["tools"]))) // 4
    return proxy_entry(rng, call, DESK_AGENT, request, logged, failure, prompt)


def desk_wrong(rng: Random, call: dict) -> dict:
    """A plausible teacher mistake: another of the tools offered, one argument value changed (an order id
    digit, a number, another catalog value), or an off-topic reply."""
    if "tool_calls" not in call["output"]:
        return {"content": rng.choice(DESK_OFF_TOPIC)}
    (right,) = call["output"]["tool_calls"]
    args = dict(right["arguments"])
    keys = sorted(k for k in args if call["step"] == "call_tool" or k in ("order_id", "amount"))
    if not keys or rng.random() < 0.5:
        others = [t["function"]["name"] for t in call["tools"] if t["function"]["name"] != right["name"]]
        return {"tool_calls": [{"name": rng.choice(others), "arguments": args}]}
    key = rng.choice(keys)
    value = args[key]
    if isinstance(value, int):
        args[key] = value + 1
    elif isinstance(value, float):
        args[key] = round(value * 10, 2)
    elif key == "order_id":
        args[key] = value[:-1] + str((int(value[-1]) + 1) % 10)
    else:
        while args[key] == value:
            args[key] = CATALOG[right["name"]][3](rng)[key]
    return {"tool_calls": [{"name": right["name"], "arguments": args}]}


def desk_retry(rng: Random, call: dict) -> dict:
    """A retry a few seconds later whose last user message changed trivially: a near duplicate."""
    *history, last = call["messages"]
    content = last["content"]
    if isinstance(content, list):
        content = [{"type": "text", "text": perturb(rng, content[0]["text"])}]
    else:
        content = perturb(rng, content)
    return dict(call, id="call-" + hexid(rng), t=call["t"] + rng.uniform(0.5, 4),
                messages=[*history, {"role": "user", "content": content}])


def desk_calls(rng: Random, pii: set[str]) -> list[dict]:
    """Every acme-desk call: the call_tool requests (one session each), then the respond conversations."""
    calls = []
    for _ in range(DESK_TOOL_CALLS):
        messages, tools, output = call_tool(rng, pii)
        calls.append({"id": "call-" + hexid(rng), "day": rng.randrange(len(DAYS)), "t": rng.uniform(0, 86000),
                      "session": "desk-" + hexid(rng, 64), "step": "call_tool", "messages": messages, "tools": tools,
                      "output": output})
    return calls + [c for _ in range(DESK_CONVERSATIONS) for c in desk_conversation(rng, pii)]


def generate_desk(seed: int) -> tuple[dict[str, bytes], list[dict], dict]:
    """The acme-desk files, truth lines and counts, from their own random stream (the acme-support
    files do not change with it)."""
    rng, pii = Random(f"{seed}-desk"), set()
    calls = desk_calls(rng, pii)
    dirt = plant(rng, len(calls), {i for i, c in enumerate(calls) if c["messages"][-1]["role"] == "user"})
    rows, truth = log_calls(rng, calls, dirt, pii, desk_entry, desk_wrong, desk_retry)
    files = {f"logs/desk-agent-{d:%Y-%m-%d}.jsonl": b"".join(lines) for d, lines in zip(DAYS, by_day(rows))}
    leaked = [v for v in pii if v in json.dumps([t["output"] for t in truth] + DESK_OFF_TOPIC)]
    assert not leaked, f"PII leaked into outputs: {leaked[:3]}"
    counts = {"calls": len(calls), "truth_lines": len(truth), **{name: len(idx) for name, idx in dirt.items()},
              "pii": sum("pii" in t["planted"] for t in truth)}
    for step, system in DESK_SYSTEM.items():
        mine = [c for c in calls if c["step"] == step]
        sizes = sorted(len(system) + len(json.dumps(c["messages"], ensure_ascii=False)) for c in mine)
        counts[step] = {"calls": len(mine), "sessions": len({c["session"] for c in mine}),
                        "tool_calls": sum("tool_calls" in c["output"] for c in mine),
                        "content_parts": sum(any(isinstance(m.get("content"), list) for m in c["messages"])
                                             for c in mine),
                        "prompt_chars_median": sizes[len(sizes) // 2],
                        "prompt_chars_p95": sizes[len(sizes) * 95 // 100]}
    return files, truth, counts


def generate(seed: int, sessions: int) -> tuple[dict[str, bytes], dict]:
    rng, pii = Random(seed), set()
    calls = [c for _ in range(sessions) for c in make_session(rng, pii)]
    dirt = plant(rng, len(calls))
    rows, truth = log_calls(rng, calls, dirt, pii)
    files = daily_files(rng, rows, pii)
    files["logs/finetune-export.jsonl"] = finetune_export(rng, pii)

    outputs = json.dumps([t["output"] for t in truth]) + json.dumps(OFF_TOPIC)
    leaked = [v for v in pii if v in outputs]
    assert not leaked, f"PII leaked into outputs: {leaked[:3]}"
    counts = {"sessions": sessions, "calls": len(calls), "truth_lines": len(truth),
              **{name: len(idx) for name, idx in dirt.items()},
              "pii": sum("pii" in t["planted"] for t in truth), "malformed": len(BAD_KINDS),
              "finetune_records": N_FINETUNE, "per_task": {s: sum(c["step"] == s for c in calls) for s in SYSTEM}}
    desk_files, desk_truth, counts["desk"] = generate_desk(seed)
    files.update(desk_files)
    files["truth.jsonl"] = b"".join(line(t) for t in truth + desk_truth)
    files["README.md"] = readme(seed, counts).encode()
    return files, counts


def readme(seed: int, c: dict) -> str:
    tasks = ", ".join(f"{k} {v}" for k, v in c["per_task"].items())
    d, tool, chat = c["desk"], c["desk"]["call_tool"], c["desk"]["respond"]
    return f"""# Sample logs: acme-support and acme-desk

Synthetic, seeded logs of two fictional deployed agents, with planted subtasks and dirt.
Regenerate (stdlib only, deterministic): `python datasets/samples/generate.py --seed {seed} --sessions {c['sessions']}`.
The docstring of `generate.py` explains what is planted and why.

- `logs/support-agent-2026-11-0D.jsonl`: acme-support's calls as an OpenAI-compatible proxy logs them, one file per day
- `logs/finetune-export.jsonl`: {c['finetune_records']} `classify_intent` records in the OpenAI fine-tuning chat shape
- `logs/desk-agent-2026-11-0D.jsonl`: acme-desk's calls, same proxy shape, one file per day
- `truth.jsonl`: one line per logged, non-malformed call id (acme-support's first, then acme-desk's): `task`,
  the CORRECT `output` (`{{"content": ...}}` or `{{"tool_calls": [{{"name", "arguments"}}]}}`), `teacher_correct`,
  `planted` tags

acme-support, planted with seed {seed}:
- {c['calls']} calls in {c['sessions']} sessions ({tasks})
- {c['near_duplicate']} near duplicates (new id, trivially changed request, same output): {c['truth_lines']} truth lines
- {c['teacher_wrong']} teacher mistakes (`teacher_correct: false`, the logged output is wrong)
- {c['rate_limit']} rate-limited calls (no choices) and {c['status_error']} with `metadata.status = "error"`
- {c['exact_duplicate']} exact duplicate lines (the same id twice)
- PII in the user message of {c['pii']} truth calls (inputs only, never in any output)
- {c['malformed']} malformed lines: 2 truncated, 2 non-JSON, 1 array, 2 missing "request", 2 unknown role,
  1 invalid UTF-8

acme-desk, planted with seed {seed} (its own random stream):
- `call_tool`: {tool['calls']} calls, one session each; 2-6 tools offered per request out of a catalog of
  {len(CATALOG)}; the answer is one call copying the argument values the question states. Prompt (system +
  messages) median {tool['prompt_chars_median']} characters, p95 {tool['prompt_chars_p95']}, plus the tools
- `respond`: {chat['calls']} calls in {chat['sessions']} conversations under a {len(DESK_POLICY.split())}-word policy
  prompt and 5 tools: {chat['tool_calls']} tool calls and {chat['calls'] - chat['tool_calls']} replies; each request is
  the conversation so far; {chat['content_parts']} calls send OpenAI content parts. Prompt median
  {chat['prompt_chars_median']} characters, p95 {chat['prompt_chars_p95']}, plus the tools
- {d['near_duplicate']} near duplicates (the last user message trivially changed): {d['truth_lines']} truth lines
- {d['teacher_wrong']} teacher mistakes, {d['rate_limit']} rate-limited calls, {d['status_error']} with \
`metadata.status = "error"`, {d['exact_duplicate']} exact duplicate lines
- PII (emails given for identity checks and returned by `get_order_status`, phones, cards, keys) in the request
  of {d['pii']} truth calls, never in any output; no malformed lines
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
