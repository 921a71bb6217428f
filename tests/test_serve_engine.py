"""The batching engine: concurrent requests of several tasks decoded together give the answers the
unbatched path gives, the queue is bounded, deadlines hold, and over HTTP concurrent clients get
their own answers."""

from __future__ import annotations

import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.constrained import tool_requests, valid_calls
from factory import chat, constrain
from factory.evaluate.generate import generate
from factory.serve.app import ServeConfig, create_app, running
from factory.serve.engine import MIN_SHARED_PREFIX, BackendError, Engine, PrefixCache, supports
from factory.serve.router import Router, load_routes, request_template

SAMPLES = Path(__file__).parents[1] / "datasets" / "samples" / "logs"
STEPS = ("classify_intent", "draft_reply", "extract_ticket")


def sample_requests(per_step: int) -> list[tuple[str, list[dict]]]:
    """(step, messages) of the first `per_step` well-formed calls of each of three support-agent steps."""
    found: dict[str, list] = {step: [] for step in STEPS}
    for path in sorted(SAMPLES.glob("support-agent-*.jsonl")):
        for line in path.read_bytes().splitlines():
            try:
                call = json.loads(line)
                step, messages = call["metadata"]["step"], call["request"]["messages"]
            except (ValueError, KeyError, TypeError):
                continue
            if step in found and len(found[step]) < per_step and isinstance(messages, list):
                found[step].append(messages)
    return [(step, messages) for step in STEPS for messages in found[step]]


def peft_model(base_dir: Path, tasks: tuple[str, ...], scale: float, **lora_options):
    """A PeftModel on `base_dir` with one LoRA adapter per task, B matrices drawn at `scale` so each
    adapter changes the output differently."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM", **lora_options)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora, adapter_name=tasks[0])
    for task in tasks[1:]:
        model.add_adapter(task, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, scale)
    return model.eval()


def check_against_unbatched(model, tokenizer, requests: list[tuple[str, list[dict]]], budgets: list[int],
                            max_batch: int, tools: list[list[dict]] | None = None,
                            constraints: list | None = None) -> tuple[Engine, list]:
    """Submit every request at once (with `tools` and `constraints`, one per request, where given) and compare
    each answer with `generate` alone on its adapter; (the engine, its answers)."""
    tools = tools or [[] for _ in requests]
    constraints = constraints or [None for _ in requests]
    prompts = [chat.render_prompt(tokenizer, messages, t) for (_, messages), t in zip(requests, tools)]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    engine = Engine(model, tokenizer, max_batch=max_batch, timeout=600)
    try:
        futures = [engine.submit(task, i, b, c) for (task, _), i, b, c in zip(requests, ids, budgets, constraints)]
        batched = [f.result() for f in futures]
    finally:
        engine.close()
    for (task, _), prompt, budget, got, c in zip(requests, prompts, budgets, batched, constraints):
        model.set_adapter(task)
        alone = generate(model, tokenizer, [prompt], budget, batch_size=1, constraints=[c])[0]
        assert (got.text, got.new_tokens) == (alone.text, alone.new_tokens), task
        assert got.confidence == pytest.approx(alone.confidence, rel=1e-3)
        assert got.min_prob == pytest.approx(alone.min_prob, rel=1e-2, abs=1e-6)
    return engine, batched


@pytest.mark.parametrize("max_batch, lora_options", [
    (5, {}),  # rows retire at different steps; waiting prompts join in the running rows' passes
    (16, {}),  # 9 to 15 running rows are padded to 16
    (16, {"lora_dropout": 0.1, "layers_to_transform": [0]}),  # fewer layers adapted
    (16, {"use_rslora": True, "alpha_pattern": {"v_proj": 16}}),  # scalings differ between layers
], ids=["stacked", "padded", "some-layers", "scalings"])
def test_mixed_tasks_in_one_batch_answer_as_alone(tiny_model_dir, max_batch, lora_options):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = peft_model(tiny_model_dir, STEPS, scale=0.5, **lora_options)
    requests = sample_requests(per_step=4)
    # rows retire at different steps while others join; the longest outgrow the cache's spare columns
    budgets = [3 + (29 * i) % 97 for i in range(len(requests))]
    engine, _ = check_against_unbatched(model, tokenizer, requests, budgets, max_batch=max_batch)
    assert engine._lora is not None  # the stacked adapters answered, not PEFT's per-adapter split
    # each task's prompts share their system prompt: its cache was learnt and is reused
    for step, messages in requests[::4]:
        prompt = chat.render_prompt(tokenizer, messages, [])
        shared, kv = engine.prefixes.lookup(step, tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert shared >= MIN_SHARED_PREFIX and kv[0][0].shape[2] == shared


@pytest.mark.e2e
def test_sample_prompts_answer_as_unbatched_on_smollm2(smollm2_dir):
    """The acceptance check: on the real base, the sample prompts of three tasks submitted together."""
    from factory.models import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    model = peft_model(smollm2_dir, STEPS, scale=0.02)
    requests = sample_requests(per_step=3)
    check_against_unbatched(model, tokenizer, requests, [24] * len(requests), max_batch=16)


def test_rows_of_different_grammars_in_one_batch_answer_as_alone_and_in_shape(tiny_model_dir):
    """Tool calls to different per-request tool lists, a JSON extraction and an unconstrained row, of two
    tasks, decoded together: each answer is the one `generate` gives under the same grammar."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = peft_model(tiny_model_dir, ("call_tool", "extract"), scale=0.5)
    calls = tool_requests(5)
    ticket = {"json_schema": {"type": "object", "properties": {"urgent": {"type": "boolean"},
                                                               "amount": {"type": ["integer", "null"]}},
                              "required": ["urgent"]}}
    extraction = [{"role": "user", "content": "Order A-17 is late, refund 20 EUR."}]
    requests = [("call_tool", r["messages"]) for r in calls] + [("extract", extraction)] * 2
    tools = [r["tools"] for r in calls] + [[], []]
    constraints = [constrain.for_task("tool_call", {}, t) for t in tools[:5]] + \
        [constrain.for_task("json_extraction", ticket, []), None]
    _, answers = check_against_unbatched(model, tokenizer, requests, [48] * 7, max_batch=4, tools=tools,
                                         constraints=constraints)
    for answer, offered in zip(answers[:5], tools):  # complete, or cut by the budget inside an offered call
        names = [t["function"]["name"] for t in offered]
        assert valid_calls(answer.text, offered) if answer.new_tokens < 48 else \
            any(answer.text.startswith(f'<tool_call>\n{{"name": "{n}", "arguments": {{') for n in names)
    assert set(json.loads(answers[5].text)) <= {"urgent", "amount"} and "urgent" in json.loads(answers[5].text)


def test_adapters_the_engine_cannot_stack_are_served_one_at_a_time(tiny_model_dir):
    """DoRA adapters (PEFT cannot mix them in one batch) and LoRA biases are not stacked: such a base is
    not given to the engine (the server answers its requests one by one)."""
    assert supports(peft_model(tiny_model_dir, STEPS[:1], scale=0.5))
    assert not supports(peft_model(tiny_model_dir, STEPS[:1], scale=0.5, use_dora=True))
    assert not supports(peft_model(tiny_model_dir, STEPS[:1], scale=0.5, bias="lora_only"))


def test_prefix_cache_keeps_the_shared_part():
    import torch

    cache = PrefixCache()
    first, second = list(range(100)), list(range(60)) + [7] * 40
    kv = [(torch.randn(1, 2, 100, 4), torch.randn(1, 2, 100, 4))]
    assert cache.lookup("t", first) == (0, None)
    cache.learn("t", first, kv)
    shared, found = cache.lookup("t", second)
    assert shared == 60 and torch.equal(found[0][0], kv[0][0][:, :, :60])
    cache.learn("t", second, [(torch.randn(1, 2, 100, 4),) * 2])
    assert cache.lookup("t", first)[0] == 60  # trimmed to what the two prompts share
    assert cache.lookup("t", first[:10] + [5] * 90) == (0, None)  # under MIN_SHARED_PREFIX: no reuse
    assert cache.lookup("other", first) == (0, None)
    assert cache.lookup("t", first[:60])[0] == 59  # one token is always left to prefill


def test_full_queue_and_deadline_fail_with_their_reason(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = peft_model(tiny_model_dir, ("intent",), scale=0.5)
    ids = tokenizer("a question", add_special_tokens=False)["input_ids"]
    engine = Engine(model, tokenizer, max_batch=1, max_queue=0)
    with pytest.raises(BackendError, match="queue holds 0") as err:
        engine.submit("intent", ids, 4)
    assert err.value.reason == "overloaded"
    engine.close()

    engine = Engine(model, tokenizer, timeout=0.0)
    with pytest.raises(BackendError, match="no answer within") as err:
        engine.submit("intent", ids, 4).result(timeout=60)
    assert err.value.reason == "backend_timeout"
    engine.close()
    with pytest.raises(BackendError, match="stopped"):
        engine.submit("intent", ids, 4)

    # a small queue under a burst: some requests are refused at once, every accepted one is answered
    engine = Engine(model, tokenizer, max_batch=2, max_queue=3, timeout=600)
    accepted, refused = [], 0
    for _ in range(40):
        try:
            accepted.append(engine.submit("intent", ids, 64))
        except BackendError as refusal:
            assert refusal.reason == "overloaded"
            refused += 1
    assert refused and all(f.result(timeout=120).new_tokens == 64 for f in accepted)
    engine.close()


def test_concurrent_clients_over_http_get_their_own_answers(tiny_model_dir, tmp_path):
    from factory.serve.specialists import Specialists

    tasks = {"reply": "You draft a short reply to the customer.",
             "summary": "You summarise the support ticket in one line."}
    model = peft_model(tiny_model_dir, tuple(tasks), scale=0.5)
    routes = {}
    for task, system in tasks.items():
        folder = tmp_path / task
        model.save_pretrained(folder, selected_adapters=[task])  # into folder/<task>: not the default name
        adapter = folder / task
        template = request_template([{"role": "system", "content": system}, {"role": "user", "content": "x"}])
        routes[task] = {"task": task, "kind": "free_text", "threshold": 0.0, "coverage": 1.0,
                        "signature": {"agent": "acme", "step": task, "template": template, "tools": []},
                        "output_schema": {}, "base_model": str(tiny_model_dir), "adapter_uri": str(adapter),
                        "max_new_tokens": 6, "dataset_version": "v1"}
    (tmp_path / "routes.json").write_text(json.dumps({"tasks": routes}))
    specialists = Specialists(load_routes(tmp_path / "routes.json"), max_batch=8)
    asked = [(task, [{"role": "system", "content": system}, {"role": "user", "content": f"ticket {i}: it is late"}])
             for i in range(12) for task, system in tasks.items()]
    expected = [specialists.answer(task, messages, []).output["content"] for task, messages in asked]
    bodies = [{"model": "gpt-4o", "messages": messages} for _, messages in asked]
    app = create_app(Router(specialists.routes), specialists, ServeConfig(log_dir=tmp_path / "logs"))
    barrier = threading.Barrier(len(bodies))
    with running(app) as url, httpx.Client(timeout=120) as client:
        def post(body):
            barrier.wait()
            return client.post(f"{url}/v1/chat/completions", json=body)

        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(post, bodies))
    specialists.close()
    assert [r.headers["x-factory-route"] for r in responses] == ["specialist"] * len(bodies)
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == expected


def test_single_threaded_runs_torch_on_one_thread_and_restores_the_count():
    """The router's embeddings in a serving process run torch on one thread (see `single_threaded`)."""
    import torch

    from factory.serve.engine import single_threaded

    threads = torch.get_num_threads()
    assert single_threaded(torch.get_num_threads)() == 1
    assert torch.get_num_threads() == threads


def test_a_route_constrains_its_answers_by_kind_schema_and_the_requests_tools():
    from factory.serve.router import Route
    from factory.serve.specialists import route_constraint

    offered = tool_requests(1)[0]["tools"]
    route = Route(task="call", kind="tool_call", threshold=0.5, template="", tools=(), output_schema={"tools": []},
                  base_model="", adapter_uri="", max_new_tokens=8, dataset_version="v1")
    assert route_constraint(route, offered) is constrain.for_task("tool_call", {}, offered)
    assert route_constraint(dataclasses.replace(route, kind="free_text"), offered) is None
    assert route_constraint(dataclasses.replace(route, extra={"constrained_decoding": False}), offered) is None
