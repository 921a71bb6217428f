"""Batched greedy generation: a shared prompt prefix runs once and changes no answer, nor do other rows' grammars."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from bench.constrained import tool_requests
from factory import chat, constrain
from factory.evaluate import generate as generation
from factory.models import load_tokenizer

POLICY = "You are Acme's desk assistant. " + "Follow the refund policy and answer in one sentence. " * 12


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    return model, load_tokenizer(str(tiny_model_dir))


def _prompts(tokenizer, n: int) -> list[str]:
    return [chat.render_prompt(tokenizer, [{"role": "system", "content": POLICY},
                                           {"role": "user", "content": f"Where is order A{i}?" + " Thanks." * (i % 4)}],
                               []) for i in range(n)]


def test_a_shared_prefix_runs_once_and_answers_match_one_prompt_at_a_time(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(tokenizer, 6)
    runs = []
    base = type(model.get_base_model())
    forward = base.forward

    def counting(self, *args, **kwargs):
        runs.append(tuple(kwargs["input_ids"].shape))
        return forward(self, *args, **kwargs)

    alone = [generation.generate(model, tokenizer, [p], 12)[0] for p in prompts]
    monkeypatch.setattr(base, "forward", counting)
    batched = generation.generate(model, tokenizer, prompts, 12, batch_size=6)
    assert [b.text for b in batched] == [a.text for a in alone]
    assert [b.confidence for b in batched] == pytest.approx([a.confidence for a in alone], abs=1e-4)
    shortest = min(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    assert runs[0][0] == 1 and runs[0][1] >= generation.MIN_SHARED_PREFIX  # the prefix, once
    assert runs[1][0] == 6 and runs[1][1] < shortest - generation.MIN_SHARED_PREFIX  # then each row's rest only
    assert [shape for shape in runs if shape[0] == 1] == [runs[0]]


def test_prompts_without_a_long_shared_prefix_are_left_padded(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batch = generation._batch(model, [[1, 2, 3], [4, 5]], pad=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 4, 5]] and "cache" not in batch


def test_batches_hold_at_most_the_row_and_token_caps(monkeypatch):
    monkeypatch.setattr(generation, "MAX_BATCH_TOKENS", 100)
    ids = [[0] * n for n in (10, 10, 10, 30, 30, 60, 90)]
    assert generation._batches(list(range(7)), ids, rows=2) == [[0, 1], [2, 3], [4], [5], [6]]
    assert generation._batches(list(range(7)), ids, rows=8) == [[0, 1, 2], [3, 4], [5], [6]]


def test_rows_of_different_grammars_batch_as_alone_and_unconstrained_rows_are_untouched(model_and_tokenizer):
    """Per-prompt constraints in one batch (with the shared-prefix path): each row decodes as it does alone
    under its own grammar, and a row without one as it does with no grammar in the batch at all."""
    model, tokenizer = model_and_tokenizer
    requests = tool_requests(4)
    prompts = [chat.render_prompt(tokenizer, r["messages"], r["tools"]) for r in requests]
    constraints = [constrain.for_task("tool_call", {}, r["tools"]) for r in requests[:3]] + [None]
    batched = generation.generate(model, tokenizer, prompts, 16, batch_size=4, constraints=constraints)
    alone = [generation.generate(model, tokenizer, [p], 16, constraints=[c])[0] for p, c in zip(prompts, constraints)]
    free = generation.generate(model, tokenizer, prompts[3:], 16)[0]
    assert [b.text for b in batched] == [a.text for a in alone]
    assert [b.confidence for b in batched] == pytest.approx([a.confidence for a in alone], abs=1e-4)
    assert all(b.text.startswith("<tool_call>\n{\"name\": ") for b in batched[:3])
    assert (batched[3].text, batched[3].confidence) == (free.text, pytest.approx(free.confidence, abs=1e-4))
    with pytest.raises(ValueError, match="1 constraints for 4 prompts"):
        generation.generate(model, tokenizer, prompts, 16, constraints=constraints[:1])
