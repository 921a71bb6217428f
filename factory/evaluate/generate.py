"""Batched greedy generation with a confidence per answer.

Prompts are sorted by length and generated in batches (left padding, KV cache), so
a batch wastes little compute on padding. Confidence is the geometric mean of the
chosen tokens' probabilities (exp of the mean log-probability), and the minimum
token probability is reported beside it; the mean is what calibration uses,
because one uncertain token in a long answer is common and often harmless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Generation:
    text: str
    confidence: float
    min_prob: float
    new_tokens: int


@torch.inference_mode()
def generate(model, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
             batch_size: int = 16) -> list[Generation]:
    """Greedy completions for `prompts`, in input order."""
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    eos = tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id, output_logits=True,
                             return_dict_in_generate=True)
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        for row, i in enumerate(idx):
            tokens = new[row].tolist()
            length = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            lp = logprobs[row, :length]
            results[i] = Generation(
                text=tokenizer.decode(tokens[:length], skip_special_tokens=True),
                confidence=math.exp(lp.mean().item()) if length else 0.0,
                min_prob=math.exp(lp.min().item()) if length else 0.0,
                new_tokens=length,
            )
    return results
