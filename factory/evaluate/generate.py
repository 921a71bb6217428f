"""Batched greedy generation with a confidence per answer.

Prompts are sorted by token length and generated in batches of at most `batch_size` rows
and `MAX_BATCH_TOKENS` rows x longest prompt (left padding, KV cache), so a batch wastes
little compute on padding and long prompts do not outgrow the caches. Confidence is the geometric mean of the
chosen tokens' probabilities (exp of the mean log-probability), and the minimum
token probability is reported beside it; the mean is what calibration uses,
because one uncertain token in a long answer is common and often harmless.

Shared prompt prefix: the prompts of one task start with the same system prompt (and tool
list), often most of the prompt for an agent with a long policy. When a batch's prompts
share at least `MIN_SHARED_PREFIX` tokens, the prefix runs once and its KV cache is
repeated for every row; each row's rest follows it with its padding in between (masked,
and position ids follow the attention mask, so every token keeps its position). Trade-off:
the prefix's cache is held once per row during decoding as before; only its compute is
saved, which is what dominates on a CPU.

Constrained answers (`constraints`, one `constrain.Constraint` or None per prompt, rows of different
grammars in one batch): before the argmax, each row's grammar masks the tokens that cannot continue
a valid answer, and the recorded log-probabilities are taken under that mask (renormalised over the
allowed tokens), the confidence of the answer the constrained model gives.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from factory.constrain import Constraint, advance, mask_logits

MIN_SHARED_PREFIX = 32  # tokens; below this, running the prefix apart saves less than it costs
# rows x longest prompt per batch: prompts of ~1k tokens (API-Bank dialogues) took ~3x longer each
# in batches of 64 than of 16 on 2 cores (prefill attention and the KV cache outgrow the caches);
# short prompts still batch 64
MAX_BATCH_TOKENS = 16_384


def confidence(logprobs: list[float]) -> float:
    """The geometric mean of the chosen tokens' probabilities (exp of the mean log-probability); 0 for no tokens."""
    return math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0


@dataclass(frozen=True)
class Generation:
    text: str
    confidence: float
    min_prob: float
    new_tokens: int

    @classmethod
    def of(cls, text: str, logprobs: list[float]) -> Generation:
        """An answer from its text and its chosen tokens' log-probabilities (the end-of-sequence token's included)."""
        return cls(text, confidence(logprobs), math.exp(min(logprobs)) if logprobs else 0.0, len(logprobs))


class _ChosenLogprobs(LogitsProcessor):
    """Records, per step, the log-probability of the token greedy decoding picks (the
    maximum), instead of keeping every step's logits (batch x vocabulary x steps floats)."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.steps.append(scores.float().log_softmax(-1).max(-1).values)
        return scores


class _Grammar(LogitsProcessor):
    """Masks each row's scores by its grammar (`constrain.mask_logits`), after feeding each matcher the
    token its row chose at the step before; rows without a grammar pass as they are."""

    def __init__(self, matchers: list):
        self.matchers = matchers
        self.started = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.started:
            for matcher, token in zip(self.matchers, input_ids[:, -1].tolist()):
                advance(matcher, token)
        self.started = True
        return mask_logits(scores, self.matchers)


def _batch(model, ids: list[list[int]], pad: int) -> dict:
    """Model inputs for one batch: left-padded, or with a shared prefix run once and its cache repeated."""
    shared = min(len(os.path.commonprefix(ids)), min(map(len, ids)) - 1)
    shared = shared if len(ids) > 1 and shared >= MIN_SHARED_PREFIX else 0
    width = max(map(len, ids)) - shared
    rows = [x[:shared] + [pad] * (width - len(x) + shared) + x[shared:] for x in ids]
    mask = [[1] * shared + [0] * (width - len(x) + shared) + [1] * (len(x) - shared) for x in ids]
    inputs = {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(mask)}
    if shared:
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([ids[0][:shared]]), cache=cache, use_cache=True)
        cache.batch_repeat_interleave(len(ids))
        inputs["cache"] = cache
    return inputs


def _batches(order: list[int], ids: list[list[int]], rows: int) -> list[list[int]]:
    """`order` (by ascending length) cut into batches of at most `rows` rows and MAX_BATCH_TOKENS
    rows x longest prompt."""
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < rows and (len(batches[-1]) + 1) * len(ids[i]) <= MAX_BATCH_TOKENS:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.inference_mode()
def generate(model, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
             batch_size: int = 16, desc: str = "generate",
             constraints: list[Constraint | None] | None = None) -> list[Generation]:
    """Greedy completions for `prompts`, in input order; with `constraints`, prompt i's answer follows
    `constraints[i]` (None: unconstrained). Raises ValueError when their lengths differ.

    A progress bar labelled `desc` counts the batches when there is more than one: a single
    batch (one server request, one pyfunc prediction) would print a bar that says nothing.
    """
    if constraints is not None and len(constraints) != len(prompts):
        raise ValueError(f"{len(constraints)} constraints for {len(prompts)} prompts")
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    batches = _batches(sorted(range(len(prompts)), key=lambda i: len(ids[i])), ids, batch_size)
    results: list[Generation | None] = [None] * len(prompts)
    eos = tokenizer.eos_token_id
    for idx in tqdm(batches, desc=desc, unit="batch", disable=len(batches) <= 1):
        batch = _batch(model, [ids[i] for i in idx], tokenizer.pad_token_id)
        chosen = _ChosenLogprobs()  # last processor: sees the scores greedy decoding takes the argmax of
        processors = [chosen]
        if constraints is not None and any(constraints[i] for i in idx):
            vocab = model.config.get_text_config().vocab_size
            processors.insert(0, _Grammar([constraints[i].matcher(tokenizer, vocab) if constraints[i] else None
                                           for i in idx]))
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id, logits_processor=LogitsProcessorList(processors),
                             return_dict_in_generate=True)
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        logprobs = torch.stack(chosen.steps, dim=1)
        for row, i in enumerate(idx):
            tokens = new[row].tolist()
            length = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            results[i] = Generation.of(tokenizer.decode(tokens[:length], skip_special_tokens=True),
                                       logprobs[row, :length].tolist())
    return results
