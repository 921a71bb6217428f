"""Evaluation generation speed: batched, length-grouped greedy decoding vs one prompt at a time.

Both run on the real SmolLM2-135M base over the same sample prompts (classification
and tool-call prompts of the shipped sample logs) in the same process. The figure is
generated tokens per second, counting each answer's tokens up to its end token.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from factory.base_model import ensure_checkpoint
from factory.evaluate.generate import generate
from factory.recipe import load_recipe
from factory.chat import render_prompt
from factory.models import load_tokenizer

SAMPLES = Path(__file__).resolve().parents[1] / "datasets" / "samples" / "logs" / "support-agent-2026-11-03.jsonl"
N_PROMPTS = 64
MAX_NEW_TOKENS = 32


def _prompts(tokenizer) -> list[str]:
    prompts = []
    for line in SAMPLES.read_text(errors="replace").splitlines():
        try:
            call = json.loads(line)
            prompts.append(render_prompt(tokenizer, call["request"]["messages"], call["request"].get("tools") or []))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
        if len(prompts) == N_PROMPTS:
            break
    return prompts


def _tokens_per_s(model, tokenizer, prompts: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    generations = generate(model, tokenizer, prompts, MAX_NEW_TOKENS, batch_size=batch_size)
    return sum(g.new_tokens for g in generations) / (time.perf_counter() - start)


def run() -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    path = str(ensure_checkpoint())
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(tokenizer)
    _tokens_per_s(model, tokenizer, prompts[:4], 4)  # warm-up
    baseline = _tokens_per_s(model, tokenizer, prompts[:12], 1)
    batch_size = load_recipe(None, None, [], Path(__file__).resolve().parents[1] / "recipes")[0].eval_batch_size
    batched = _tokens_per_s(model, tokenizer, prompts, batch_size)  # the default recipe's batch
    return {"eval_tokens_per_s": batched, "eval_baseline_tokens_per_s": baseline,
            "eval_speedup": batched / baseline}
