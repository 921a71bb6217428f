#!/usr/bin/env python3
"""Seeded generator for the sample logs of two fictional agents: "acme-support", a customer-support
agent with one fixed prompt per subtask, and "acme-desk", a tool-retrieval assistant and a multi-turn
customer-service assistant.

Usage:  python datasets/samples/generate.py [--seed 0] [--sessions 750] [--out datasets/samples]
        python datasets/samples/generate.py --fixture {per-call-tools,long-policy} --out DIR [--seed 0]

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

Fixtures (--fixture NAME --out DIR): two more agents, shaped like public logs the factory is judged on,
written only on demand (never into this folder) as DIR/logs/<agent>.jsonl, one proxy-logged file with
metadata.agent and no metadata.step, and DIR/truth.jsonl (the lines above: id, task, correct output,
teacher_correct, planted). Each has its own random stream (f"{seed}-fn", f"{seed}-care"), so neither
changes the files above. The only dirt is teacher mistakes (3%); no failed, duplicate or malformed lines.

per-call-tools  "acme-fn", 600 calls, one request each and no session: a fixed system prompt, 2-6 tools
                drawn per request from a catalog of 36 with typed parameters (strings, integers, numbers,
                booleans, enums, optional ones with defaults, ids, dates as YYYY-MM-DD, MM/DD/YYYY,
                DD.MM.YYYY, "March 14, 2027", ISO date-times, and one nested object). A question in one of
                2-4 phrasings per tool (plus openers and closers) states every required value and some
                optional ones; the answer is one call copying exactly the values stated (a boolean as the
                phrase that says it, numbers as JSON numbers). 12% of the requests offer no fitting tool (a
                catalog tool left out, or a need no tool has) and the answer is the text "I can't do that
                with the tools I have: none of them can <capability>." Mistakes: a call where none fits, a
                refusal where one does, another offered tool, a value changed or dropped, a number as a
                string. Task `call_function`; tags `no_fitting_tool`, `teacher_wrong`.
long-policy     "acme-care", 250 conversations of 4-20 logged assistant turns, a session each, under a
                retail customer-care policy of ~2,100 words (identity checks, confirmation before changes,
                cancellations, pending-order changes, returns and exchanges within 30 days, refund methods,
                no compensation, transfers to humans, tone) and 14 tools with JSON schemas. Each line is the
                conversation so far, tool results as `tool` messages (users, orders and products as JSON);
                the answer is the next tool call or a reply. A conversation is 1-3 requests (status, cancel,
                return, exchange, item or address change, product question, compensation, a human, another
                person's order, off-topic) after identification by email or name and zip (with a failed
                email lookup sometimes); a fifth of the requests name any of the customer's orders, not
                one in the state they need, and deliveries are 2-45 days old, so some get the policy's
                refusal. Replies come from 1-3 templates per situation filled from
                the tool results. PII (names, emails, addresses) is in the inputs; an output holds it only
                when copied from its own input (email and name lookups, new addresses, a first name),
                checked by an assert. Mistakes: a policy-breaking reply, or one id, digit or reason
                miscopied in a call. Task `respond`; tags `teacher_wrong`, `pii`.
Trade-off: both are templated, so they show the shapes (tools per request, prompt lengths, mixed calls
and replies) but not the variety of a real model's wording.

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
    meta = {"agent": agent}
    if call["step"]:  # a plain proxy logs no step
        meta["step"] = call["step"]
    if call.get("session"):
        meta["session_id"] = call["session"]
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

## Fixtures shaped like held-out logs (made on demand, not stored here)

`python datasets/samples/generate.py --fixture NAME --out DIR [--seed N]` writes `DIR/logs/<agent>.jsonl` (one
proxy-logged file, `metadata.agent` set, no `metadata.step`) and `DIR/truth.jsonl` (same shape as above, 3%
teacher mistakes, no other dirt). Deterministic per seed; the files above do not change with it.

- `per-call-tools`: "acme-fn", {FN_CALLS} single requests, each offering 2-6 tools out of a catalog of
  {len(FN_CATALOG)} (strings, integers, numbers, booleans, enums, defaults, ids, dates in several formats, one nested
  object); the answer copies the values the question states, or, for the {FN_RATES['no_tool']:.0%} of requests
  that offer no fitting tool, is the text "I can't do that with the tools I have: none of them can ...".
- `long-policy`: "acme-care", {CARE_DIALOGUES} customer-care conversations of 4-20 assistant turns under a
  {len(CARE_POLICY.split())}-word retail policy and {len(CARE_TOOLS)} tools (identity lookups, orders, products,
  cancel/modify/return/exchange, addresses, calculate, transfer to a human); each line is the conversation so far
  with tool results, the answer the next call or reply; PII in the inputs, in an output only when copied from
  them.

The docstring of `generate.py` says what each plants.
"""


# ---------------------------------------------------------------- fixture: per-call tools (acme-fn)

FN_AGENT, FN_MODEL, FN_CALLS = "acme-fn", "gpt-4o-mini-2024-07-18", 600
FN_RATES = {"no_tool": 0.12, "teacher_wrong": 0.03}
FN_SYSTEM = ("You are a function-calling assistant. When one of the functions you are given fits the user's request, "
             "call it with the argument values the user states. When none fits, say so in one sentence.")
FN_REFUSAL = "I can't do that with the tools I have: none of them can {capability}."
FN_OPENERS = [""] * 6 + ["Hey,", "Hi!", "Quick one:", "Please help:", "Hello.", "For my records:"]
FN_CLOSERS = [""] * 6 + ["Thanks.", "Thank you!", "Cheers.", "ASAP please.", "Appreciate it."]
FN_OUT_OF_SCOPE = [("Order me a large pepperoni pizza from the place around the corner.", "order food"),
                   ("Call my sister and tell her I'm running late.", "make phone calls"),
                   ("Turn off the lights in the garage.", "switch lights"),
                   ("Buy two tickets for Saturday's concert at the arena.", "buy event tickets"),
                   ("Cancel my gym membership.", "cancel memberships"),
                   ("Pay this month's electricity bill.", "pay bills"),
                   ("Unlock the front door for the cleaner.", "unlock doors"),
                   ("Post my vacation photo to Instagram.", "post on social media"),
                   ("Who won the basketball game last night?", "look up sports results"),
                   ("Renew my passport.", "renew passports")]


def _p(kind: str, desc: str, enum: list | None = None, **extra) -> dict:
    """A JSON-schema property; `extra` holds e.g. a default."""
    return {"type": kind, "description": desc, **({"enum": enum} if enum else {}), **extra}


def _fn_tool(desc: str, capability: str, params: dict, required: list[str], phrasings: list[str], values,
             words: dict | None = None) -> dict:
    """A catalog entry: `values(rng)` gives every parameter a value, a phrasing names the ones a call
    passes (every required one), `words` says how a boolean's value is written in a question."""
    return {"desc": desc, "capability": capability, "params": params, "required": required,
            "phrasings": phrasings, "values": values, "words": words or {}}


def _when(r: Random, lo: int = 3, hi: int = 200) -> dt.date:
    return DAYS[0].date() + dt.timedelta(days=r.randint(lo, hi))


def _hhmm(r: Random, lo: int = 6, hi: int = 21) -> str:
    return f"{r.randint(lo, hi):02d}:{r.choice([0, 15, 30, 45]):02d}"


def _money(r: Random, lo: int, hi: int) -> float | int:
    """An amount with cents, or a whole one as an int (so that the question and the JSON agree)."""
    if r.random() < 0.3:
        return r.randint(lo, hi)
    cents = r.randint(lo * 100, hi * 100)
    return cents / 100 if cents % 100 else cents // 100


def _long_date(d: dt.date) -> str:
    return f"{d:%B} {d.day}, {d.year}"


FN_CITIES = ["Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Toronto", "Sydney", "Cairo", "Berlin", "Mumbai", "Lisbon",
             "Seoul", "Denver", "Austin", "Madrid", "Dublin"]
FN_PEOPLE = ["Dana Kim", "Luis Ortega", "Amara Okafor", "Chen Jing", "Noah Fischer", "Sofia Rossi", "Ravi Menon",
             "Hannah Berg", "Omar Haddad", "Grace Liu"]
FN_PLACES = ["Central Station", "City Museum", "Riverside Park", "Tech Park Gate 2", "Harbor Bridge",
             "Old Town Square"]
FN_STREETS = ["12 Elm Street", "48 Harbour Road", "7 Rue Lepic", "221 Pine Avenue", "5 Calle Mayor",
              "90 King's Parade", "31 Birch Lane", "16 Lindenstrasse"]

FN_CATALOG = {
    "get_weather_forecast": _fn_tool(
        "Weather forecast for a city for the next few days.", "check the weather forecast",
        {"city": _p("string", "City name"), "days": _p("integer", "Number of days, 1-7"),
         "units": _p("string", "Unit system", ["metric", "imperial"], default="metric")},
        ["city", "days"],
        ["What's the weather going to be like in {city} over the next {days} days?",
         "Give me a {days}-day forecast for {city} in {units} units.",
         "I'm heading to {city}. Forecast for the next {days} days, please.",
         "{days}-day weather outlook for {city}, {units} units."],
        lambda r: {"city": r.choice(FN_CITIES), "days": r.randint(1, 7), "units": r.choice(["metric", "imperial"])}),
    "convert_currency": _fn_tool(
        "Convert an amount between two currencies at today's rate.", "convert currencies",
        {"amount": _p("number", "Amount to convert"), "from_currency": _p("string", "ISO 4217 code, e.g. EUR"),
         "to_currency": _p("string", "ISO 4217 code, e.g. USD")},
        ["amount", "from_currency", "to_currency"],
        ["How much is {amount} {from_currency} in {to_currency}?",
         "Convert {amount} {from_currency} into {to_currency}.",
         "I have {amount} {from_currency}; what's that in {to_currency}?"],
        lambda r: dict(zip(["amount", "from_currency", "to_currency"],
                           [_money(r, 5, 9000), *r.sample(CURRENCIES, 2)]))),
    "create_calendar_event": _fn_tool(
        "Add an event to the user's calendar.", "manage a calendar",
        {"title": _p("string", "Event title"), "start": _p("string", "Start, ISO 8601 date-time YYYY-MM-DDTHH:MM"),
         "duration_minutes": _p("integer", "Length in minutes", default=30),
         "location": _p("string", "Where it takes place")},
        ["title", "start"],
        ['Put "{title}" on my calendar at {start}.',
         'Create an event "{title}" starting {start}, {duration_minutes} minutes long.',
         'Schedule "{title}" for {start} in {location}, lasting {duration_minutes} minutes.',
         'Add a calendar entry called "{title}" at {start} at {location}.'],
        lambda r: {"title": r.choice(["Quarterly review", "Dentist", "Team lunch", "Budget planning", "Vendor call",
                                      "1:1 with Priya", "Offsite prep"]),
                   "start": f"{_when(r).isoformat()}T{_hhmm(r, 8, 18)}",
                    "duration_minutes": r.choice([15, 30, 45, 60, 90]),
                   "location": r.choice(["Room 4B", "the cafeteria", "Zoom", "HQ lobby"])}),
    "send_email": _fn_tool(
        "Send an email from the user's account.", "send email",
        {"to": _p("string", "Recipient email address"), "subject": _p("string", "Subject line"),
         "body": _p("string", "Message text"), "cc_me": _p("boolean", "Copy the sender", default=False)},
        ["to", "subject", "body"],
        ['Email {to} with the subject "{subject}" and the text "{body}".',
         'Send an email to {to} {cc_me}: subject "{subject}", body "{body}".',
         'Write to {to}. Subject: "{subject}". Message: "{body}"'],
        lambda r: {"to": f"{r.choice(NAMES)}{r.randint(1, 99)}@{r.choice(DOMAINS)}",
                   "subject": r.choice(["Invoice reminder", "Meeting notes", "Contract draft", "Lunch on Friday?"]),
                   "body": r.choice(["Please see the attached file.", "Can we move it to next week?",
                                     "Thanks for your help today.", "The numbers look good."]),
                   "cc_me": r.random() < 0.5},
        {"cc_me": {True: "and cc me", False: "without copying me"}}),
    "search_flights": _fn_tool(
        "Search flights between two airports.", "search for flights",
        {"origin": _p("string", "IATA airport code"), "destination": _p("string", "IATA airport code"),
         "departure_date": _p("string", "Departure date, MM/DD/YYYY"),
         "passengers": _p("integer", "Number of passengers", default=1),
         "cabin": _p("string", "Cabin class", ["economy", "premium", "business", "first"], default="economy")},
        ["origin", "destination", "departure_date"],
        ["Find flights from {origin} to {destination} on {departure_date}.",
         "Any {cabin} seats from {origin} to {destination} on {departure_date} for {passengers} people?",
         "Search flights {origin} -> {destination}, departing {departure_date}, {passengers} passengers.",
         "I need to fly {origin} to {destination} on {departure_date} in {cabin}."],
        lambda r: dict(zip(["origin", "destination"], r.sample(AIRPORTS, 2)), departure_date=f"{_when(r):%m/%d/%Y}",
                       passengers=r.randint(1, 6), cabin=r.choice(["economy", "premium", "business", "first"]))),
    "book_hotel": _fn_tool(
        "Book a room at a hotel.", "book hotels",
        {"hotel_id": _p("string", "Hotel id, e.g. HTL-20417"), "check_in": _p("string", "Check-in date, DD.MM.YYYY"),
         "nights": _p("integer", "Number of nights"), "breakfast": _p("boolean", "Include breakfast", default=False)},
        ["hotel_id", "check_in", "nights"],
        ["Book hotel {hotel_id} from {check_in} for {nights} nights.",
         "Reserve {nights} nights at {hotel_id}, check-in {check_in}, {breakfast}.",
         "Please book {hotel_id} {breakfast}: arriving {check_in}, staying {nights} nights."],
        lambda r: {"hotel_id": f"HTL-{r.randint(10000, 99999)}", "check_in": f"{_when(r):%d.%m.%Y}",
                   "nights": r.randint(1, 14), "breakfast": r.random() < 0.5},
        {"breakfast": {True: "with breakfast", False: "without breakfast"}}),
    "get_stock_price": _fn_tool(
        "Latest price of a listed stock.", "look up stock prices",
        {"ticker": _p("string", "Ticker symbol"),
         "exchange": _p("string", "Exchange", ["NASDAQ", "NYSE", "XETRA", "LSE"])},
        ["ticker"],
        ["What's {ticker} trading at?", "Latest price of {ticker} on the {exchange}?",
         "Quote for {ticker} ({exchange}), please."],
        lambda r: {"ticker": r.choice(["AAPL", "MSFT", "NVDA", "AMZN", "SAP", "ASML", "SHEL", "KO"]),
                   "exchange": r.choice(["NASDAQ", "NYSE", "XETRA", "LSE"])}),
    "calculate_mortgage": _fn_tool(
        "Monthly payment of a fixed-rate mortgage.", "calculate loan payments",
        {"principal": _p("number", "Amount borrowed"), "annual_rate": _p("number", "Annual interest rate, percent"),
         "years": _p("integer", "Term in years"),
         "extra_monthly_payment": _p("number", "Extra paid each month", default=0)},
        ["principal", "annual_rate", "years"],
        ["Monthly payment on a {principal} mortgage at {annual_rate}% over {years} years?",
         "Run the mortgage numbers: {principal} borrowed, {annual_rate} percent, {years} years, plus "
         "{extra_monthly_payment} extra each month.",
         "If I borrow {principal} for {years} years at {annual_rate}%, what do I pay per month?"],
        lambda r: {"principal": r.choice([90000, 150000, 240000, 315000, 480000]), "annual_rate": r.choice(
            [2.9, 3.25, 3.8, 4.1, 4.75, 5.5, 6.2]), "years": r.choice([10, 15, 20, 25, 30]),
                   "extra_monthly_payment": r.choice([50, 100, 150.5, 200, 250])}),
    "translate_text": _fn_tool(
        "Translate a text.", "translate text",
        {"text": _p("string", "Text to translate"),
         "target_language": _p("string", "ISO 639-1 code", ["fr", "de", "es", "ja", "it", "pt"]),
         "formal": _p("boolean", "Use the formal register", default=False)},
        ["text", "target_language"],
        ['Translate "{text}" into language code {target_language}.',
         'Translate "{text}" ({target_language}), {formal}.', 'I need "{text}" in {target_language}, {formal}.'],
        lambda r: {"text": r.choice(["Where is the train station?", "The meeting starts at noon.",
                                     "Thank you for your order.", "Please close the door."]),
                   "target_language": r.choice(["fr", "de", "es", "ja", "it", "pt"]), "formal": r.random() < 0.5},
        {"formal": {True: "formal register", False: "informal register"}}),
    "set_thermostat": _fn_tool(
        "Set a room's thermostat.", "control the thermostat",
        {"room": _p("string", "Room", ["living_room", "bedroom", "kitchen", "office", "basement"]),
         "temperature": _p("number", "Target temperature in degrees Celsius"),
         "mode": _p("string", "Mode", ["heat", "cool", "auto"], default="auto")},
        ["room", "temperature"],
        ["Set the {room} to {temperature} degrees.", "Put the {room} thermostat on {mode} at {temperature} C.",
         "Make it {temperature} degrees in the {room}, mode {mode}."],
        lambda r: {"room": r.choice(["living_room", "bedroom", "kitchen", "office", "basement"]),
                   "temperature": r.choice([18, 19, 19.5, 20, 21, 21.5, 22, 23]),
                    "mode": r.choice(["heat", "cool", "auto"])}),
    "create_ticket": _fn_tool(
        "Open an IT support ticket.", "open support tickets",
        {"title": _p("string", "Short title"),
         "priority": _p("string", "Priority", ["low", "normal", "high", "urgent"]),
         "assignee_id": _p("integer", "Id of the assignee")},
        ["title", "priority"],
        ['Open a {priority} ticket: "{title}".',
         'File a ticket titled "{title}" with {priority} priority and assign it to user {assignee_id}.',
         'New {priority}-priority issue "{title}", assignee {assignee_id}.'],
        lambda r: {"title": r.choice(["VPN keeps disconnecting", "Laptop battery swollen", "Need CRM access",
                                      "Monitor flickers", "Printer jams on floor 2"]),
                   "priority": r.choice(["low", "normal", "high", "urgent"]), "assignee_id": r.randint(1000, 9999)}),
    "get_invoice": _fn_tool(
        "Fetch an invoice by id.", "look up invoices",
        {"invoice_id": _p("string", "Invoice id, e.g. INV-2026-00042")}, ["invoice_id"],
        ["Pull up invoice {invoice_id}.", "Can I see invoice {invoice_id}?",
         "Fetch the details of invoice {invoice_id}."],
        lambda r: {"invoice_id": f"INV-{r.choice([2025, 2026])}-{r.randint(1, 99999):05d}"}),
    "refund_payment": _fn_tool(
        "Refund all or part of a card payment.", "issue refunds",
        {"payment_id": _p("string", "Payment id, e.g. pay_3Kf9x2LmQ8"), "amount": _p("number", "Amount to refund"),
         "notify_customer": _p("boolean", "Email the customer", default=True)},
        ["payment_id", "amount"],
        ["Refund {amount} on payment {payment_id}.", "Issue a {amount} refund for {payment_id} {notify_customer}.",
         "Payment {payment_id} needs a refund of {amount}, {notify_customer}."],
        lambda r: {"payment_id": "pay_" + "".join(r.choice(string.ascii_letters + string.digits) for _ in range(10)),
                   "amount": _money(r, 3, 900), "notify_customer": r.random() < 0.5},
        {"notify_customer": {True: "and let the customer know", False: "without notifying the customer"}}),
    "lookup_customer": _fn_tool(
        "A customer's record by numeric id.", "look up customer records",
        {"customer_id": _p("integer", "Customer number")}, ["customer_id"],
        ["Look up customer {customer_id}.", "Who is customer #{customer_id}?",
         "Show me the account of customer number {customer_id}."],
        lambda r: {"customer_id": r.randint(100000, 999999)}),
    "create_shipment": _fn_tool(
        "Create a shipment for an order.", "create shipments",
        {"order_ref": _p("string", "Order reference, e.g. ORD-88213"),
         "recipient": {"type": "object", "description": "Who receives it",
                       "properties": {"name": _p("string", "Full name"), "street": _p("string", "Street and number"),
                                      "city": _p("string", "City"), "postal_code": _p("string", "Postal code"),
                                      "country": _p("string", "ISO 3166-1 alpha-2 code")},
                       "required": ["name", "street", "city", "postal_code", "country"]},
         "express": _p("boolean", "Express delivery", default=False)},
        ["order_ref", "recipient"],
        ["Ship order {order_ref} to {recipient[name]}, {recipient[street]}, {recipient[postal_code]} "
         "{recipient[city]}, {recipient[country]}.",
         "Create a shipment for {order_ref} {express}: recipient {recipient[name]}, {recipient[street]}, "
         "{recipient[city]} {recipient[postal_code]}, country {recipient[country]}."],
        lambda r: {"order_ref": f"ORD-{r.randint(10000, 99999)}", "express": r.random() < 0.5,
                   "recipient": {"name": r.choice(FN_PEOPLE), "street": r.choice(FN_STREETS),
                                 "city": r.choice(FN_CITIES), "postal_code": f"{r.randint(1000, 99999)}",
                                 "country": r.choice(["US", "DE", "FR", "ES", "GB", "JP"])}},
        {"express": {True: "by express", False: "by standard shipping"}}),
    "track_parcel": _fn_tool(
        "Where a parcel is.", "track parcels",
        {"tracking_number": _p("string", "Tracking number"), "carrier": _p("string", "Carrier", CARRIERS)},
        ["tracking_number", "carrier"],
        ["Where's my {carrier} parcel {tracking_number}?", "Track {tracking_number} with {carrier}.",
         "Status of {carrier} shipment {tracking_number}?"],
        lambda r: {"tracking_number": _code(r, 12), "carrier": r.choice(CARRIERS)}),
    "list_public_holidays": _fn_tool(
        "Public holidays of a country in a year.", "list public holidays",
        {"country_code": _p("string", "ISO 3166-1 alpha-2 code"), "year": _p("integer", "Year")},
        ["country_code", "year"],
        ["List the public holidays in {country_code} for {year}.",
         "Which holidays does {country_code} have in {year}?"],
        lambda r: {"country_code": r.choice(["US", "DE", "FR", "JP", "BR", "IN", "KE"]),
                   "year": r.choice([2026, 2027])}),
    "book_meeting_room": _fn_tool(
        "Reserve a meeting room.", "book meeting rooms",
        {"room_id": _p("string", "Room id, e.g. R-4B"), "date": _p("string", "Date, YYYY-MM-DD"),
         "start_time": _p("string", "Start, HH:MM 24h"), "end_time": _p("string", "End, HH:MM 24h")},
        ["room_id", "date", "start_time", "end_time"],
        ["Book room {room_id} on {date} from {start_time} to {end_time}.",
         "Reserve meeting room {room_id} for {date}, {start_time}-{end_time}."],
        lambda r: {"room_id": f"R-{r.randint(1, 9)}{r.choice('ABCD')}", "date": _when(r).isoformat(),
                   "start_time": _hhmm(r, 8, 12), "end_time": _hhmm(r, 13, 18)}),
    "get_sales_report": _fn_tool(
        "Monthly sales report of a region.", "produce sales reports",
        {"month": _p("string", "Month, YYYY-MM"), "region": _p("string", "Region", ["EMEA", "APAC", "AMER"]),
         "include_returns": _p("boolean", "Count returned orders", default=False)},
        ["month", "region"],
        ["Sales report for {region}, {month}.", "Give me the {month} {region} sales numbers {include_returns}.",
         "Pull the {region} sales report for {month}, {include_returns}."],
        lambda r: {"month": f"{r.choice([2025, 2026])}-{r.randint(1, 12):02d}",
                   "region": r.choice(["EMEA", "APAC", "AMER"]),
                   "include_returns": r.random() < 0.5},
        {"include_returns": {True: "including returns", False: "excluding returns"}}),
    "compute_bmi": _fn_tool(
        "Body mass index from weight and height.", "compute body mass index",
        {"weight_kg": _p("number", "Weight in kilograms"), "height_cm": _p("number", "Height in centimetres")},
        ["weight_kg", "height_cm"],
        ["What's the BMI for {weight_kg} kg and {height_cm} cm?",
         "I weigh {weight_kg} kg and I'm {height_cm} cm tall. BMI?"],
        lambda r: {"weight_kg": r.choice([52, 61.5, 70, 77.2, 84, 95.5]),
                   "height_cm": r.choice([158, 165, 171.5, 180, 188])}),
    "find_restaurants": _fn_tool(
        "Search restaurants in a city.", "find restaurants",
        {"city": _p("string", "City name"),
         "cuisine": _p("string", "Cuisine", ["italian", "japanese", "mexican", "indian", "thai", "vegan"]),
         "max_price_level": _p("integer", "Most expensive price level, 1-4"),
         "open_now": _p("boolean", "Only places open now", default=False)},
        ["city", "cuisine"],
        ["Find {cuisine} restaurants in {city}.", "Any {cuisine} places in {city} {open_now}?",
         "Look for {cuisine} food in {city} at price level {max_price_level} or below."],
        lambda r: {"city": r.choice(FN_CITIES), "cuisine": r.choice(["italian", "japanese", "mexican", "indian", "thai",
                                                                     "vegan"]),
                   "max_price_level": r.randint(1, 4), "open_now": r.random() < 0.5},
        {"open_now": {True: "that are open right now", False: "open or not"}}),
    "get_movie_details": _fn_tool(
        "Plot, cast and rating of a film.", "look up movies",
        {"title": _p("string", "Film title"), "year": _p("integer", "Release year")}, ["title"],
        ['Tell me about the movie "{title}".', 'Details on "{title}" ({year}), please.',
         'What is the {year} film "{title}" about?'],
        lambda r: {"title": r.choice(["The Last Orbit", "Paper Tigers", "Midnight Harbor", "Glass Garden",
                                      "Northbound"]),
                   "year": r.randint(1995, 2026)}),
    "play_music": _fn_tool(
        "Play music on the user's speakers.", "play music",
        {"query": _p("string", "Artist, album, song or genre"), "shuffle": _p("boolean", "Shuffle", default=False),
         "volume": _p("integer", "Volume, 0-100")},
        ["query"],
        ["Play {query}.", "Put on {query} {shuffle}.", "Play {query} at volume {volume}."],
        lambda r: {"query": r.choice(["Miles Davis", "lo-fi beats", "Kind of Blue", "90s rock", "Nina Simone"]),
                   "shuffle": r.random() < 0.5, "volume": r.choice([20, 35, 50, 65, 80])},
        {"shuffle": {True: "on shuffle", False: "in order"}}),
    "set_alarm": _fn_tool(
        "Set an alarm.", "set alarms",
        {"time": _p("string", "Time, HH:MM 24h"), "label": _p("string", "Label"),
         "repeat_weekdays": _p("boolean", "Repeat Monday to Friday", default=False)},
        ["time"],
        ["Wake me up at {time}.", 'Set an alarm for {time} called "{label}".', "Alarm at {time}, {repeat_weekdays}."],
        lambda r: {"time": _hhmm(r, 5, 9), "label": r.choice(["gym", "flight", "meds", "school run"]),
                   "repeat_weekdays": r.random() < 0.5},
        {"repeat_weekdays": {True: "every weekday", False: "just once"}}),
    "add_todo": _fn_tool(
        "Add an item to the to-do list.", "manage a to-do list",
        {"task": _p("string", "What to do"), "due_date": _p("string", "Due date, MM/DD/YYYY"),
         "priority": _p("integer", "1 (highest) to 5", default=3)},
        ["task"],
        ['Add "{task}" to my to-do list.', 'New to-do: "{task}", due {due_date}.',
         'Put "{task}" on my list with priority {priority}, due {due_date}.'],
        lambda r: {"task": r.choice(["renew car insurance", "call the plumber", "file expenses", "book vet visit"]),
                   "due_date": f"{_when(r, 1, 60):%m/%d/%Y}", "priority": r.randint(1, 5)}),
    "get_local_time": _fn_tool(
        "Current local time in a time zone.", "tell the time in other time zones",
        {"timezone": _p("string", "IANA time zone name")}, ["timezone"],
        ["What time is it in {timezone}?", "Current local time for {timezone}?"],
        lambda r: {"timezone": r.choice(["Europe/Paris", "Asia/Tokyo", "America/Chicago", "Australia/Sydney"])}),
    "search_jobs": _fn_tool(
        "Search job listings.", "search job listings",
        {"keywords": _p("string", "Role or skills"), "location": _p("string", "City"),
         "remote": _p("boolean", "Remote only", default=False), "min_salary": _p("integer", "Minimum yearly salary")},
        ["keywords", "location"],
        ["Search {keywords} jobs in {location}.", "Find {keywords} roles in {location}, {remote}.",
         "{keywords} jobs around {location} paying at least {min_salary} a year?"],
        lambda r: {"keywords": r.choice(["data engineer", "nurse", "UX designer", "accountant"]),
                   "location": r.choice(FN_CITIES), "remote": r.random() < 0.5,
                   "min_salary": r.choice([45000, 60000, 80000, 120000])},
        {"remote": {True: "remote only", False: "on-site is fine"}}),
    "rent_car": _fn_tool(
        "Rent a car at an airport.", "rent cars",
        {"pickup_location": _p("string", "IATA airport code"), "pickup_date": _p("string", "YYYY-MM-DD"),
         "return_date": _p("string", "YYYY-MM-DD"),
         "car_class": _p("string", "Class", ["economy", "compact", "midsize", "suv", "van"], default="compact")},
        ["pickup_location", "pickup_date", "return_date"],
        ["Rent a car at {pickup_location} from {pickup_date} to {return_date}.",
         "I need a {car_class} at {pickup_location}, picking up {pickup_date}, returning {return_date}."],
        lambda r: (lambda d: {"pickup_location": r.choice(AIRPORTS), "pickup_date": d.isoformat(),
                              "return_date": (d + dt.timedelta(days=r.randint(1, 10))).isoformat(),
                              "car_class": r.choice(["economy", "compact", "midsize", "suv", "van"])})(_when(r))),
    "check_domain": _fn_tool(
        "Whether a domain name is available.", "check domain names",
        {"domain": _p("string", "Full domain name")}, ["domain"],
        ["Is {domain} available?", "Check whether the domain {domain} is free."],
        lambda r: {"domain": r.choice(["bluefern", "tidepool", "quietoak", "novaloop"])
                   + r.choice([".com", ".io", ".dev"])}),
    "get_nutrition": _fn_tool(
        "Nutrition facts of a food.", "look up nutrition facts",
        {"food": _p("string", "Food"), "grams": _p("integer", "Portion in grams")}, ["food", "grams"],
        ["Nutrition facts for {grams} g of {food}?", "How many calories are in {grams} grams of {food}?"],
        lambda r: {"food": r.choice(["oatmeal", "almonds", "brown rice", "salmon", "banana"]),
                   "grams": r.choice([30, 50, 100, 150, 250])}),
    "create_user_account": _fn_tool(
        "Create an account in the admin console.", "create user accounts",
        {"username": _p("string", "Login name"), "email": _p("string", "Email address"),
         "role": _p("string", "Role", ["viewer", "editor", "admin"], default="viewer"),
         "send_welcome": _p("boolean", "Send the welcome email", default=True)},
        ["username", "email"],
        ["Create an account {username} for {email}.", "Add user {username} ({email}) as {role}.",
         "Set up {username} with email {email}, role {role}, {send_welcome}."],
        lambda r: (lambda n: {"username": n.replace(".", "_"), "email": f"{n}@{r.choice(DOMAINS)}",
                              "role": r.choice(["viewer", "editor", "admin"]), "send_welcome": r.random() < 0.5})(
            r.choice(NAMES)),
        {"send_welcome": {True: "and send the welcome email", False: "no welcome email"}}),
    "transfer_funds": _fn_tool(
        "Move money between the user's accounts.", "transfer money",
        {"from_account": _p("string", "Account id, e.g. ACC-10492871"), "to_account": _p("string", "Account id"),
         "amount": _p("number", "Amount"), "memo": _p("string", "Memo")},
        ["from_account", "to_account", "amount"],
        ["Move {amount} from {from_account} to {to_account}.",
         'Transfer {amount} from {from_account} to {to_account} with memo "{memo}".'],
        lambda r: {"from_account": f"ACC-{r.randint(10000000, 99999999)}",
                   "to_account": f"ACC-{r.randint(10000000, 99999999)}", "amount": _money(r, 20, 5000),
                   "memo": r.choice(["rent", "savings", "holiday fund", "tax reserve"])}),
    "log_expense": _fn_tool(
        "Log a business expense.", "log expenses",
        {"amount": _p("number", "Amount"),
         "category": _p("string", "Category", ["travel", "meals", "office", "software", "training"]),
         "date": _p("string", "Date written like March 14, 2027"), "note": _p("string", "Note")},
        ["amount", "category", "date"],
        ["Log a {category} expense of {amount} on {date}.",
         'Record {amount} under {category} for {date}, note "{note}".'],
        lambda r: {"amount": _money(r, 4, 800),
                   "category": r.choice(["travel", "meals", "office", "software", "training"]),
                   "date": _long_date(_when(r, -60, -1)),
                    "note": r.choice(["client dinner", "taxi", "license", "course"])}),
    "search_knowledge_base": _fn_tool(
        "Search the help-center articles.", "search the knowledge base",
        {"query": _p("string", "Search terms"), "max_results": _p("integer", "How many articles", default=5),
         "language": _p("string", "Article language", ["en", "de", "fr", "es"], default="en")},
        ["query"],
        ['Search the help center for "{query}".', 'Find up to {max_results} articles about "{query}".',
         'Look up "{query}" in the knowledge base, {language} articles only.'],
        lambda r: {"query": r.choice(["reset password", "export invoices", "two-factor login", "change plan"]),
                   "max_results": r.choice([3, 5, 10]), "language": r.choice(["en", "de", "fr", "es"])}),
    "reserve_table": _fn_tool(
        "Reserve a table at a partner restaurant.", "reserve tables",
        {"restaurant_id": _p("integer", "Restaurant number"), "party_size": _p("integer", "Guests"),
         "reservation_time": _p("string", "Date and time, YYYY-MM-DD HH:MM")},
        ["restaurant_id", "party_size", "reservation_time"],
        ["Reserve a table for {party_size} at restaurant {restaurant_id} on {reservation_time}.",
         "Table for {party_size}, restaurant #{restaurant_id}, {reservation_time}."],
        lambda r: {"restaurant_id": r.randint(100, 9999), "party_size": r.randint(1, 10),
                   "reservation_time": f"{_when(r).isoformat()} {_hhmm(r, 17, 21)}"}),
    "get_directions": _fn_tool(
        "Route between two places.", "give directions",
        {"origin": _p("string", "Start"), "destination": _p("string", "End"),
         "mode": _p("string", "Travel mode", ["driving", "walking", "cycling", "transit"], default="driving"),
         "avoid_tolls": _p("boolean", "Avoid toll roads", default=False)},
        ["origin", "destination"],
        ["Directions from {origin} to {destination}.", "How do I get from {origin} to {destination} by {mode}?",
         "Route from {origin} to {destination}, {avoid_tolls}."],
        lambda r: dict(zip(["origin", "destination"], r.sample(FN_PLACES, 2)),
                       mode=r.choice(["driving", "walking", "cycling", "transit"]), avoid_tolls=r.random() < 0.5),
        {"avoid_tolls": {True: "avoiding tolls", False: "tolls are fine"}}),
}


def _fields(phrasing: str) -> set[str]:
    """The parameters a phrasing names ("{recipient[city]}" names recipient)."""
    return {f.split("[")[0] for _, f, _, _ in string.Formatter().parse(phrasing) if f}


def fn_schema(name: str) -> dict:
    spec = FN_CATALOG[name]
    return _tool(name, spec["desc"], spec["params"], spec["required"])


def fn_question(rng: Random, name: str) -> tuple[str, dict]:
    """A question for the catalog tool `name` and the arguments it states (the required ones always)."""
    spec = FN_CATALOG[name]
    phrasing, values = rng.choice(spec["phrasings"]), spec["values"](rng)
    named = _fields(phrasing)
    assert set(spec["required"]) <= named, (name, phrasing)
    shown = {k: spec["words"][k][v] if k in spec["words"] else v for k, v in values.items()}
    text = " ".join(p for p in (rng.choice(FN_OPENERS), phrasing.format(**shown), rng.choice(FN_CLOSERS)) if p)
    return text, {k: values[k] for k in spec["params"] if k in named}


def fn_request(rng: Random) -> tuple[str, list[str], dict, list[str]]:
    """One request: (question, tools offered, correct output, planted tags). 2-6 tools; when none
    fits, the need is a catalog tool left out or something no catalog tool does."""
    names = list(FN_CATALOG)
    if rng.random() >= FN_RATES["no_tool"]:
        name = rng.choice(names)
        question, args = fn_question(rng, name)
        offered = [name, *rng.sample([n for n in names if n != name], rng.randint(1, 5))]
        rng.shuffle(offered)
        return question, offered, {"tool_calls": [{"name": name, "arguments": args}]}, []
    if rng.random() < 0.6:
        need = rng.choice(names)
        question, capability = fn_question(rng, need)[0], FN_CATALOG[need]["capability"]
    else:
        need = None
        question, capability = rng.choice(FN_OUT_OF_SCOPE)
    offered = rng.sample([n for n in names if n != need], rng.randint(2, 6))
    return question, offered, {"content": FN_REFUSAL.format(capability=capability)}, ["no_fitting_tool"]


def fn_wrong(rng: Random, offered: list[str], output: dict) -> dict:
    """A teacher mistake: a call where none fits, a refusal where one does, another offered tool,
    one argument copied wrong (changed, dropped, or a number sent as a string)."""
    if "content" in output:
        name = rng.choice(offered)
        return {"tool_calls": [{"name": name, "arguments": fn_question(rng, name)[1]}]}
    (call,) = output["tool_calls"]
    kind = rng.choice(["refuse", "tool", "value", "value", "drop", "type"])
    args = dict(call["arguments"])
    numeric = [k for k, v in args.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if kind == "refuse":
        return {"content": FN_REFUSAL.format(capability=FN_CATALOG[call["name"]]["capability"])}
    if kind == "tool" and len(offered) > 1:
        return {"tool_calls": [{"name": rng.choice([n for n in offered if n != call["name"]]), "arguments": args}]}
    if kind == "drop" and len(args) > 1:
        del args[rng.choice(sorted(args))]
    elif kind == "type" and numeric:
        key = rng.choice(numeric)
        args[key] = str(args[key])
    else:
        key = rng.choice(sorted(args))
        value = args[key]
        while args[key] == value:
            args[key] = FN_CATALOG[call["name"]]["values"](rng)[key]
    return {"tool_calls": [{"name": call["name"], "arguments": args}]}


def generate_fn(seed: int) -> tuple[dict[str, bytes], dict]:
    """The per-call-tools fixture: acme-fn's proxy log (one file, no step, no session) and its truth."""
    rng = Random(f"{seed}-fn")
    wrong = set(rng.sample(range(FN_CALLS), round(FN_CALLS * FN_RATES["teacher_wrong"])))
    rows, truth = [], []
    for i in range(FN_CALLS):
        question, offered, output, tags = fn_request(rng)
        call = {"id": "call-" + hexid(rng), "day": rng.randrange(len(DAYS)), "t": rng.uniform(0, 86000),
                "step": None, "task": "call_function", "output": output}
        logged = fn_wrong(rng, offered, output) if i in wrong else output
        messages = [{"role": "system", "content": FN_SYSTEM}, {"role": "user", "content": question}]
        tools = [fn_schema(n) for n in offered]
        request = {"model": FN_MODEL, "messages": messages, "tools": tools, "tool_choice": "auto", "temperature": 0}
        prompt = (len(json.dumps(messages)) + len(json.dumps(tools))) // 4
        rows.append((call["day"], call["t"], line(proxy_entry(rng, call, FN_AGENT, request, logged, None, prompt))))
        truth.append({"id": call["id"], "task": "call_function", "output": output, "teacher_correct": i not in wrong,
                      "planted": tags + (["teacher_wrong"] if i in wrong else [])})
    rows.sort(key=lambda r: (r[0], r[1]))
    files = {"logs/fn-agent.jsonl": b"".join(raw for _, _, raw in rows), "truth.jsonl": b"".join(map(line, truth))}
    counts = {"agent": FN_AGENT, "calls": FN_CALLS, "catalog": len(FN_CATALOG),
              "no_fitting_tool": sum("no_fitting_tool" in t["planted"] for t in truth), "teacher_wrong": len(wrong),
              "tools_offered": {n: sum(len(json.loads(raw)["request"]["tools"]) == n for _, _, raw in rows)
                                for n in range(2, 7)}}
    return files, counts


# ---------------------------------------------------------------- fixture: long policy (acme-care)

CARE_AGENT, CARE_MODEL, CARE_DIALOGUES, CARE_DAY = "acme-care", "gpt-4o-2024-08-06", 250, 2
CARE_WRONG = 0.03
CARE_POLICY = """# Acme Outfitters customer-care policy

You are the customer-care agent of Acme Outfitters, an online store for clothing, outdoor gear, electronics and \
home goods. You talk with customers in a chat window. You can help them with their account and orders: look up an \
order, cancel or change an order that is still pending, return or exchange items from a delivered order, update a \
shipping or default address, and answer questions about our products. You act only through the tools you are \
given, and you follow this policy in every conversation. The current time is 2026-11-05 14:00 EST.

## 1. How you work

- Each turn you either call exactly one tool or write exactly one message to the customer, never both. After a \
tool returns, read its result before you decide what to do next.
- Never invent information. Order contents, prices, statuses, tracking ids, item ids, payment methods and product \
availability come only from tool results in this conversation. If you need a fact you do not have, call the tool \
that returns it. If no tool returns it, say that you do not know.
- Use the calculate tool for any arithmetic you report to the customer: totals of several items, price \
differences, refund amounts. Quote the result with two decimals and a dollar sign.
- Ids are exact strings. Order ids start with "#W" followed by seven digits; copy them with the "#". Item ids and \
product ids are ten digits. Payment method ids look like "credit_card_1234567", "paypal_1234567" or \
"gift_card_1234567".
- Address the customer by first name once you know it. Do not repeat their email address, street address, or \
payment details back to them unless they ask you to confirm them, and never show the full card number (only the \
brand and the last four digits).

## 2. Identity

- Before you discuss or change anything that belongs to a customer, you must find their user id. Ask for the \
email address on their account and call find_user_id_by_email. If they do not know it, or no user is found, ask \
for their first name, last name and zip code and call find_user_id_by_name_zip.
- If neither lookup finds the customer after they have given both kinds of details, explain that you cannot \
access the account without verifying it and offer to transfer them to a human agent.
- Once you have the user id, call get_user_details to see the customer's name, addresses, payment methods and \
orders. Use it to check that any order they ask about is theirs: an order id that is not in their list of orders \
belongs to someone else, and you must not look it up or discuss it.
- You may help only one customer per conversation. If the customer asks about another person's account or orders, \
even a family member's, politely refuse and explain that the other person has to contact us themselves.
- General questions about our products or this policy do not need identification. Answer them without asking for \
an email, but identify the customer before you discuss any order.

## 3. Confirmation before changes

Cancelling an order, modifying a pending order's items or address, returning or exchanging items and updating a \
user's default address all change our records and cannot be undone by you. Before any of these actions:

1. Make sure you have every detail the action needs: the order id, the exact item ids, the new item ids, the \
payment method, the reason or the new address.
2. Write one message that lists the details of the action in plain words, including any amount that will be \
charged or refunded and to which payment method.
3. Ask the customer to confirm with "yes". Only call the tool after the customer explicitly confirms in their \
next message. "Yes", "yes please", "go ahead", "confirm" and "do it" count as confirmation.

Do not bundle changes to several orders into one confirmation. Handle one order at a time.

## 4. Order statuses

get_order_details returns the status of an order:

- pending: the order has been placed but not yet processed. It can be cancelled, its shipping address and its \
items can be changed.
- processed: the order is packed and handed to the carrier. It can no longer be cancelled or changed, and it \
cannot be returned until it is delivered. Give the customer the tracking id from the order's fulfillments.
- delivered: the order has reached the customer. Its items can be returned or exchanged within 30 days of \
delivery, as described below.
- cancelled: the order was cancelled and its payment refunded. Nothing more can be done with it.
- return requested or exchange requested: a return or exchange is already open for this order. No further return, \
exchange or change can be made to it; the customer must wait for the open request to finish.

When a customer asks where an order is, tell them its status, the items in it (name and the options that matter, \
such as size or color), and for processed and delivered orders the tracking id. Do not guess delivery dates.

## 5. Cancelling a pending order

- Only orders with status pending can be cancelled. For a processed order, explain that it is on its way and can \
be returned once delivered. For a delivered order, explain the return and exchange options instead.
- The customer must give one of two reasons: "no longer needed" or "ordered by mistake". If they give another \
reason, ask which of the two fits best. Pass the reason to cancel_pending_order exactly as written here.
- Before you cancel, tell the customer the items in the order, the order total and where the refund goes, and ask \
for confirmation.
- The refund goes to the payment method the order was paid with. A refund to a gift card is available \
immediately; a refund to a credit card or PayPal account arrives within 5 to 7 business days.

## 6. Changing a pending order

- Shipping address: you may change the shipping address of a pending order with modify_pending_order_address. \
Collect the full new address: street address, optional apartment or suite, city, state, country and zip code. \
Repeat it back in your confirmation message. Changing an order's address does not change the customer's default \
address; if they want that as well, it is a separate action with its own confirmation.
- Items: you may replace items in a pending order with other variants of the same product (for example another \
size or color of the same shirt) with modify_pending_order_items. A product cannot be swapped for a different \
product; for that the customer has to cancel and order again. The new variant must be available. This action can \
be taken only once per order, so ask the customer to tell you every item they want to change before you confirm. \
The price difference is charged to, or refunded to, a payment method the customer chooses from their account; if \
they do not choose, use the method the order was paid with. A gift card can only pay a difference that is no more \
than its balance.

## 7. Returns

- Items from a delivered order can be returned within 30 days of delivery. Ask the customer which items they want \
to return; they may return some items and keep the others. Use the item ids from the order details.
- The refund goes either to the payment method the order was paid with or to a gift card in the customer's \
account. No other method is allowed. If the customer has no preference, use the original payment method.
- Before you confirm, compute the refund total of the returned items with calculate when there is more than one \
item, and state it in your confirmation message.
- After return_delivered_order_items succeeds, tell the customer that the order status is now return requested, \
that they will receive an email with the return label and instructions, and that the refund is issued once the \
items reach our warehouse (5 to 7 business days to a card or PayPal account, at once to a gift card).

## 8. Exchanges

- Items from a delivered order can be exchanged within 30 days of delivery for another variant of the same \
product, for example a different size or color. Exchanges to a different product are not possible; the customer \
can return the item and order the other product.
- Look up the product with get_product_details to find the variant that matches what the customer wants and check \
that it is available. If it is not, tell the customer which variants with otherwise the same options are \
available, and do not offer unavailable ones.
- Collect every item the customer wants to exchange in this order before you confirm: an order can be exchanged \
only once. Compute the price difference with calculate. If the new item costs more, the difference is charged to \
the payment method the customer chooses; if it costs less, the difference is refunded to it. If they do not \
choose, use the method the order was paid with.
- After exchange_delivered_order_items succeeds, tell the customer that the order status is now exchange \
requested, that they will receive an email with instructions for sending the old items back, and that the new \
items ship once the old ones arrive.

## 9. Addresses on the account

A customer may change their default address with modify_user_address. Collect the complete address, repeat it \
back and ask for confirmation as for any other change. Updating the default address does not change the address \
of orders that have already been placed.

## 10. Products

- list_all_product_types returns the name and product id of every product type we sell. get_product_details \
returns a product's variants with their options, price and availability.
- When a customer asks whether we sell something, in which options, or at what price, look it up and answer from \
the tool results only. Mention only available variants unless the customer asks about a specific unavailable one.

## 11. Refunds, compensation and goodwill

- Refunds are only those described in sections 5, 7 and 8: the order total for a cancelled pending order, the \
item prices for returned items, and price differences for exchanges and item changes. You cannot refund shipping \
costs, issue partial refunds for items the customer keeps, or refund to a payment method other than the ones \
allowed.
- You cannot offer compensation of any kind: no discounts, coupons, vouchers, store credit, gift card top-ups, \
free shipping, price matching or price adjustments for later sales. This holds for late deliveries, damaged \
items, missing items and bad experiences alike.
- When a customer asks for compensation, apologize once, explain in one or two sentences that you are not able to \
offer it, and offer what the policy allows (a return or an exchange of the affected items, if the order \
qualifies). If the customer insists, or asks for a person, transfer them to a human agent. Human agents may grant \
goodwill gestures of up to 10% of the order total, but do not promise the customer that they will.

## 12. Transfers to human agents

Transfer the customer to a human agent with transfer_to_human_agents, and only in these cases:

- The customer explicitly asks for a person, a manager or a supervisor.
- The customer insists on something this policy does not allow you to do, after you have explained the policy \
once (for example compensation, a return after 30 days, or a refund to another card).
- The request is outside what your tools can do: warranty repairs, business or wholesale accounts, lost parcels \
reported by the carrier, legal complaints, suspected fraud or a compromised account.
- The customer cannot be identified with either lookup.

The summary you pass to the tool must say who the customer is (their user id, if you have it), what they asked \
for and what you have already done, in one or two sentences. After the tool call, send exactly this message and \
nothing else: "YOU ARE BEING TRANSFERRED TO A HUMAN AGENT. PLEASE HOLD ON."

## 13. Tone and format

- Be polite, calm and brief. Most replies are two to four sentences. Use a short list only when you show the \
items of an order, several variants, or the details of an action to confirm.
- Stay on topic. If the customer asks about something unrelated to shopping with us, say that you can only help \
with Acme Outfitters orders, accounts and products.
- Never ask for passwords, full card numbers or security codes. If a customer shares one, do not repeat it and \
tell them not to share it in chat.
- When the customer's request is done, ask whether there is anything else you can help with. When they say there \
is nothing else, thank them and close the conversation."""


def _care_tool(name: str, desc: str, props: dict, required: list[str] | None = None) -> dict:
    return _tool(name, desc, props, list(props) if required is None else required)


_ORDER_ID = _p("string", "Order id: '#W' and seven digits, e.g. '#W4817302'.")
_ITEM_IDS = {"type": "array", "items": {"type": "string"}, "description": "Ten-digit item ids from the order, e.g. "
             "['4410938271']; list an id twice to act on two units of it."}
_ADDRESS = {"address1": _p("string", "Street address, e.g. '418 Cedar Lane'."),
            "address2": _p("string", "Apartment, suite or unit, or an empty string."),
            "city": _p("string", "City, e.g. 'Denver'."), "state": _p("string", "Two-letter state code, e.g. 'CO'."),
            "country": _p("string", "Country, e.g. 'USA'."), "zip": _p("string", "Five-digit zip code.")}
_PAYMENT = _p("string", "Id of a payment method in the customer's account that pays or receives the price "
              "difference, e.g. 'paypal_5520391'.")
_NEW_ITEMS = dict(_ITEM_IDS, description="Ten-digit ids of the replacement variants, one per entry of item_ids and "
                  "in the same order; each must be a variant of the same product.")
CARE_TOOLS = [
    _care_tool("calculate", "Evaluate an arithmetic expression and return the result rounded to two decimals.",
               {"expression": _p("string", "Numbers, parentheses and + - * / only, e.g. '129.99 - 104.5'.")}),
    _care_tool("cancel_pending_order", "Cancel an order whose status is pending and refund its payment to the "
               "method it was paid with. Only after the customer has confirmed the details. Returns the updated "
               "order.",
               {"order_id": _ORDER_ID, "reason": _p("string", "Why the customer cancels.",
                                                    ["no longer needed", "ordered by mistake"])}),
    _care_tool("exchange_delivered_order_items", "Open an exchange of items of a delivered order for other variants "
               "of the same products. Possible once per order, and only after the customer has confirmed the items "
               "and the price difference. Returns the updated order.",
               {"order_id": _ORDER_ID, "item_ids": _ITEM_IDS, "new_item_ids": _NEW_ITEMS,
                "payment_method_id": _PAYMENT}),
    _care_tool("find_user_id_by_email", "Look up a customer's user id by the email address on the account. Returns "
               "the user id, or an error when no account has that email.",
               {"email": _p("string", "Email address, e.g. 'jo.doe@example.com'.")}),
    _care_tool("find_user_id_by_name_zip", "Look up a customer's user id by first name, last name and the zip code "
               "of their default address. Use it when the email is unknown or not found. Returns the user id, or an "
               "error.",
               {"first_name": _p("string", "First name, e.g. 'Jo'."),
                "last_name": _p("string", "Last name, e.g. 'Doe'."),
                "zip": _p("string", "Five-digit zip code.")}),
    _care_tool("get_order_details", "Return an order: status, items with their ids, options and prices, shipping "
               "address, fulfillments with tracking ids, delivery date and payment history.", {"order_id": _ORDER_ID}),
    _care_tool("get_product_details", "Return a product and all its variants: item id, options, price and whether "
               "it is available.",
               {"product_id": _p("string", "Ten-digit product id (not an item id).")}),
    _care_tool("get_user_details", "Return a customer's profile: name, default address, email, payment methods "
               "and the ids of their orders.", {"user_id": _p("string", "User id, e.g. 'jo_doe_1234'.")}),
    _care_tool("list_all_product_types", "Return the name and product id of every product type in the store.", {}),
    _care_tool("modify_pending_order_address", "Change the shipping address of a pending order. Only after the "
               "customer has confirmed the new address. Returns the updated order.",
               {"order_id": _ORDER_ID, **_ADDRESS}),
    _care_tool("modify_pending_order_items", "Replace items of a pending order with other variants of the same "
               "products. Possible once per order, and only after the customer has confirmed the items and the "
               "price difference. Returns the updated order.",
               {"order_id": _ORDER_ID, "item_ids": _ITEM_IDS, "new_item_ids": _NEW_ITEMS,
                "payment_method_id": _PAYMENT}),
    _care_tool("modify_user_address", "Change a customer's default address. Only after the customer has confirmed "
               "the new address. Returns the updated profile.",
               {"user_id": _p("string", "User id, e.g. 'jo_doe_1234'."), **_ADDRESS}),
    _care_tool("return_delivered_order_items", "Open a return of items of a delivered order; the customer gets an "
               "email with the return label. Only after the customer has confirmed the items and the refund "
               "method. Returns the updated order.",
               {"order_id": _ORDER_ID, "item_ids": _ITEM_IDS,
                "payment_method_id": _p("string", "Id of the payment method that receives the refund: the one the "
                                        "order was paid with, or a gift card of the customer.")}),
    _care_tool("transfer_to_human_agents", "Hand the conversation to a human agent with a short summary. Only in "
               "the cases the policy lists.", {"summary": _p("string", "Who the customer is, what they need and "
                                                             "what was done so far.")}),
]
TRANSFER_MESSAGE = "YOU ARE BEING TRANSFERRED TO A HUMAN AGENT. PLEASE HOLD ON."

COLORS = ["black", "white", "navy", "red", "green", "grey", "blue"]
# product type -> (option name -> values, base price)
PRODUCT_TYPES = {
    "T-Shirt": ({"color": COLORS, "size": ["S", "M", "L", "XL"], "material": ["cotton", "polyester"]}, 25),
    "Running Shoes": ({"size": ["7", "8", "9", "10", "11", "12"], "color": COLORS,
                       "material": ["mesh", "leather"]}, 110),
    "Hiking Boots": ({"size": ["7", "8", "9", "10", "11"], "material": ["leather", "synthetic"],
                      "waterproof": ["yes", "no"]}, 160),
    "Backpack": ({"color": COLORS, "size": ["small", "medium", "large"], "material": ["nylon", "polyester", "canvas"],
                  "compartment": ["laptop", "hydration", "camera"]}, 75),
    "Water Bottle": ({"capacity": ["500ml", "750ml", "1000ml"], "material": ["glass", "stainless steel", "plastic"],
                      "color": COLORS}, 22),
    "Wireless Earbuds": ({"color": COLORS, "battery life": ["6 hours", "8 hours", "10 hours"],
                          "water resistance": ["IPX4", "IPX7", "no"]}, 130),
    "Desk Lamp": ({"color": COLORS, "brightness": ["low", "medium", "high"],
                   "power source": ["USB", "AC adapter", "battery"]}, 48),
    "Coffee Maker": ({"color": COLORS, "capacity": ["1 cup", "4 cups", "8 cups", "12 cups"],
                      "type": ["drip", "espresso", "french press"]}, 95),
    "Smart Watch": ({"color": COLORS, "band material": ["silicone", "leather", "metal"], "display": ["AMOLED", "LCD"]},
                    240),
    "Yoga Mat": ({"thickness": ["4mm", "6mm", "8mm"], "material": ["PVC", "TPE", "natural rubber"],
                  "color": COLORS}, 35),
    "Tent": ({"size": ["2-person", "4-person", "6-person"], "color": COLORS, "season": ["3-season", "4-season"]}, 210),
    "Sleeping Bag": ({"temperature rating": ["0F", "20F", "40F"], "fill": ["down", "synthetic"],
                      "size": ["regular", "long"]}, 140),
    "Rain Jacket": ({"size": ["S", "M", "L", "XL"], "color": COLORS, "zipper": ["full", "half"]}, 120),
    "Bluetooth Speaker": ({"color": COLORS, "battery life": ["10 hours", "20 hours", "30 hours"],
                           "water resistance": ["yes", "no"]}, 85),
    "Electric Kettle": ({"capacity": ["1L", "1.5L", "1.7L"], "material": ["glass", "stainless steel", "plastic"],
                         "color": COLORS}, 45),
    "Office Chair": ({"material": ["mesh", "leather", "fabric"], "color": COLORS,
                      "armrest": ["fixed", "adjustable", "none"]}, 290),
    "Headphones": ({"type": ["over-ear", "on-ear"], "connectivity": ["wired", "wireless"], "color": COLORS}, 150),
    "Sunglasses": ({"frame color": COLORS, "lens color": ["brown", "grey", "green"],
                    "lens type": ["polarized", "non-polarized"]}, 90),
    "Skateboard": ({"deck material": ["maple", "bamboo", "plastic"], "length": ["28 inch", "31 inch", "34 inch"],
                    "design": ["plain", "graphic"]}, 80),
    "Bicycle Helmet": ({"size": ["S", "M", "L"], "color": COLORS, "ventilation": ["low", "medium", "high"]}, 65),
    "Blender": ({"capacity": ["48oz", "64oz"], "motor power": ["600W", "1000W", "1500W"], "color": COLORS}, 105),
    "Air Purifier": ({"room size": ["small", "medium", "large"], "filter type": ["HEPA", "carbon"],
                      "features": ["smart", "basic"]}, 180),
    "Mechanical Keyboard": ({"switch type": ["linear", "tactile", "clicky"], "backlight": ["none", "white", "RGB"],
                             "size": ["full size", "80%", "60%"]}, 130),
    "Gaming Mouse": ({"color": COLORS, "sensor type": ["optical", "laser"], "connectivity": ["wired", "wireless"]}, 60),
    "Portable Charger": ({"capacity": ["5000mAh", "10000mAh", "20000mAh"], "output": ["USB-A", "USB-C", "wireless"],
                          "color": COLORS}, 40),
    "Pet Bed": ({"size": ["small", "medium", "large"], "material": ["memory foam", "polyester"], "color": COLORS}, 70),
    "Garden Hose": ({"length": ["25ft", "50ft", "100ft"], "material": ["rubber", "vinyl", "latex"],
                     "color": COLORS}, 38),
    "Cookware Set": ({"material": ["stainless steel", "non-stick", "cast iron"], "pieces": ["5", "8", "12"]}, 170),
}
FIRST_NAMES = ["Yusuf", "Mia", "Ethan", "Aarav", "Sofia", "Liam", "Noor", "Chen", "Isabella", "Omar", "Emma", "Lucas",
               "Fatima", "Mei", "Daniel", "Olivia", "Raj", "Amelia", "Mateo", "Ava", "Sven", "Harper", "Kenji", "Zoe"]
LAST_NAMES = ["Rossi", "Garcia", "Nguyen", "Patel", "Kovacs", "Smith", "Hernandez", "Ito", "Silva", "Khan", "Moore",
              "Lopez", "Muller", "Anderson", "Sanchez", "Kim", "Brown", "Wilson", "Johansson", "Martin"]
STREETS = ["Maple Drive", "Oak Street", "Cedar Lane", "Elm Avenue", "Hillcrest Road", "Lakeview Drive", "Main Street",
           "Park Avenue", "River Road", "Sunset Boulevard", "Willow Way", "Chestnut Street"]
CITY_STATE = [("Austin", "TX", "787"), ("Denver", "CO", "802"), ("Seattle", "WA", "981"), ("Columbus", "OH", "432"),
              ("Phoenix", "AZ", "850"), ("Charlotte", "NC", "282"), ("Portland", "OR", "972"),
              ("San Diego", "CA", "921"), ("Chicago", "IL", "606"), ("Boston", "MA", "021"),
              ("Philadelphia", "PA", "191"), ("Nashville", "TN", "372")]
CARD_BRANDS = ["visa", "mastercard", "amex"]


def _digits(rng: Random, n: int) -> str:
    return str(rng.randint(10 ** (n - 1), 10 ** n - 1))


def care_products(rng: Random) -> dict[str, dict]:
    """Every product as get_product_details returns it: 8-24 variants, some unavailable."""
    products = {}
    for name, (options, base) in PRODUCT_TYPES.items():
        combos = [{}]
        for key, values in options.items():
            combos = [dict(c, **{key: v}) for c in combos for v in values]
        variants = {}
        for combo in rng.sample(combos, min(len(combos), rng.randint(8, 24))):
            item_id = _digits(rng, 10)
            variants[item_id] = {"item_id": item_id, "options": combo, "available": rng.random() < 0.75,
                                 "price": round(base * rng.uniform(0.8, 1.3), 2)}
        pid = _digits(rng, 10)
        products[pid] = {"name": name, "product_id": pid, "variants": variants}
    return products


def care_address(rng: Random) -> dict:
    city, state, prefix = rng.choice(CITY_STATE)
    return {"address1": f"{rng.randint(10, 9999)} {rng.choice(STREETS)}",
            "address2": rng.choice(["", "", f"Suite {rng.randint(100, 999)}", f"Apt {rng.randint(1, 40)}"]),
            "city": city, "country": "USA", "state": state, "zip": prefix + _digits(rng, 2)}


def care_user(rng: Random, products: dict, pii: set[str]) -> tuple[dict, dict]:
    """A customer as get_user_details returns it, and their orders by id (2-5, mixed statuses)."""
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    user_id = f"{first.lower()}_{last.lower()}_{rng.randint(1000, 9999)}"
    address = care_address(rng)
    methods = {}
    for source in rng.sample(["credit_card", "paypal", "gift_card"], rng.randint(1, 3)):
        pid = f"{source}_{_digits(rng, 7)}"
        methods[pid] = {"source": source, "id": pid, **(
            {"brand": rng.choice(CARD_BRANDS), "last_four": _digits(rng, 4)} if source == "credit_card" else
            {"balance": rng.randint(5, 200)} if source == "gift_card" else {})}
    email = f"{first.lower()}.{last.lower()}{rng.randint(10, 9999)}@example.com"
    orders = {}
    for _ in range(rng.randint(2, 5)):
        oid = "#W" + _digits(rng, 7)
        status = rng.choice(["pending", "pending", "processed", "delivered", "delivered", "delivered", "cancelled"])
        orders[oid] = care_order(rng, products, oid, user_id, address, status, rng.choice(list(methods)))
    user = {"user_id": user_id, "name": {"first_name": first, "last_name": last}, "address": address, "email": email,
            "payment_methods": methods, "orders": list(orders)}
    pii.update([email, f"{first} {last}", address["address1"]])
    return user, orders


def care_order(rng: Random, products: dict, oid: str, user_id: str, address: dict, status: str, method: str) -> dict:
    """An order as get_order_details returns it: 1-4 items of different products."""
    items = []
    for pid in rng.sample(list(products), rng.randint(1, 4)):
        product = products[pid]
        variant = rng.choice(list(product["variants"].values()))
        items.append({"name": product["name"], "product_id": pid, "item_id": variant["item_id"],
                      "price": variant["price"], "options": variant["options"]})
    total = round(sum(i["price"] for i in items), 2)
    order = {"order_id": oid, "user_id": user_id, "address": dict(address), "items": items, "status": status,
             "fulfillments": [], "payment_history": [{"transaction_type": "payment", "amount": total,
                                                      "payment_method_id": method}]}
    if status in ("processed", "delivered"):
        order["fulfillments"] = [{"tracking_id": [_digits(rng, 12)], "item_ids": [i["item_id"] for i in items]}]
    if status == "delivered":
        order["delivered_on"] = (DAYS[CARE_DAY].date() - dt.timedelta(days=rng.randint(2, 45))).isoformat()
    if status == "cancelled":
        order["payment_history"].append({"transaction_type": "refund", "amount": total, "payment_method_id": method})
    return order


CARE_SAY = {
    "identify": ["I'd be happy to help with that. First I need to verify your identity: what is the email address on "
                 "your account? If you don't remember it, your first name, last name and zip code work too.",
                 "Sure, I can help. Before I look at your account, please tell me the email address you use with us, "
                 "or your full name and zip code.",
                 "Thanks for reaching out. To find your account, could you share its email address? Alternatively, "
                 "give me your first name, last name and zip code."],
    "not_found": ["I couldn't find an account with that email address. Could you give me your first name, last name "
                  "and zip code instead?",
                  "That email address doesn't match any account. Let's try another way: what are your first name, "
                  "last name and zip code?"],
    "status": {
        "pending": ["Your order {oid} is pending: it hasn't been processed yet. It contains {items}, {total} in total. "
                    "While it is pending it can still be changed or cancelled.",
                    "Order {oid} is still pending, so it has not shipped yet. Items: {items}. Total: {total}."],
        "processed": ["Order {oid} has been processed and handed to the carrier. It contains {items}, and its tracking "
                      "id is {tracking}.",
                      "Your order {oid} is on its way: it was processed, and the tracking id is {tracking}. Items: "
                      "{items}."],
        "delivered": ["Order {oid} was delivered on {delivered_on}. It contained {items}; the tracking id was "
                      "{tracking}.", "Your order {oid} ({items}) was delivered on {delivered_on}."],
        "cancelled": ["Order {oid} was cancelled, and its payment of {total} was refunded. It contained {items}.",
                      "Order {oid} is cancelled; the {total} you paid was refunded to the original payment method."]},
    "no_change": {
        "processed": ["Order {oid} has already been processed and is with the carrier (tracking id {tracking}), so I "
                      "can't {what} anymore. Once it is delivered, you can return or exchange items within 30 days.",
                      "I'm sorry, order {oid} is already processed, so it can no longer be changed or cancelled. You "
                      "can return or exchange its items within 30 days of delivery."],
        "delivered": ["Order {oid} was delivered on {delivered_on}, so I can't {what}. You can return or exchange "
                      "its items within 30 days of delivery instead."],
        "cancelled": ["Order {oid} is already cancelled, so there is nothing to change. Its payment of {total} was "
                      "refunded."]},
    "not_delivered": {
        "pending": ["Order {oid} is still pending, so it hasn't been delivered and can't be {what} yet. While it is "
                    "pending I can cancel it or change its items instead."],
        "processed": ["Order {oid} is on its way (tracking id {tracking}) but not delivered yet, so it can't be {what} "
                      "yet. Once it arrives, you have 30 days."],
        "cancelled": ["Order {oid} was cancelled and its payment of {total} refunded, so it can't be {what}."]},
    "late": ["Order {oid} was delivered on {delivered_on}, more than 30 days ago, so it is outside our return and "
             "exchange window. I'm sorry I can't {what}.",
             "I'm sorry, returns and exchanges are possible within 30 days of delivery, and order {oid} was "
             "delivered on {delivered_on}. I can't {what}."],
    "cancel_confirm": ["Order {oid} is pending and contains {items}, {total} in total. To confirm: I'll cancel it for "
                       "the reason \"{reason}\", and {total} will be refunded to {method}. Shall I proceed (yes/no)?",
                       "Here is what I'll do:\n- cancel order {oid} ({items})\n- reason: {reason}\n- refund {total} to "
                       "{method}\nPlease confirm with yes to proceed."],
    "cancel_reason": ["Order {oid} is pending and contains {items}, {total} in total. I can cancel it and refund "
                      "{total} to {method}. Could you tell me the reason: \"no longer needed\" or \"ordered by "
                      "mistake\"? And please confirm with yes that I should proceed.",
                      "I can cancel order {oid} ({items}, {total}); the refund goes to {method}. Which reason fits: "
                      "no longer needed, or ordered by mistake? Please also confirm (yes/no)."],
    "cancelled": ["Done: order {oid} is cancelled. {refund}",
                  "Order {oid} has been cancelled. {refund} Is there anything else I can help you with?"],
    "refund_gift": ["The refund of {amount} is already on your gift card.",
                    "{amount} was added back to your gift card right away."],
    "refund_card": ["The refund of {amount} to {method} takes 5-7 business days.",
                    "You'll see the {amount} on {method} within 5-7 business days."],
    "kept": ["No problem, I've left order {oid} as it is. Is there anything else I can help with?",
             "Understood, I won't make any change to order {oid}."],
    "refund_method": ["I can return {items} from order {oid}. Should the refund go to the original payment method "
                      "({method}) or to your gift card?",
                      "Sure. For the return of {items} from order {oid}, would you like the refund on {method}, the "
                      "original payment method, or on your gift card?"],
    "return_confirm": ["To confirm the return:\n- order {oid}\n- items: {items}\n- refund: {amount} to {method}\n"
                       "Shall I go ahead (yes/no)?",
                       "I'll return {items} from order {oid} and refund {amount} to {method}. Do you confirm "
                       "(yes/no)?"],
    "returned": ["The return is open: order {oid} is now \"return requested\". You'll get an email with the return "
                 "label and instructions, and {amount} goes to {method} once the items reach our warehouse.",
                 "All set. Order {oid} now has status return requested; watch for an email with the label. The "
                 "refund of {amount} to {method} is issued when we receive the items."],
    "swap_confirm": ["I can exchange your {old} for the {new} variant (item {new_id}, {new_price}). {difference} Shall "
                     "I proceed (yes/no)?",
                     "Here is the {action}:\n- from: {old} ({old_price})\n- to: {new} (item {new_id}, {new_price})\n"
                     "- {difference}\nPlease confirm with yes."],
    "unavailable": ["I'm sorry, the {product} with {wanted} isn't available right now. {alternatives}",
                    "Unfortunately that {product} variant ({wanted}) is out of stock. {alternatives}"],
    "exchanged": ["Done: order {oid} is now \"exchange requested\". You'll receive an email with instructions for "
                  "sending back the {old_name}; the new one ships once it arrives.",
                  "The exchange is open (order {oid}, status exchange requested). Please follow the instructions in "
                  "the email we're sending you to return the old item."],
    "modified": ["Order {oid} is updated: the {old_name} is now {new}. The order is still pending and will ship as "
                 "usual.", "Done. Order {oid} now has the {new} instead, and it remains pending."],
    "address_confirm": ["To confirm, I'll change the shipping address of order {oid} to {address}. Shall I proceed "
                        "(yes/no)?", "The new shipping address for order {oid} would be:\n{address}\nIs that correct? "
                        "Please confirm with yes."],
    "address_done": ["Order {oid} will now ship to {address}.",
                     "Done: the shipping address of order {oid} is updated."],
    "user_address_confirm": ["To confirm, I'll set your default address to {address}. Orders already placed keep "
                             "their address. Shall I proceed (yes/no)?"],
    "user_address_done": ["Your default address is now {address}.", "Done: your default address is updated."],
    "product": ["Yes, we have the {product} with {wanted}:\n{variants}",
                "Here are the available {product} variants with {wanted}:\n{variants}"],
    "no_product": ["I'm sorry, no {product} with {wanted} is available at the moment.",
                   "We don't have a {product} with {wanted} in stock right now."],
    "compensation": ["I'm sorry that order {oid} didn't go as expected. I'm not able to offer compensation such as "
                     "credits or discounts, but {option}",
                     "I apologize for the trouble with order {oid}. Compensation isn't something I can offer; "
                     "{option}"],
    "comp_option_ok": ["you can return or exchange its items within 30 days of delivery if you'd like.",
                       "I can help you return or exchange the items, since it is within 30 days of delivery."],
    "comp_option_none": ["I can help with anything else about your orders.",
                         "I'm happy to help with any other question about your orders."],
    "other_person": ["I'm sorry, I can only help with your own account and orders. The account holder needs to "
                     "contact us directly.", "For privacy reasons I can't discuss another customer's orders, even a "
                     "family member's. Please ask them to reach out to us themselves."],
    "off_topic": ["I'm sorry, I can only help with Acme Outfitters orders, accounts and products.",
                  "That's outside what I can help with; I'm here for your Acme Outfitters orders, account and "
                  "products."],
    "closing": ["You're welcome, {first}! Have a great day.", "Glad I could help, {first}. Take care!",
                "Thanks for contacting Acme Outfitters. Goodbye!"],
    "ok": ["Understood. Is there anything else I can help you with?",
           "Of course. Let me know if you need anything else."],
}
CARE_ASK = {
    "status": ["Where is my order {oid}?", "Can you tell me the status of order {oid}?",
               "What's happening with the order that has the {product}?", "Has my {product} shipped yet?"],
    "cancel": ["I want to cancel order {oid}{why}.", "Please cancel my order {oid}{why}.",
               "I'd like to cancel the order with the {product}{why}."],
    "return": ["I'd like to return the {items} from order {oid}.", "I want to send back the {items} I got.",
               "Can I return the {items} from my order {oid}?"],
    "exchange": ["I'd like to exchange the {product} from order {oid} for one with {wanted}.",
                 "The {product} I received doesn't work for me, can I swap it for {wanted}?"],
    "modify_items": ["Can I change the {product} in my pending order {oid} to {wanted}?",
                     "I just ordered a {product} but I want it with {wanted} instead. The order is {oid}."],
    "modify_address": ["Please ship order {oid} to {address} instead.",
                       "I moved! Can you change the delivery address of {oid} to {address}?"],
    "user_address": ["Please update my default address to {address}.", "I have a new address: {address}. Can you "
                     "update my account?"],
    "product_info": ["Do you sell the {product} with {wanted}? How much is it?",
                     "Is there a {product} with {wanted} in stock?"],
    "compensation": ["My order {oid} was a mess and took forever. I want some compensation for this.",
                     "Order {oid} was a disappointment. What are you going to give me to make up for it?"],
    "human": ["I want to talk to a real person about order {oid}.", "Get me a human agent, please."],
    "other_person": ["Can you check my husband's order {oid}? He's busy.",
                     "My daughter placed order {oid}, can you tell me when it arrives?"],
    "off_topic": ["What do you think about the weather today?", "Can you help me write a cover letter?"],
}
CARE_REPLY = {
    "greet": ["", "", "Hi.", "Hello,", "Hey there.", "Good afternoon."],
    "give_email": ["My email is {email}.", "You can find me under {email}.", "It's {email}."],
    "answer_email": ["Sure, it's {email}.", "{email}", "My email is {email}."],
    "wrong_email": ["Try {email}.", "I think it's {email}."],
    "name_zip": ["I'm {first} {last}, zip code {zip}.", "{first} {last}, {zip}.", "Name is {first} {last} and my zip "
                 "is {zip}."],
    "yes": ["Yes.", "Yes, please.", "yes", "Go ahead.", "Yes, do it.", "Confirm."],
    "no": ["Actually, no, let me keep it.", "Hmm, no, I changed my mind."],
    "reason_yes": ["It's {reason}. Yes, go ahead.", "{reason}, and yes please."],
    "original": ["The original payment method, please.", "Back to the original method."],
    "gift": ["Put it on my gift card.", "The gift card, please."],
    "insist": ["That's not acceptable. I want to talk to a manager.", "No, I want to speak to a person about this."],
    "accept": ["Fine, I'll think about it.", "OK, never mind then."],
    "pick_other": ["OK, then the one with {wanted} please.", "Then I'll take {wanted}."],
    "thanks": ["That's all, thanks.", "Great, thank you!", "Nothing else, thanks for your help.", "Perfect, bye."],
    "also": ["One more thing. {ask}", "Also, {ask}", "{ask}"],
}
CARE_OFF_POLICY = ["I'm so sorry about this! As a goodwill gesture I've added a $25 credit to your account.",
                   "I've gone ahead and processed that for you.",
                   "Your order has shipped and will arrive tomorrow."]
CARE_TASKS = {"status": 13, "cancel": 16, "return": 15, "exchange": 13, "modify_items": 8, "modify_address": 8,
              "user_address": 4, "product_info": 9, "compensation": 6, "human": 3, "other_person": 3, "off_topic": 2}
WANTS = {"status": None, "cancel": "pending", "return": "delivered", "exchange": "delivered", "modify_items": "pending",
         "modify_address": "pending", "compensation": "delivered", "human": None}


def _money_text(x: float) -> str:
    return f"${x:,.2f}"


def _variant_text(name: str, options: dict) -> str:
    return f"{name} ({', '.join(f'{k} {v}' for k, v in options.items())})"


def _items_text(items: list[dict]) -> str:
    return "; ".join(f"{_variant_text(i['name'], i['options'])} at {_money_text(i['price'])}" for i in items)


def _address_text(a: dict) -> str:
    return ", ".join(p for p in (a["address1"], a["address2"], a["city"],
                                 f"{a['state']} {a['zip']}", a["country"]) if p)


class Dialogue:
    """One acme-care conversation being written: turns ("user", text) or ("assistant", correct output,
    tool result text or None), and what the agent has learned from its tools so far."""

    def __init__(self, rng: Random, products: dict):
        self.rng, self.products, self.pii = rng, products, set()  # the PII this conversation carries
        self.user, self.orders = care_user(rng, products, self.pii)
        self.turns: list[tuple] = []
        self.known = False  # the customer is identified
        self.seen: set[str] = set()  # orders and products fetched in this conversation
        self.planned: set[str] = set()  # orders a task of this conversation is about
        self.types_listed = False
        self.ended = False

    # -- turns
    def say(self, key: str, **facts) -> None:
        options = CARE_SAY[key]
        self.turns.append(("assistant", {"content": self.rng.choice(options).format(**facts)}, None))

    def call(self, name: str, result, **arguments) -> None:
        text = result if isinstance(result, str) else json.dumps(result)
        self.turns.append(("assistant", {"tool_calls": [{"name": name, "arguments": arguments}]}, text))

    def hear(self, key: str, **facts) -> None:
        self.turns.append(("user", self.rng.choice(CARE_REPLY[key]).format(**facts)))

    # -- facts
    def method_text(self, method_id: str) -> str:
        m = self.user["payment_methods"][method_id]
        if m["source"] == "credit_card":
            return f"your {m['brand']} card ending in {m['last_four']}"
        return "your PayPal account" if m["source"] == "paypal" else "your gift card"

    def facts(self, order: dict) -> dict:
        paid = order["payment_history"][0]
        return {"oid": order["order_id"], "items": _items_text(order["items"]), "total": _money_text(paid["amount"]),
                "tracking": order["fulfillments"][0]["tracking_id"][0] if order["fulfillments"] else "",
                "delivered_on": order.get("delivered_on", ""), "method": self.method_text(paid["payment_method_id"])}

    def late(self, order: dict) -> bool:
        return (DAYS[CARE_DAY].date() - dt.date.fromisoformat(order["delivered_on"])).days > 30

    # -- identity and look-ups
    def identify(self, ask: str) -> None:
        """The customer's request, with or without their identity; then the look-ups that identify them."""
        rng, user = self.rng, self.user
        first, last, zip_code = user["name"]["first_name"], user["name"]["last_name"], user["address"]["zip"]
        way = rng.choices(["email", "asked", "name_zip", "unknown_email"], weights=[35, 35, 15, 15])[0]
        if way == "email":
            self.turns.append(("user", f"{ask} {rng.choice(CARE_REPLY['give_email']).format(email=user['email'])}"))
        elif way == "name_zip":
            name_zip = rng.choice(CARE_REPLY["name_zip"]).format(first=first, last=last, zip=zip_code)
            self.turns.append(("user", f"{ask} {name_zip}"))
        else:
            self.turns.append(("user", ask))
            self.say("identify")
        if way == "unknown_email":
            old = f"{first.lower()}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}"
            self.pii.add(old)
            self.hear("wrong_email", email=old)
            self.call("find_user_id_by_email", "Error: user not found", email=old)
            self.say("not_found")
        if way in ("name_zip", "unknown_email"):
            if way == "unknown_email":
                self.hear("name_zip", first=first, last=last, zip=zip_code)
            self.call("find_user_id_by_name_zip", user["user_id"], first_name=first, last_name=last, zip=zip_code)
        else:
            if way == "asked":
                self.hear("answer_email", email=user["email"])
            self.call("find_user_id_by_email", user["user_id"], email=user["email"])
        self.call("get_user_details", user, user_id=user["user_id"])
        self.known = True

    def fetch(self, oid: str) -> dict:
        order = self.orders[oid]
        if oid not in self.seen:
            self.call("get_order_details", order, order_id=oid)
            self.seen.add(oid)
        return order

    def find_by_product(self, oid: str) -> dict:
        """Look through the customer's orders, in their order, until the one asked about."""
        for other in self.user["orders"]:
            order = self.fetch(other)
            if other == oid:
                return order
        raise AssertionError(oid)

    def product(self, pid: str) -> dict:
        if pid not in self.seen:
            self.call("get_product_details", self.products[pid], product_id=pid)
            self.seen.add(pid)
        return self.products[pid]

    def calculate(self, expression: str, value: float) -> float:
        self.call("calculate", f"{round(value, 2)}", expression=expression)
        return round(value, 2)

    # -- the conversation
    def open(self, core: str, needs_identity: bool = True) -> None:
        """The customer's next request: the first one greets; the agent identifies them first if it must."""
        rng = self.rng
        if self.turns:
            text = rng.choice(CARE_REPLY["also"]).format(ask=core)
        else:
            text = " ".join(p for p in (rng.choice(CARE_REPLY["greet"]), core) if p)
        if needs_identity and not self.known:
            self.identify(text)
        else:
            self.turns.append(("user", text))

    def by_product(self, oid: str, names: list[str]) -> bool:
        """Whether the customer may name the order by its products: no order listed before it has one of them."""
        before = self.user["orders"][:self.user["orders"].index(oid)]
        return not any(i["name"] in names for o in before for i in self.orders[o]["items"])

    def ask(self, kind: str, oid: str, names: list[str], **facts) -> None:
        """Ask for `kind` about order `oid`, by id or by its products; then look the order up."""
        options = CARE_ASK[kind]
        named = [a for a in options if "{oid}" not in a]
        by_product = bool(named) and self.by_product(oid, names) and self.rng.random() < 0.4
        template = self.rng.choice(named if by_product else [a for a in options if "{oid}" in a])
        self.open(template.format(oid=oid, **facts))
        if by_product:
            self.find_by_product(oid)
        else:
            self.fetch(oid)

    def confirm(self) -> bool:
        yes = self.rng.random() < 0.92
        self.hear("yes" if yes else "no")
        return yes

    def task_status(self, oid: str) -> None:
        order = self.orders[oid]
        self.ask("status", oid, [order["items"][0]["name"]], product=order["items"][0]["name"])
        self.say_status(order)

    def say_status(self, order: dict) -> None:
        self.turns.append(("assistant", {"content": self.rng.choice(CARE_SAY["status"][order["status"]]).format(
            **self.facts(order))}, None))

    def task_cancel(self, oid: str) -> None:
        rng, order = self.rng, self.orders[oid]
        reason = rng.choice(["no longer needed", "ordered by mistake"])
        given = rng.random() < 0.5
        why = {"no longer needed": " because I no longer need it", "ordered by mistake": ", I ordered it by mistake"}
        self.ask("cancel", oid, [order["items"][0]["name"]], product=order["items"][0]["name"],
                 why=why[reason] if given else "")
        facts = self.facts(order)
        if order["status"] != "pending":
            return self.say_no_change(order, "cancel it")
        if given:
            self.say("cancel_confirm", reason=reason, **facts)
            if not self.confirm():
                return self.say("kept", **facts)
        else:
            self.say("cancel_reason", **facts)
            self.hear("reason_yes", reason=reason.capitalize())
        paid = order["payment_history"][0]
        result = dict(order, status="cancelled", cancel_reason=reason, payment_history=[
            paid, {"transaction_type": "refund", "amount": paid["amount"],
                   "payment_method_id": paid["payment_method_id"]}])
        self.call("cancel_pending_order", result, order_id=oid, reason=reason)
        self.orders[oid] = result
        gift = self.user["payment_methods"][paid["payment_method_id"]]["source"] == "gift_card"
        refund = rng.choice(CARE_SAY["refund_gift" if gift else "refund_card"]).format(
            amount=facts["total"], method=facts["method"])
        self.say("cancelled", refund=refund, **facts)

    def say_no_change(self, order: dict, what: str) -> None:
        self.turns.append(("assistant", {"content": self.rng.choice(CARE_SAY["no_change"][order["status"]]).format(
            what=what, **self.facts(order))}, None))

    def refuse_undelivered(self, order: dict, what: str, verb: str) -> bool:
        """Refuse a return or exchange of an order not delivered, or delivered over 30 days ago (the
        customer may then insist and be transferred). True when refused."""
        facts = self.facts(order)
        if order["status"] != "delivered":
            self.turns.append(("assistant", {"content": self.rng.choice(CARE_SAY["not_delivered"][order["status"]])
                                             .format(what=what, **facts)}, None))
            return True
        if not self.late(order):
            return False
        self.say("late", what=verb, **facts)
        if self.rng.random() < 0.4:
            self.hear("insist")
            self.transfer(f"Customer {self.user['user_id']} wants to {verb.replace(' it', '')} items of order "
                          f"{order['order_id']}, delivered on {order['delivered_on']}, outside the 30-day window.")
        return True

    def transfer(self, summary: str) -> None:
        self.call("transfer_to_human_agents", "Transfer successful", summary=summary)
        self.turns.append(("assistant", {"content": TRANSFER_MESSAGE}, None))
        self.ended = True

    def task_return(self, oid: str) -> None:
        rng, order = self.rng, self.orders[oid]
        items = rng.sample(order["items"], 2 if len(order["items"]) > 1 and rng.random() < 0.3 else 1)
        names = [i["name"] for i in items]
        self.ask("return", oid, names, items=" and ".join(names))
        if self.refuse_undelivered(order, "returned", "return it"):
            return
        facts = dict(self.facts(order), items=_items_text(items))
        method = order["payment_history"][0]["payment_method_id"]
        gift = next((m for m, v in self.user["payment_methods"].items() if v["source"] == "gift_card"), None)
        if gift and gift != method:
            self.say("refund_method", **facts)
            to_gift = rng.random() < 0.4
            self.hear("gift" if to_gift else "original")
            method = gift if to_gift else method
        amount = items[0]["price"]
        if len(items) > 1:
            amount = self.calculate(f"{items[0]['price']} + {items[1]['price']}", items[0]["price"] + items[1]["price"])
        facts.update(amount=_money_text(amount), method=self.method_text(method))
        self.say("return_confirm", **facts)
        if not self.confirm():
            return self.say("kept", **facts)
        ids = [i["item_id"] for i in items]
        result = dict(order, status="return requested", return_items=ids, return_payment_method_id=method)
        self.call("return_delivered_order_items", result, order_id=oid, item_ids=ids, payment_method_id=method)
        self.orders[oid] = result
        self.say("returned", **facts)

    def task_swap(self, oid: str, pending: bool) -> None:
        """An exchange of a delivered item, or a change of a pending one, for another variant."""
        rng, order = self.rng, self.orders[oid]
        item = rng.choice(order["items"])
        options, _ = PRODUCT_TYPES[item["name"]]
        key = rng.choice(list(options))
        value = rng.choice([v for v in options[key] if v != item["options"][key]])
        self.ask("modify_items" if pending else "exchange", oid, [item["name"]], product=item["name"],
                 wanted=f"{key} {value}")
        if pending and order["status"] != "pending":
            return self.say_no_change(order, "change its items")
        if not pending and self.refuse_undelivered(order, "exchanged", "exchange it"):
            return
        variants = self.product(item["product_id"])["variants"]
        want = dict(item["options"], **{key: value})
        new = next((v for v in variants.values() if v["options"] == want), None)
        if not (new and new["available"]):
            others = [v for v in variants.values() if v["available"] and v["options"][key] != item["options"][key]
                      and all(v["options"][k] == want[k] for k in want if k != key)]
            alternatives = (f"With the other options the same, it is available with {key} "
                            + ", ".join(f"{v['options'][key]} ({_money_text(v['price'])})" for v in others) + "."
                            if others else "No other variant with the same options is available.")
            self.say("unavailable", product=item["name"], wanted=f"{key} {value}", alternatives=alternatives)
            if not others or rng.random() < 0.4:
                self.hear("accept")
                return self.say("ok")
            new = rng.choice(others)
            self.hear("pick_other", wanted=f"{key} {new['options'][key]}")
        diff = self.calculate(f"{new['price']} - {item['price']}", new["price"] - item["price"])
        method = order["payment_history"][0]["payment_method_id"]
        difference = ("There is no price difference." if diff == 0 else
                      f"The price difference of {_money_text(abs(diff))} will be "
                      f"{'charged to' if diff > 0 else 'refunded to'} {self.method_text(method)}.")
        old_text, new_text = _variant_text(item["name"], item["options"]), _variant_text(item["name"], new["options"])
        self.say("swap_confirm", old=old_text, new=new_text, new_id=new["item_id"], new_price=_money_text(new["price"]),
                 old_price=_money_text(item["price"]), difference=difference,
                 action="change" if pending else "exchange")
        if not self.confirm():
            return self.say("kept", **self.facts(order))
        swapped = dict(item, item_id=new["item_id"], price=new["price"], options=new["options"])
        args = {"order_id": oid, "item_ids": [item["item_id"]], "new_item_ids": [new["item_id"]],
                "payment_method_id": method}
        if pending:
            result = dict(order, items=[swapped if i is item else i for i in order["items"]])
            self.call("modify_pending_order_items", result, **args)
            self.orders[oid] = result
            return self.say("modified", oid=oid, old_name=item["name"], new=new_text)
        result = dict(order, status="exchange requested", exchange_items=[item["item_id"]],
                      exchange_new_items=[new["item_id"]], exchange_payment_method_id=method)
        self.call("exchange_delivered_order_items", result, **args)
        self.orders[oid] = result
        self.say("exchanged", oid=oid, old_name=item["name"])

    def new_address(self) -> dict:
        address = care_address(self.rng)
        self.pii.add(address["address1"])
        return address

    def task_modify_address(self, oid: str) -> None:
        order, address = self.orders[oid], self.new_address()
        self.ask("modify_address", oid, [], address=_address_text(address))
        if order["status"] != "pending":
            return self.say_no_change(order, "change its address")
        self.say("address_confirm", oid=oid, address=_address_text(address))
        if not self.confirm():
            return self.say("kept", **self.facts(order))
        result = dict(order, address=address)
        self.call("modify_pending_order_address", result, order_id=oid, **address)
        self.orders[oid] = result
        self.say("address_done", oid=oid, address=_address_text(address))

    def task_user_address(self) -> None:
        address = self.new_address()
        self.open(self.rng.choice(CARE_ASK["user_address"]).format(address=_address_text(address)))
        self.say("user_address_confirm", address=_address_text(address))
        if not self.confirm():
            return self.say("ok")
        self.user = dict(self.user, address=address)
        self.call("modify_user_address", self.user, user_id=self.user["user_id"], **address)
        self.say("user_address_done", address=_address_text(address))

    def task_product_info(self) -> None:
        rng = self.rng
        pid = rng.choice(list(self.products))
        name = self.products[pid]["name"]
        key = rng.choice(list(PRODUCT_TYPES[name][0]))
        value = rng.choice(PRODUCT_TYPES[name][0][key])
        self.open(rng.choice(CARE_ASK["product_info"]).format(product=name, wanted=f"{key} {value}"), False)
        if not self.types_listed:
            self.call("list_all_product_types", {p["name"]: p["product_id"] for p in self.products.values()})
            self.types_listed = True
        found = [v for v in self.product(pid)["variants"].values() if v["available"] and v["options"][key] == value]
        if not found:
            return self.say("no_product", product=name, wanted=f"{key} {value}")
        lines = "\n".join(f"- {', '.join(f'{k} {v}' for k, v in f['options'].items())}: {_money_text(f['price'])}"
                          for f in found[:5])
        self.say("product", product=name, wanted=f"{key} {value}", variants=lines)

    def task_compensation(self, oid: str) -> None:
        order = self.orders[oid]
        self.ask("compensation", oid, [])
        ok = order["status"] == "delivered" and not self.late(order)
        option = self.rng.choice(CARE_SAY["comp_option_ok" if ok else "comp_option_none"])
        self.say("compensation", oid=oid, option=option)
        if self.rng.random() < 0.6:
            self.hear("insist")
            self.transfer(f"Customer {self.user['user_id']} asks for compensation for order {oid}; I explained "
                          "that I cannot offer any.")
        else:
            self.hear("accept")
            self.say("ok")

    def task_human(self, oid: str) -> None:
        ask = self.rng.choice(CARE_ASK["human"])
        self.open(ask.format(oid=oid), False)
        who = f"Customer {self.user['user_id']}" if self.known else "An unidentified customer"
        self.transfer(f"{who} asks for a human agent" + (f" about order {oid}." if "{oid}" in ask else "."))

    def run(self, kinds: list[str]) -> list[tuple]:
        plan = [(kind, self.target(WANTS[kind]) if kind in WANTS else None) for kind in kinds]
        for kind, oid in plan:
            if kind == "status":
                self.task_status(oid)
            elif kind == "cancel":
                self.task_cancel(oid)
            elif kind == "return":
                self.task_return(oid)
            elif kind in ("exchange", "modify_items"):
                self.task_swap(oid, kind == "modify_items")
            elif kind == "modify_address":
                self.task_modify_address(oid)
            elif kind == "user_address":
                self.task_user_address()
            elif kind == "product_info":
                self.task_product_info()
            elif kind == "compensation":
                self.task_compensation(oid)
            elif kind == "human":
                self.task_human(oid)
            else:  # other_person, off_topic: no look-up, a refusal from the policy
                self.open(self.rng.choice(CARE_ASK[kind]).format(oid="#W" + _digits(self.rng, 7)), False)
                self.say(kind)
            if self.ended:
                return self.turns
        self.hear("thanks")
        first = self.user["name"]["first_name"] if self.known else None
        self.turns.append(("assistant", {"content": self.rng.choice(
            CARE_SAY["closing"] if first else CARE_SAY["closing"][-1:]).format(first=first)}, None))
        return self.turns

    def target(self, status: str | None) -> str:
        """An order for a task, not one of another task: mostly one of the status the task needs (added
        to the customer's orders when they have none), else any, so that some requests meet a refusal."""
        rng = self.rng
        free = [o for o in self.user["orders"] if o not in self.planned]
        fitting = [o for o in free if status is None or self.orders[o]["status"] == status]
        pool = fitting if rng.random() < 0.8 else free
        if not pool:
            oid = "#W" + _digits(rng, 7)
            self.orders[oid] = care_order(rng, self.products, oid, self.user["user_id"], self.user["address"],
                                          status or "delivered", rng.choice(list(self.user["payment_methods"])))
            self.user["orders"].append(oid)
            pool = [oid]
        oid = rng.choice(pool)
        self.planned.add(oid)
        return oid


def care_conversation(rng: Random, products: dict) -> list[dict]:
    """The logged calls of one acme-care conversation: 1-3 requests (a transfer ends it early) in 4-20
    assistant turns (a shorter or longer draw is drawn again), each logged call the conversation so far."""
    while True:
        kinds = rng.choices(list(CARE_TASKS), weights=list(CARE_TASKS.values()),
                            k=rng.choice([1] * 9 + [2] * 8 + [3] * 3))
        dialogue = Dialogue(rng, products)
        turns = dialogue.run(kinds)
        if 4 <= sum(role == "assistant" for role, *_ in turns) <= 20:
            break
    session, t, messages, calls = "care-" + hexid(rng, 64), rng.uniform(0, 80000), [], []
    for role, *rest in turns:
        if role == "user":
            messages.append({"role": "user", "content": rest[0]})
            t += rng.uniform(10, 90)
            continue
        output, result = rest
        calls.append({"id": "call-" + hexid(rng), "day": CARE_DAY, "t": t, "session": session, "step": None,
                      "messages": list(messages), "output": output, "pii": dialogue.pii})
        if result is None:
            messages.append({"role": "assistant", "content": output["content"]})
        else:
            (tool_call,) = output["tool_calls"]
            call_id = "call_" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(24))
            calls[-1]["call_ids"] = [call_id]
            messages += [{"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": tool_call["name"], "arguments": json.dumps(tool_call["arguments"])}}]},
                         {"role": "tool", "tool_call_id": call_id, "name": tool_call["name"], "content": result}]
        t += rng.uniform(1, 6)
    return calls


def _bump(text: str) -> str:
    """`text` with its last digit changed: an id, a number or an address copied wrong."""
    i = max(i for i, ch in enumerate(text) if ch.isdigit())
    return text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:]


def care_wrong(rng: Random, output: dict) -> dict:
    """A teacher mistake: a policy-breaking reply (a credit, an action not taken, a made-up date), or
    a call with one id or value copied wrong (a reply that stalls where nothing can be miscopied)."""
    if "content" in output:
        return {"content": rng.choice(CARE_OFF_POLICY)}
    (call,) = output["tool_calls"]
    args = dict(call["arguments"])
    keys = [k for k, v in args.items() if k == "reason" or any(ch.isdigit() for ch in json.dumps(v))]
    if not keys:
        return {"content": "Let me check that for you."}
    key = rng.choice(keys)
    if key == "reason":
        args[key] = "ordered by mistake" if args[key] == "no longer needed" else "no longer needed"
    elif isinstance(args[key], list):
        args[key] = [_bump(args[key][0]), *args[key][1:]]
    else:
        args[key] = _bump(args[key])
    return {"tool_calls": [{"name": call["name"], "arguments": args}]}


def generate_care(seed: int) -> tuple[dict[str, bytes], dict]:
    """The long-policy fixture: acme-care's proxy log (one file, a session per conversation, no step)
    and its truth."""
    rng = Random(f"{seed}-care")
    products = care_products(rng)
    conversations = [care_conversation(rng, products) for _ in range(CARE_DIALOGUES)]
    calls = [c for conv in conversations for c in conv]
    wrong = set(rng.sample(range(len(calls)), round(len(calls) * CARE_WRONG)))
    rows, truth = [], []
    for i, call in enumerate(calls):
        sent = json.dumps(call["messages"], ensure_ascii=False)
        pii = call["pii"]
        leaked = [v for v in pii if v in json.dumps(call["output"], ensure_ascii=False) and v not in sent]
        assert not leaked, f"PII in an output that its input lacks: {leaked[:3]}"
        logged = care_wrong(rng, call["output"]) if i in wrong else call["output"]
        messages = [{"role": "system", "content": CARE_POLICY}, *call["messages"]]
        request = {"model": CARE_MODEL, "messages": messages, "tools": CARE_TOOLS, "temperature": 0}
        prompt = (len(json.dumps(messages)) + len(json.dumps(CARE_TOOLS))) // 4
        rows.append((call["t"], line(proxy_entry(rng, call, CARE_AGENT, request, logged, None, prompt))))
        truth.append({"id": call["id"], "task": "respond", "output": call["output"], "teacher_correct": i not in wrong,
                      "planted": (["teacher_wrong"] if i in wrong else []) + (["pii"] if any(v in sent for v in pii)
                                                                              else [])})
    rows.sort(key=lambda r: r[0])
    turns = sorted(len(conv) for conv in conversations)
    counts = {"agent": CARE_AGENT, "conversations": len(conversations), "calls": len(calls),
              "tool_calls": sum("tool_calls" in c["output"] for c in calls), "teacher_wrong": len(wrong),
              "pii": sum("pii" in t["planted"] for t in truth), "policy_words": len(CARE_POLICY.split()),
              "turns_min": turns[0], "turns_median": turns[len(turns) // 2], "turns_max": turns[-1],
              "tools": {n: sum(c["output"].get("tool_calls", [{}])[0].get("name") == n for c in calls)
                        for n in sorted(t["function"]["name"] for t in CARE_TOOLS)}}
    files = {"logs/care-agent.jsonl": b"".join(raw for _, raw in rows), "truth.jsonl": b"".join(map(line, truth))}
    return files, counts


FIXTURES = {"per-call-tools": generate_fn, "long-policy": generate_care}


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
    ap.add_argument("--out", type=Path, help="default: this folder (required with --fixture)")
    ap.add_argument("--fixture", choices=sorted(FIXTURES), help="write only this fixture's log and truth (no README)")
    args = ap.parse_args()
    if args.fixture and args.out is None:
        ap.error("--fixture needs --out DIR (the tracked samples live in this folder)")
    if args.fixture:
        files, counts = FIXTURES[args.fixture](args.seed)
    else:
        files, counts = generate(args.seed, args.sessions)
    args.out = args.out or Path(__file__).resolve().parent
    for rel, data in files.items():
        write_atomic(args.out / rel, data)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
