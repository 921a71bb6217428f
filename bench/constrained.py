"""Constrained decoding: what the grammar mask costs in generation speed, and what it buys.

The real base (SmolLM2-135M-Instruct, no adapter) answers N_PROMPTS tool-calling requests of the
sample desk-agent logs, each offering its own 2 to 6 tools, in batches of BATCH as evaluation
generates (`evaluate.generate`), constrained to each request's tool calls
(`constrain.for_task("tool_call", ...)`) and unconstrained, in the same run. Both decode the same
number of steps per batch (the unconstrained run gets the constrained one's step count as its budget),
so prefill and padding weigh alike, and each batch runs constrained, unconstrained, unconstrained,
constrained, so a load that drifts during the run weighs on both alike.

constrained_tps, unconstrained_tps  rows x decoding steps per second (finished rows still run)
constrained_decoding_overhead       1 - constrained_tps / unconstrained_tps (target <= 0.15)
constrained_mask_share              the grammar's own work (matcher build, a mask per row and step, its
                                    application) replayed alone, as a share of the constrained time: the
                                    overhead without the noise of a shared machine
constrained_grammar_ms              mean time to build one request's constraint and matcher, uncached
constrained_valid_calls             share of constrained answers that parse into calls of offered tools
                                    with schema-valid arguments (`jsonschema`, closed objects)
unconstrained_valid_calls           the same for the unconstrained answers (zero-shot base)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema

LOGS = Path(__file__).resolve().parents[1] / "datasets" / "samples" / "logs"
N_PROMPTS = 32
BATCH = 16
BUDGET = 64  # tokens: a call to one of the sample tools takes 20 to 45


def tool_requests(n: int, fewest: int = 2, most: int = 6) -> list[dict]:
    """The first `n` well-formed desk-agent calls whose request offers `fewest` to `most` tools and whose
    answer calls one: {"messages", "tools", "output"} (output as `chat.render_output` takes it)."""
    found = []
    for path in sorted(LOGS.glob("desk-agent-*.jsonl")):
        for line in path.read_bytes().splitlines():  # the samples hold planted bad lines
            try:
                call = json.loads(line)
                request, message = call["request"], call["response"]["choices"][0]["message"]
                tools, calls = request["tools"], message["tool_calls"]
            except (ValueError, KeyError, TypeError, IndexError):
                continue
            if isinstance(tools, list) and fewest <= len(tools) <= most and calls:
                found.append({"messages": request["messages"], "tools": tools, "output": {"tool_calls": calls}})
            if len(found) == n:
                return found
    return found


def valid_calls(text: str, tools: list[dict]) -> bool:
    """Whether `text` parses into one or more calls of `tools`, each with arguments valid against its tool's
    parameters closed to the properties they list."""
    from factory import chat, constrain

    calls = chat.parse_output(text)["tool_calls"]
    schemas = {t["function"]["name"]: constrain.strict_schema(t["function"].get("parameters")) for t in tools}
    return bool(calls) and all(c["name"] in schemas and jsonschema.Draft202012Validator(schemas[c["name"]])
                               .is_valid(c["arguments"]) for c in calls)


def _replay(tokenizer, constraints: list, texts: list[str], steps: int, vocab: int) -> float:
    """Seconds the grammar work of one constrained batch takes alone: a matcher per row, then per step a
    mask of every row applied to its scores and the row's token fed to its matcher (`texts` tokenized
    again, then the end-of-sequence token until `steps`)."""
    import torch

    from factory import constrain

    eos = tokenizer.eos_token_id
    rows = [(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] * steps)[:steps] for t in texts]
    scores = torch.zeros(len(rows), vocab)
    start = time.perf_counter()
    matchers = [c.matcher(tokenizer, vocab) for c in constraints]
    for step in range(steps):
        constrain.mask_logits(scores, matchers)
        for matcher, row in zip(matchers, rows):
            constrain.advance(matcher, row[step])
    return time.perf_counter() - start


def run() -> dict[str, float]:
    from factory import chat, constrain
    from factory.base_model import resolve_base
    from factory.evaluate.generate import generate
    from factory.models import load_resident, load_tokenizer

    base = resolve_base("embedded:smollm2-135m-instruct")
    tokenizer, model = load_tokenizer(base), load_resident(base).eval()
    requests = tool_requests(N_PROMPTS)
    prompts = [chat.render_prompt(tokenizer, r["messages"], r["tools"]) for r in requests]
    vocab = model.config.vocab_size

    generate(model, tokenizer, prompts[:2], 4, batch_size=2)  # warm-up
    seconds, row_steps, replayed = {True: 0.0, False: 0.0}, {True: 0, False: 0}, 0.0
    texts: dict[bool, list[str]] = {True: [], False: []}
    for first in range(0, len(prompts), BATCH):
        batch, tools = prompts[first:first + BATCH], [r["tools"] for r in requests[first:first + BATCH]]
        constraints = [constrain.for_task("tool_call", {}, t) for t in tools]  # built in the first timed run
        budget, answers = BUDGET, {}
        for constrained in (True, False, False, True):
            start = time.perf_counter()
            out = generate(model, tokenizer, batch, budget, batch_size=BATCH,
                           constraints=constraints if constrained else None)
            seconds[constrained] += time.perf_counter() - start
            budget = max(g.new_tokens for g in out) if constrained else budget
            row_steps[constrained] += len(batch) * max(g.new_tokens for g in out)
            answers[constrained] = [g.text for g in out]
        replayed += 2 * _replay(tokenizer, constraints, answers[True], budget, vocab)
        for constrained, got in answers.items():
            texts[constrained] += got

    constrain._constraint.cache_clear()  # the grammar build alone, uncached
    constrain._compiled.cache_clear()
    start = time.perf_counter()
    for r in requests:
        constrain.for_task("tool_call", {}, r["tools"]).matcher(tokenizer, vocab)
    grammar_ms = 1000 * (time.perf_counter() - start) / len(requests)

    tps = {c: row_steps[c] / seconds[c] for c in seconds}
    valid = {c: sum(valid_calls(t, r["tools"]) for t, r in zip(texts[c], requests)) / len(requests) for c in texts}
    return {"constrained_decoding_overhead": round(1 - tps[True] / tps[False], 4),
            "constrained_tps": round(tps[True], 1), "unconstrained_tps": round(tps[False], 1),
            "constrained_mask_share": round(replayed / seconds[True], 4),
            "constrained_grammar_ms": round(grammar_ms, 2),
            "constrained_valid_calls": round(valid[True], 4), "unconstrained_valid_calls": round(valid[False], 4)}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
