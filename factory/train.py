"""Train: a LoRA specialist for one mined task, with TRL's SFTTrainer and PEFT.

Lifecycle (each setup step returns one component):

    load_tokenizer -> setup_data -> training_args -> setup_model -> setup_trainer -> fit -> save

Prompts and answers are rendered by `factory.chat` (the base model's own chat template,
tool lists and calls where it has none), as evaluation and serving render them, so the
specialist sees at inference exactly the text it was trained on.

Sequence budget (`sequence_budget`): a task's examples are as long as its logs make them
(a policy prompt of thousands of tokens, a dialogue's history), so the budget comes from the
task's data, the `seq_length_quantile` of its example lengths, capped by the recipe's
`max_seq_length` and the base model's context. A task whose calls share one long policy (system
prompt and tools) learns it into the weights and is trained and served without it
(`choose_policy`); one whose shared prefix still leaves no room for any example is refused
before training, naming the prefix's size. A longer example keeps its system prompt, tools,
latest turn and answer, and loses earlier turns first (`chat.fit_messages`); what was shortened
or skipped, and why, is counted (`DataReport`) and logged to the MLflow run. The batch is laid
out to fit memory (`memory_plan`): split into accumulated micro-batches, then checkpointed.
The time budget `max_train_tokens` counts the tokens a step computes: a prompt prefix shared
by the whole task (its system prompt, tools) counts once per batch, as `shared_prefix` runs it.

Speed on CPU (SmolLM2-135M, LoRA, 2 cores; figures in bench/train.py). Each choice
below was kept because it measured faster; the trade-off is stated with it:

* loss on the completion only, and the LM head (576 x 49,152 for SmolLM2) applied only
  at completion positions (`completion_loss`): 1.5x the tokens/s of TRL's own loss on
  the same batches. Prompts are long and repetitive, so projecting them to the
  vocabulary costs time and teaches nothing the task needs. Off-GPU, TRL's head scores
  every position and adds entropy and accuracy over the full vocabulary; on CUDA its
  Triton head already scores only the completion positions, in tiles, without
  materializing logits (which matters for long completions and 150k vocabularies), so
  it is kept there.
* padding-free batches: the examples of a batch are concatenated into one row, and
  attention runs per example (`_varlen_sdpa`), so no compute goes to padding and no
  block-diagonal mask is needed: another 1.5x over padded batches of the sampled data.
  Trade-off: one attention call per example and layer. (transformers' own sdpa also keeps
  the examples apart, with a block-diagonal mask it builds from `position_ids` restarting
  at 0 when no KV cache is in use, but it scores every pair of positions of the row.)
  On CUDA other kernels run these rows (`attention_path`).
* a shared prompt prefix computed once per batch (`SharedPrefixCollator`): the calls of
  one subtask start with the same system prompt and tool list, so the batch's row holds
  that prefix once, then each example's rest, which attends to the prefix and to itself.
  Loss and gradients are those of the unshared batch (up to float rounding: a test);
  on the sample tasks 23-51% of the tokens are shared, and agents' real system prompts
  are longer. Trade-off: the rest of each example runs attention with an explicit mask.
  Throughput still counts every example's tokens (`num_input_tokens_seen`), the tokens
  actually run are in `computed_tokens`.
* MKL's own fast kernels on AMD CPUs (`factory.mkl`, loaded above torch's import): PyTorch's
  MKL otherwise gives them its generic matmul kernels; +10-12% tokens/s here.
* fp32, no gradient checkpointing unless `memory_plan` needs it: this CPU has no bf16 matmul
  units (a bf16 matmul runs at ~0.3x the fp32 speed) and the 135M model fits in memory many times
  over; only long rows (dialogues of thousands of tokens) outgrow it.
* no injected default system prompt (`render_prompt`): a record without a system
  message gets an empty one where the template would otherwise add its default.

A run's working folder is keyed by task, dataset version and recipe digest:
rerunning the same command resumes from the latest complete checkpoint after a
crash, and returns the finished result at once when the adapter is already saved.
With `distributed` other than "none", `train` runs itself under `accelerate launch`
with the recipe's shipped accelerate/DeepSpeed config.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from factory import mkl

mkl.load_on_amd()  # before torch is first imported: MKL's fast kernels on AMD CPUs (factory/mkl.py)

import mlflow
import numpy as np
import psutil
import torch
import torch.nn.functional as F
import yaml
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (AttentionInterface, AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase,
                          TrainerCallback, set_seed)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from trl import SFTConfig, SFTTrainer

from factory import chat
from factory.base_model import resolve_base
from factory.catalog import check_task_name
from factory.errors import FactoryError
from factory.io import load_split, write_atomic
from factory.models import load_tokenizer
from factory.procs import die_with_parent, parent_death_kill
from factory.recipe import RECIPES_DIR, Recipe, accelerate_config
from factory.tracking import task_experiment

VARLEN_ATTENTION = "sdpa_varlen"
# min_train_steps repeats a task's examples within this many times max_train_tokens computed tokens
REPEAT_TOKENS = 2
_DRIVER_ENV = "FACTORY_TRAIN_DRIVER"  # the pid of the process that ran `accelerate launch`


@dataclass
class TrainResult:
    task: str
    kind: str
    run_id: str
    adapter_dir: str
    base_model: str
    dataset_version: str
    recipe_digest: str
    train_examples: int
    train_loss: float
    train_tokens: int
    tokens_per_s: float
    seconds: float
    seq_budget: int = 0
    data: dict[str, Any] = field(default_factory=dict)  # the training split's DataReport
    policy: str | None = None  # the learned policy's fingerprint: prompts are rendered without it


# --- speed: attention per example in padding-free batches, LM head on completion positions ---------


def _varlen_sdpa(module, query, key, value, attention_mask, cu_seq_lens_q=None, shared_prefix_len=0, **kwargs):
    """SDPA run separately on each segment of a padding-free row (bounds from `cu_seq_lens_q`).

    With `shared_prefix_len` (from `SharedPrefixCollator`) the first segment is the shared
    prefix and every later one also attends to it. Without the bounds (ordinary padded
    batches, generation) this is transformers' sdpa.
    """
    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    lengths = cu_seq_lens_q.diff().tolist()
    sdpa = functools.partial(F.scaled_dot_product_attention, scale=kwargs.get("scaling"),
                             dropout_p=kwargs.get("dropout", 0.0) if module.training else 0.0,
                             enable_gqa=query.shape[1] != key.shape[1])
    # split, not slices: the backward of a split is one concatenation, while each slice's
    # backward fills and adds a zero tensor of the whole row (measured: 40% of a step)
    segments = list(zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2)))
    if not shared_prefix_len:
        parts = [sdpa(q, k, v, is_causal=True) for q, k, v in segments]
    else:
        (q0, k0, v0), rest = segments[0], segments[1:]
        parts = [sdpa(q0, k0, v0, is_causal=True)]
        for q, k, v in rest:  # each position sees the whole prefix and its own example up to itself
            mask = torch.ones(q.shape[2], shared_prefix_len + q.shape[2], dtype=torch.bool,
                              device=q.device).tril(shared_prefix_len)
            parts.append(sdpa(q, torch.cat([k0, k], 2), torch.cat([v0, v], 2), attn_mask=mask))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(VARLEN_ATTENTION, _varlen_sdpa)
AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)


# --- which attention runs a batch, by device ----------------------------------------------------------

# path -> (transformers' attn_implementation, whether batches are padding-free rows)
ATTENTION_PATHS = {
    "sdpa_varlen": (VARLEN_ATTENTION, True),
    "flash_attention_2": ("flash_attention_2", True),
    "sdpa_packed": ("sdpa", True),
    "padded": ("sdpa", False),
}


def attention_path(recipe: Recipe, device: str, flash_attn: bool) -> str:
    """The attention path for `recipe` on `device` ("cpu", "cuda", ...), `flash_attn` telling
    whether the flash-attn package (FlashAttention-2) is installed. One of `ATTENTION_PATHS`:

    * "padded" when the recipe asks for padded batches (`padding_free: false`), on any device.
    * "sdpa_varlen" off CUDA: `_varlen_sdpa`, SDPA per example of the padding-free row, the only
      path that can run a batch's shared prompt prefix once (`SharedPrefixCollator`). Measured
      faster on CPU (module docstring); on a GPU its Python loop issues one small kernel per
      example and layer, so it is not used there.
    * "flash_attention_2" on CUDA with flash-attn and 16-bit weights (FlashAttention has no fp32
      kernel): its varlen kernel runs each example of the row, with the bounds TRL's
      padding-free collator passes (`cu_seq_lens_q`; transformers would otherwise derive them
      from `position_ids` restarting at 0). No compute on padding, none across examples.
    * "sdpa_packed" on CUDA otherwise: transformers' sdpa on the padding-free row, kept per
      example by the block-diagonal mask it builds from `position_ids` (transformers >= 5.24,
      which pyproject pins, does this). Trade-off: the row's attention is quadratic in the
      whole row and the masked kernel is not FlashAttention's, against no compute on padding
      in every other layer; unmeasured on a GPU.
    The shared prefix thus stays on CPU: on CUDA it is off until a measurement says the
    per-example loop with a shared prefix beats the varlen kernel; none is possible here
    (no GPU). Raises nothing.
    """
    if not recipe.padding_free:
        return "padded"
    if device != "cuda":
        return "sdpa_varlen"
    if flash_attn and recipe.precision != "fp32":
        return "flash_attention_2"
    return "sdpa_packed"


def device_facts() -> tuple[str, bool]:
    """(device type, flash-attn installed) of this process, for `attention_path` and `liger_kernel`."""
    from transformers.utils import is_flash_attn_2_available

    return ("cuda" if torch.cuda.is_available() else "cpu"), is_flash_attn_2_available()


def liger_kernel(recipe: Recipe, device: str, installed: bool) -> bool:
    """Whether the trainer applies Liger's Triton kernels (RMSNorm, RoPE, SwiGLU; TRL keeps its own
    fused LM head): the recipe's `use_liger_kernel`, on CUDA only.

    Off CUDA the flag is ignored, with a message: Triton compiles these kernels for GPUs, and they
    compute the layers they replace (up to rounding), so the flag changes speed, not what is learned
    (it is left out of the recipe digest); refusing it would stop the GPU recipes' other paths,
    which do run on CPU (QLoRA, DDP: tests/test_gpu_path.py). Raises ValueError on CUDA when
    liger-kernel is not installed: `training_args` runs before any weight is loaded, while the
    trainer would raise only after the model is.
    """
    if not recipe.use_liger_kernel:
        return False
    if device != "cuda":
        print(f"use_liger_kernel ignored on {device}: Liger's Triton kernels run on CUDA GPUs only", flush=True)
        return False
    if not installed:
        raise ValueError("use_liger_kernel needs liger-kernel: pip install '.[gpu]' (or set use_liger_kernel=false)")
    return True


def _shared_prefix_len(examples: list[dict[str, list[int]]]) -> int:
    """Length of the token prefix all examples share, ending at least one token before any label.

    Every example keeps one unlabelled token after the prefix, so no position is
    predicted across the end of the previous example; with loss on all tokens (no -100
    labels) nothing is shared.
    """
    limit = min(next((i for i, label in enumerate(e["labels"]) if label != -100), len(e["labels"])) - 1
                for e in examples)
    return max(min(len(os.path.commonprefix([e["input_ids"] for e in examples])), limit), 0)


class SharedPrefixCollator:
    """Padding-free rows with the batch's shared prompt prefix once: prefix, then each example's rest.

    Positions continue the prefix in every example (RoPE sees each example as it is);
    `cu_seq_lens_q` bounds the segments and `shared_prefix_len` tells `_varlen_sdpa` that
    the first one is shared. A batch of one example, or with nothing shared, goes to
    `collate` (TRL's padding-free collator).
    """

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        shared = _shared_prefix_len(examples) if len(examples) > 1 else 0
        if not shared:
            return self.collate(examples)
        rests = [e["input_ids"][shared:] for e in examples]
        lengths = [len(r) for r in rests]
        bounds = torch.tensor([0, *itertools.accumulate([shared, *lengths])], dtype=torch.int32)
        row = examples[0]["input_ids"][:shared] + [t for r in rests for t in r]
        labels = [-100] * shared + [t for e in examples for t in e["labels"][shared:]]
        positions = torch.cat([torch.arange(shared), *(torch.arange(shared, shared + n) for n in lengths)])
        longest = max(shared, *lengths)
        return {"input_ids": torch.tensor([row]), "labels": torch.tensor([labels]), "position_ids": positions[None],
                "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest,
                "shared_prefix_len": shared}


def completion_loss(model, inputs: dict[str, Any], num_items_in_batch: Any = None) -> tuple[torch.Tensor, float]:
    """Mean cross entropy over the completion tokens, projecting only their positions to the vocabulary.

    `inputs` is a collated batch with `labels` (-100 outside completions). Returns the
    loss (summed, divided by `num_items_in_batch` when given, for gradient accumulation)
    and the share of completion tokens predicted right. In a padded batch the positions
    kept are the union over its rows.
    """
    labels = inputs["labels"][:, 1:]
    keep = (labels != -100).any(0).nonzero().flatten()
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits
    targets = labels[:, keep]
    valid = targets != -100
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    count = valid.sum() if num_items_in_batch is None else num_items_in_batch
    accuracy = ((logits.argmax(-1) == targets) & valid).sum().item() / max(int(valid.sum()), 1)
    return loss / torch.as_tensor(count).clamp(min=1), accuracy


class FactorySFTTrainer(SFTTrainer):
    """SFTTrainer with `completion_loss` off CUDA (see the module docstring for why only there),
    counting the examples' tokens under a shared prefix (`computed_tokens`: the tokens run)."""

    computed_tokens = 0

    def _track_num_input_tokens(self, inputs):
        super()._track_num_input_tokens(inputs)
        self.computed_tokens += inputs["input_ids"].numel()
        examples = len(inputs["cu_seq_lens_q"]) - 2 if "cu_seq_lens_q" in inputs else 0
        repeated = torch.as_tensor(inputs.get("shared_prefix_len", 0) * max(examples - 1, 0), device=self.args.device)
        if self.args.include_num_input_tokens_seen != "no":  # a collective: every process adds, shared or not
            self.state.num_input_tokens_seen += self.accelerator.gather(repeated).sum().item()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or self.args.device.type == "cuda":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, accuracy = completion_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        self._metrics["train" if model.training else "eval"]["mean_token_accuracy"].append(accuracy)
        return loss


# --- lifecycle ---------------------------------------------------------------------------------------


class DataError(FactoryError):
    """A task whose examples cannot become training examples (none renders or fits)."""


@dataclass
class DataReport:
    """What `setup_data` made of a split: kept, shortened (turns dropped), skipped by reason."""

    examples: int = 0
    seq_budget: int = 0
    shortened: int = 0
    messages_dropped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0  # every example's tokens
    computed_tokens: int = 0  # with the task's shared prefix counted once per batch
    policy: str | None = None  # the fingerprint of the policy learned into the weights (`choose_policy`)
    policy_tokens: int = 0  # the task's fixed system prompt and tools, rendered
    longest: list[int] = field(default_factory=list)  # the longest examples' tokens, longest first

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        learned = f"; its policy ({self.policy_tokens} tokens) learned, not read" if self.policy else ""
        return (f"{self.examples} examples within {self.seq_budget} tokens; {self.shortened} shortened "
                f"({self.messages_dropped} earlier messages dropped); skipped: {skipped}{learned}")


def sequence_budget(lengths: list[int], recipe: Recipe, context: int | None) -> int:
    """The task's sequence budget: the `seq_length_quantile` of its example lengths, at most the
    recipe's `max_seq_length` and the base model's context."""
    cap = min(recipe.max_seq_length, context or recipe.max_seq_length)
    if not lengths:
        return cap
    return min(cap, max(64, int(np.quantile(lengths, recipe.seq_length_quantile, method="higher"))))


def fixed_prefix(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with (a task's system prompt and tools); 0 for fewer than two prompts."""
    return len(os.path.commonprefix(prompts)) if len(prompts) > 1 else 0


def choose_policy(rows: list[dict], tokenizer: PreTrainedTokenizerBase, recipe: Recipe) -> tuple[str | None, int]:
    """(fingerprint of the policy the specialist learns into its weights, or None; that policy's tokens).

    A task has a policy when nearly all its calls carry one system prompt and tool list
    (`chat.task_policy`). `learn_policy: auto` learns it when it takes over half of `max_seq_length`:
    read in every example, it would crowd out the dialogue history that differs between them, and
    cost its tokens in every step and every served request. The trade-off: the specialist can no
    longer read its instructions, only what its examples show of them, and it answers only requests
    that carry the same policy (a reworded policy escalates, reason `policy_changed`, until the
    task is retrained on logs of the new one).
    """
    fingerprint = chat.task_policy(rows) if recipe.learn_policy != "never" else None
    if fingerprint is None:
        return None, 0
    row = next(r for r in rows if chat.policy_fingerprint(r["messages"], r.get("tools") or []) == fingerprint)
    system = [m for m in row["messages"] if m.get("role") in ("system", "developer")]
    try:
        text = chat.render_prompt(tokenizer, system, row.get("tools") or [])
    except chat.ChatError:  # a template that renders no system prompt alone: its text is close enough
        text = "\n".join(chat.text_of(m.get("content")) for m in system) + chat.tools_text(row.get("tools") or [])
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    learn = recipe.learn_policy == "always" or tokens > recipe.max_seq_length // 2
    return (fingerprint if learn else None), tokens


def setup_data(rows: list[dict], tokenizer: PreTrainedTokenizerBase, recipe: Recipe,
               context: int | None = None, budget: int | None = None,
               policy: str | None = None) -> tuple[Dataset, DataReport]:
    """Tokenized examples (`input_ids`, `labels`: -100 on the prompt with completion_only_loss) and a report.

    Prompt and completion are tokenized separately, as at inference (the prompt is
    tokenized alone and generation continues it). The sequence budget is `budget`, else
    `sequence_budget` over these rows; a longer example is shortened by dropping earlier
    turns, never by cutting the answer, and skipped (counted) when it cannot be. Rows are
    taken in a seeded random order (`recipe.seed`), up to max_train_samples rows and
    max_train_tokens computed tokens: a budget that holds a fraction of the split then
    samples the whole of it, not the first dialogues logged (turns of one dialogue are
    logged together and alike). With `policy` (`choose_policy`) prompts are rendered without
    the system prompt and tools, and rows with another policy are skipped ("policy_changed").
    Raises DataError when no example renders and fits, before any training time is spent.
    """
    rows = random.Random(recipe.seed).sample(rows, len(rows))[: recipe.max_train_samples or len(rows)]
    report, skipped = DataReport(), Counter()
    tokenized = []
    for row in rows:
        try:
            messages, tools = chat.without_policy(row["messages"], row.get("tools") or [], policy)
            prompt = chat.render_prompt(tokenizer, messages, tools)
            completion = chat.render_completion(tokenizer, messages, tools, row["output"])
        except chat.ChatError as err:
            skipped[err.reason] += 1
            continue
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (prompt, completion)]
        tokenized.append(({**row, "messages": messages, "tools": tools}, *ids))
    report.seq_budget = budget or sequence_budget([len(p) + len(c) for _, p, c in tokenized], recipe, context)
    fixed = fixed_prefix([p for _, p, _ in tokenized])
    shortest = min((len(c) for _, _, c in tokenized), default=0)
    if budget is None and tokenized and fixed + shortest > report.seq_budget:
        raise DataError(f"the task's fixed prompt prefix (system prompt and tools) is {fixed} tokens and its "
                        f"shortest answer {shortest}: no example fits the sequence budget of {report.seq_budget} "
                        f"tokens (max_seq_length; the base model's context: {context}); raise it above "
                        f"{fixed + shortest} (--set max_seq_length=N: memory and time grow with it), learn the "
                        "policy into the weights (--set learn_policy=always; where nearly all calls share one system "
                        "prompt and tool list), or shorten the system prompt or tool list")
    examples = []
    for row, prompt, completion in tokenized:
        if len(prompt) + len(completion) > report.seq_budget:
            try:
                messages, dropped = chat.fit_messages(tokenizer, row["messages"], row.get("tools") or [],
                                                      report.seq_budget - len(completion))
            except chat.ChatError as err:
                skipped[err.reason] += 1
                continue
            text = chat.render_prompt(tokenizer, messages, row.get("tools") or [])
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            report.shortened, report.messages_dropped = report.shortened + 1, report.messages_dropped + dropped
        labels = [-100] * len(prompt) + completion if recipe.completion_only_loss else prompt + completion
        examples.append({"input_ids": prompt + completion, "labels": labels})
    # the prompt prefix the whole task shares (its system prompt, tools): run once per batch
    sharing = recipe.shared_prefix and recipe.padding_free and len(examples) > 1
    shared = _shared_prefix_len(examples) if sharing else 0
    kept = []
    for example in examples:
        cost = len(example["input_ids"]) - shared + shared / recipe.batch_size
        if recipe.max_train_tokens and kept and report.computed_tokens + cost > recipe.max_train_tokens:
            break
        kept.append(example)
        report.tokens += len(example["input_ids"])
        report.computed_tokens += round(cost)
    report.examples, report.skipped, report.policy = len(kept), dict(skipped), policy
    report.longest = sorted((len(e["input_ids"]) for e in kept), reverse=True)[: recipe.batch_size]
    if not kept:
        raise DataError(f"no training example renders and fits the sequence budget ({report.summary()})")
    return Dataset.from_list(kept), report



@dataclass(frozen=True)
class MemoryPlan:
    """How a recipe's batch runs on this machine: `micro_batch` examples a step, `accumulation` steps an
    optimizer update (micro_batch x accumulation = the recipe's batch x its accumulation), and whether
    activations are recomputed; `need` is the worst micro-batch's estimated bytes, `budget` what it may use."""

    micro_batch: int
    accumulation: int
    checkpointing: bool
    need: int = 0
    budget: int | None = None

    @classmethod
    def of(cls, recipe: Recipe) -> MemoryPlan:
        """The recipe's own layout."""
        return cls(recipe.batch_size, recipe.gradient_accumulation_steps, recipe.gradient_checkpointing)


# share of the memory available at start that one training step may take: the rest is the process's own
# (tokenizer, datasets, MLflow) and the machine's (page cache, other work)
STEP_MEMORY_SHARE = 0.8


def memory_plan(recipe: Recipe, config: Any, longest: list[int], weights: int = 0,
                available: int | None = None, device: str = "cpu") -> MemoryPlan:
    """The batch layout that fits in memory, from the longest examples' tokens (`DataReport.longest`).

    On CPU a padding-free micro-batch of b examples holds their tokens in one row; its peak is
    `resources.cpu_step_bytes`. The recipe's batch runs whole when its longest examples fit
    `STEP_MEMORY_SHARE` of the available memory less `weights` (the weights and optimizer state);
    else in the largest micro-batch that divides it, with gradient accumulation (the same updates:
    losses are summed over the accumulated tokens, and the batch's shared prompt prefix is run
    once per micro-batch instead of once); else the largest micro-batch that fits with gradient
    checkpointing (~1/3 more compute), tried only where it holds less than running without it. Other devices, and an unknown amount of memory, keep the recipe's layout
    (CUDA has its own preflight: `resources.check_gpu_memory`).
    Raises ResourceError when even one example with checkpointing cannot fit, naming its tokens.
    """
    from factory.resources import ResourceError, available_memory_bytes, cpu_step_bytes

    available = available_memory_bytes() if available is None else available
    if device != "cpu" or available is None or not longest:
        return MemoryPlan.of(recipe)
    budget = int(available * STEP_MEMORY_SHARE) - weights
    layouts = [(b, ck) for ck in sorted({recipe.gradient_checkpointing, True})
               for b in range(recipe.batch_size, 0, -1) if recipe.batch_size % b == 0]
    if cpu_step_bytes(config, recipe, longest[0], True) >= cpu_step_bytes(config, recipe, longest[0], False):
        layouts = [(b, ck) for b, ck in layouts if ck == recipe.gradient_checkpointing]  # it would save nothing
    for micro, checkpointing in layouts:
        need = cpu_step_bytes(config, recipe, sum(longest[:micro]), checkpointing)
        if need <= budget:
            return MemoryPlan(micro, recipe.gradient_accumulation_steps * recipe.batch_size // micro,
                              checkpointing, need, budget)
    raise ResourceError(f"the longest training example ({longest[0]} tokens) needs about {need / 2**30:.1f} GiB "
                        f"to train even alone with gradient checkpointing, and {max(budget, 0) / 2**30:.1f} GiB "
                        "is free for it: lower max_seq_length (--set max_seq_length=N; longer examples lose "
                        "earlier turns) or train on a larger machine")


def setup_model(recipe: Recipe, base_path: str) -> torch.nn.Module:
    """The base model wrapped for the recipe's method, its adapter initialized from `recipe.seed`.

    Attention as `attention_path` picks for this device.
    lora/dora: PEFT adapters on `lora.target_modules`. qlora: the base loaded in
    4-bit through bitsandbytes, on CUDA or on its CPU backend (`check_device`), the adapters
    on its 4-bit linear layers.
    full: every weight trains (memory ~4x the model in fp32 with AdamW).
    """
    set_seed(recipe.seed)
    kwargs: dict[str, Any] = {"dtype": {"fp32": torch.float32, "bf16": torch.bfloat16,
                                        "fp16": torch.float16}[recipe.precision],
                              "attn_implementation": ATTENTION_PATHS[attention_path(recipe, *device_facts())][0]}
    if recipe.method == "qlora":
        from transformers import BitsAndBytesConfig

        q = recipe.quantization
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype))
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if recipe.method == "full":
        return model
    if recipe.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing)
    config = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                        target_modules=recipe.lora.target_modules, use_dora=recipe.method == "dora",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class _MlflowLog(TrainerCallback):
    """Trainer logs (loss, learning rate, grad norm) as MLflow metrics of the active run, if any (main process)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if numbers and state.is_world_process_zero and mlflow.active_run():
            mlflow.log_metrics(numbers, step=state.global_step)


class _Throughput(TrainerCallback):
    """Tokens and seconds of this session's training (a resumed run counts from its checkpoint)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start
        self.tokens = state.num_input_tokens_seen - self.tokens0


def train_steps(recipe: Recipe, examples: int, processes: int = 1, computed_tokens: int = 0) -> int:
    """The trainer's `max_steps`: the recipe's, else -1 (its epochs decide) unless those epochs
    make fewer optimizer steps than `min_train_steps`, which it then returns, as far as the whole
    training stays within REPEAT_TOKENS x `max_train_tokens` computed tokens (`computed_tokens`:
    one epoch's).

    The trade-off: a small task gains from repeating its examples (a 135M base needs the steps),
    at up to min_train_steps / its steps more time; a task of long examples (a long policy, long
    dialogues) would repeat them for hours, so the repeats are bounded by compute, not steps.
    """
    if recipe.max_steps > 0 or not recipe.min_train_steps or not examples:
        return recipe.max_steps
    per_epoch = math.ceil(examples / (recipe.batch_size * processes))
    steps = math.ceil(per_epoch * recipe.epochs / recipe.gradient_accumulation_steps)
    if steps >= recipe.min_train_steps:
        return -1
    if recipe.max_train_tokens and computed_tokens:
        per_step = computed_tokens * recipe.gradient_accumulation_steps / per_epoch
        affordable = int(REPEAT_TOKENS * recipe.max_train_tokens / per_step)
        return -1 if affordable <= steps else min(recipe.min_train_steps, affordable)
    return recipe.min_train_steps


def training_args(recipe: Recipe, out_dir: Path, evaluate: bool, examples: int = 0,
                  computed_tokens: int = 0, plan: MemoryPlan | None = None) -> SFTConfig:
    """TRL's config for the recipe, for `examples` training examples (`train_steps`), its batch laid out
    as `plan` says (`memory_plan`; the recipe's own layout without one). Created
    before the model: under DeepSpeed ZeRO-3 it makes `from_pretrained` load the weights
    already partitioned across the GPUs. Batches are padding-free rows unless `attention_path`
    says padded. Raises ValueError as `liger_kernel` does."""
    plan = plan or MemoryPlan.of(recipe)
    device, flash_attn = device_facts()
    padding_free = ATTENTION_PATHS[attention_path(recipe, device, flash_attn)][1]
    return SFTConfig(
        output_dir=str(out_dir),
        num_train_epochs=recipe.epochs,
        max_steps=train_steps(recipe, examples, int(os.environ.get("WORLD_SIZE", "1")), computed_tokens),
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.accumulation,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler,
        warmup_steps=recipe.warmup_ratio,
        weight_decay=recipe.weight_decay,
        optim=recipe.optimizer,
        bf16=recipe.precision == "bf16",
        fp16=recipe.precision == "fp16",
        activation_checkpointing=plan.checkpointing,
        # setup_data drops the longer examples; TRL refuses a max_length it cannot enforce padding-free
        max_length=None if padding_free and not recipe.packing else recipe.max_seq_length,
        packing=recipe.packing,
        padding_free=padding_free,
        completion_only_loss=recipe.completion_only_loss,
        seed=recipe.seed,
        data_seed=recipe.seed,
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if evaluate and recipe.eval_steps else "no",
        eval_steps=recipe.eval_steps,
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
        # padding-free rows hold no padding, and pad == eos for many tokenizers
        include_num_input_tokens_seen="all" if recipe.padding_free or recipe.packing else "non_padding",
        use_cpu=device != "cuda",
        use_liger_kernel=liger_kernel(recipe, device, importlib.util.find_spec("liger_kernel") is not None),
    )


def setup_trainer(args: SFTConfig, model, tokenizer, train: Dataset, valid: Dataset | None,
                  shared_prefix: bool = False) -> FactorySFTTrainer:
    """The trainer; `shared_prefix` wraps its collator in `SharedPrefixCollator` where the model runs
    `_varlen_sdpa` (the "sdpa_varlen" path of `attention_path`) on padding-free, unpacked rows: the
    only attention that reads `shared_prefix_len`; any other would let examples attend to each other."""
    trainer = FactorySFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid,
                                processing_class=tokenizer, callbacks=[_MlflowLog(), _Throughput()])
    varlen = model.config._attn_implementation == VARLEN_ATTENTION
    if shared_prefix and varlen and args.padding_free and not args.packing:
        # after construction: TRL refuses a custom collator together with padding_free
        trainer.data_collator = SharedPrefixCollator(trainer.data_collator)
    return trainer


def _latest_checkpoint(out_dir: Path) -> str | None:
    """The newest checkpoint the trainer finished writing (its trainer_state.json is written last)."""
    complete = [p for p in out_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[1]))) if complete else None


def run_dir(registry_dir: Path, task: str, dataset_version: str, recipe: Recipe) -> Path:
    return registry_dir / "training" / check_task_name(task) / f"{dataset_version}-{recipe.digest()}"


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_device(recipe: Recipe) -> None:
    """Refuse, before anything is written or loaded, a recipe this machine cannot run.

    Without CUDA, QLoRA runs on bitsandbytes' CPU backend (tested with 0.50.2: NF4 weights,
    dequantized in each matmul, so slower than fp32 LoRA on a model that fits in memory: it proves
    the GPU path, it does not speed up CPU training) and DDP runs its processes on gloo. Two things
    stay GPU-only. bitsandbytes' paged optimizers page their state through CUDA unified memory; on
    CPU bitsandbytes warns and runs them unpaged, which is not what the recipe asked for. DeepSpeed
    is not tested on CPU: it is in the `gpu` extra only (not installed by `make test`), and its CPU
    accelerator compiles its ops with gcc at first use and is documented for recent Xeons only;
    its launch is tested as configuration (`launch_command`).
    Raises ValueError naming what needs CUDA GPUs, or that qlora needs bitsandbytes.
    """
    if not torch.cuda.is_available():
        if recipe.distributed.startswith("deepspeed"):
            raise ValueError(f"distributed {recipe.distributed!r} needs CUDA GPUs (pip install '.[gpu]'); "
                             "none is visible")
        if recipe.optimizer.startswith("paged_"):
            raise ValueError(f"optimizer {recipe.optimizer!r} needs CUDA GPUs (it pages its state through CUDA "
                             "unified memory); none is visible: set optimizer=adamw_torch to train on CPU")
    if recipe.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("method 'qlora' needs bitsandbytes: pip install '.[gpu]'")


def train(task: str, entry: dict[str, Any], recipe: Recipe, raw_recipe: dict[str, Any], data_dir: Path,
          registry_dir: Path) -> TrainResult:
    """Train (or resume, or reuse) the specialist for `task` from its catalog `entry`.

    With `recipe.distributed` other than "none" and outside a launched worker, the same
    call runs in `accelerate launch` processes (`launch_command`) and this one waits.
    Raises ValueError when the task has no dataset ready, no example fits the recipe, the
    base model is not available locally, or the machine cannot run the recipe (`check_device`);
    subprocess.CalledProcessError when a distributed launch fails.
    """
    if entry.get("status") != "ready" or not entry.get("dataset_version"):
        raise ValueError(f"task {task!r} has no dataset ready (status: {entry.get('status')})")
    if recipe.method == "dpo":
        return train_dpo(task, entry, recipe, raw_recipe, data_dir, registry_dir)
    version = entry["dataset_version"]
    out_dir = run_dir(registry_dir, task, version, recipe)
    result_path = out_dir / "train.json"
    if result_path.exists():
        return TrainResult(**json.loads(result_path.read_text()))
    check_device(recipe)
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe.distributed != "none" and "LOCAL_RANK" not in os.environ:
        subprocess.run(launch_command(task, entry, raw_recipe, recipe, data_dir, registry_dir), check=True,
                       env={**os.environ, _DRIVER_ENV: str(os.getpid())}, preexec_fn=parent_death_kill())
        return TrainResult(**json.loads(result_path.read_text()))
    if recipe.torch_threads:
        torch.set_num_threads(recipe.torch_threads)

    base_path = resolve_base(recipe.base_model)
    from factory.resources import preflight_training  # memory and disk, before any weight is loaded
    weights = preflight_training(base_path, recipe.method, recipe.precision, out_dir, recipe)  # GPU memory on CUDA
    try:
        tokenizer = load_tokenizer(base_path)
    except OSError as err:  # a hub id that is not in the local cache: nothing is downloaded
        raise ValueError(f"base model {recipe.base_model!r} cannot be loaded: {err}") from None
    config = AutoConfig.from_pretrained(base_path)
    context = getattr(config, "max_position_embeddings", None)
    train_rows = load_split(data_dir, task, version, "train")
    policy, policy_tokens = choose_policy(train_rows, tokenizer, recipe)
    train_set, report = setup_data(train_rows, tokenizer, recipe, context, policy=policy)
    report.policy_tokens = policy_tokens
    print(f"{task}: {report.summary()}", flush=True)
    valid_rows = load_split(data_dir, task, version, "validation")
    valid_set = setup_data(valid_rows, tokenizer, recipe, budget=report.seq_budget, policy=policy)[0] \
        if valid_rows and recipe.eval_steps else None
    plan = memory_plan(recipe, config, report.longest, weights or 0,
                       device="cuda" if torch.cuda.is_available() else "cpu")
    if (plan.micro_batch, plan.checkpointing) != (recipe.batch_size, recipe.gradient_checkpointing):
        print(f"{task}: a batch of its {recipe.batch_size} longest examples ({sum(report.longest)} tokens) would not "
              f"fit the {plan.budget / 2**30:.1f} GiB free for a step: {plan.micro_batch} example(s) a step x "
              f"{plan.accumulation} accumulated{', with gradient checkpointing' if plan.checkpointing else ''}",
              flush=True)
    args = training_args(recipe, out_dir, valid_set is not None, len(train_set), report.computed_tokens, plan)
    model = setup_model(recipe, base_path)
    trainer = setup_trainer(args, model, tokenizer, train_set, valid_set, recipe.shared_prefix)

    main = trainer.is_world_process_zero()
    run_file = out_dir / "mlflow_run.json"
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.exists() else None
    if main:
        task_experiment(task)
    tracking = mlflow.start_run(run_id=run_id, run_name=f"train-{task}", log_system_metrics=True) \
        if main else nullcontext()
    with tracking as run:
        if main:
            write_atomic(run_file, json.dumps({"run_id": run.info.run_id}))
        if main and run_id is None:
            mlflow.log_params({"task": task, "kind": entry["kind"], "dataset_version": version,
                               "recipe_digest": recipe.digest(), "base_model": recipe.base_model,
                               **{f"recipe.{k}": v for k, v in _flat(recipe.model_dump()).items()}})
            mlflow.log_text(yaml.safe_dump(raw_recipe, sort_keys=False), "recipe.yaml")
            mlflow.log_input(mlflow.data.from_pandas(train_set.to_pandas(), name=f"{task}@{version}",
                                                     source=str(data_dir / task / version)), context="training")
            mlflow.set_tags({"task": task, "dataset_version": version, "stage": "train"})
            mlflow.log_params({"seq_budget": report.seq_budget, "policy_learned": report.policy or "none",
                               "policy_tokens": report.policy_tokens, "micro_batch": plan.micro_batch,
                               "gradient_accumulation": plan.accumulation, "activation_checkpointing": plan.checkpointing})
            mlflow.log_metrics({"data_examples": report.examples, "data_shortened": report.shortened,
                                "data_messages_dropped": report.messages_dropped,
                                "data_skipped": sum(report.skipped.values())})
            mlflow.log_dict(asdict(report), "data_report.json")
        output = trainer.train(resume_from_checkpoint=_latest_checkpoint(out_dir))
        adapter_dir = out_dir / "adapter"
        tmp = out_dir / "adapter.tmp"
        trainer.save_model(str(tmp))  # every process: ZeRO-3 gathers the sharded weights
        if not main:
            return None
        shutil.rmtree(adapter_dir, ignore_errors=True)  # left by a run killed between saving and train.json
        os.replace(tmp, adapter_dir)
        meter = next(c for c in trainer.callback_handler.callbacks if isinstance(c, _Throughput))
        result = TrainResult(
            task=task, kind=entry["kind"], run_id=run.info.run_id, adapter_dir=str(adapter_dir),
            base_model=recipe.base_model, dataset_version=version, recipe_digest=recipe.digest(),
            train_examples=len(train_set), train_loss=float(output.training_loss), train_tokens=int(meter.tokens),
            tokens_per_s=meter.tokens / meter.seconds if meter.seconds else 0.0, seconds=meter.seconds,
            seq_budget=report.seq_budget, data=asdict(report), policy=report.policy)
        mlflow.log_metrics({"train_loss_final": result.train_loss, "train_tokens_per_s": result.tokens_per_s,
                            "train_computed_tokens": trainer.computed_tokens, "train_seconds": result.seconds,
                            "train_peak_rss_mb": _peak_rss_mb()})
        mlflow.log_artifacts(str(adapter_dir), "adapter")
    write_atomic(result_path, json.dumps(asdict(result), indent=2))
    return result


def train_dpo(task: str, entry: dict[str, Any], recipe: Recipe, raw_recipe: dict[str, Any], data_dir: Path,
              registry_dir: Path) -> TrainResult:
    """`method: dpo`: the LoRA SFT specialist of this recipe (trained, or reused), then TRL's DPOTrainer
    continuing its adapter on the task's preference pairs (`factory.relabel.write_preferences`),
    a frozen copy of the SFT adapter as the reference (TRL makes it, named "ref"). Padded batches
    and TRL's own loss: pairs are few, so the SFT path's speed work is not worth its code here.
    The pairs are those beside the dataset version (the run is keyed by it and the recipe), and
    the run is in this process whatever `distributed` says.
    Raises ValueError when the task has no preference pairs that render; otherwise as `train`.
    """
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    from factory.relabel import load_preferences

    sft = train(task, entry, recipe.model_copy(update={"method": "lora"}), raw_recipe, data_dir, registry_dir)
    version = entry["dataset_version"]
    out_dir = run_dir(registry_dir, task, version, recipe)
    if (out_dir / "train.json").exists():
        return TrainResult(**json.loads((out_dir / "train.json").read_text()))
    pairs = load_preferences(data_dir, task, version)
    if not pairs:
        raise ValueError(f"task {task!r} has no preference pairs for dataset {version}: method dpo needs escalated "
                         f"calls whose specialist answer the request log kept (`factory relabel {task}` stores them)")
    base_path = resolve_base(recipe.base_model)
    tokenizer = load_tokenizer(base_path)
    rows = []
    for pair in pairs:
        try:  # rendered as the SFT adapter was trained: without the policy it learned
            messages, tools = chat.without_policy(pair["messages"], pair.get("tools") or [], sft.policy)
            rows.append({"prompt": chat.render_prompt(tokenizer, messages, tools),
                         "chosen": chat.render_completion(tokenizer, messages, tools, pair["chosen"]),
                         "rejected": chat.render_completion(tokenizer, messages, tools, pair["rejected"])})
        except chat.ChatError:
            continue
    if not rows:
        raise ValueError(f"task {task!r}: none of its {len(pairs)} preference pairs renders with the base's "
                         "chat template")
    set_seed(recipe.seed)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                      sft.adapter_dir, is_trainable=True)  # DPOTrainer copies it as "ref"
    loss_types = ["sigmoid", "sft"] if recipe.dpo.sft_weight else ["sigmoid"]
    args = DPOConfig(output_dir=str(out_dir), beta=recipe.dpo.beta, learning_rate=recipe.dpo.learning_rate,
                     loss_type=loss_types, loss_weights=[1.0, recipe.dpo.sft_weight][:len(loss_types)],
                     num_train_epochs=recipe.epochs, max_steps=recipe.max_steps,
                     per_device_train_batch_size=recipe.batch_size, seed=recipe.seed, data_seed=recipe.seed,
                     gradient_accumulation_steps=recipe.gradient_accumulation_steps, optim=recipe.optimizer,
                     lr_scheduler_type=recipe.lr_scheduler, max_length=sft.seq_budget or recipe.max_seq_length,
                     logging_steps=recipe.logging_steps, save_strategy="no", report_to="none",
                     bf16=recipe.precision == "bf16", fp16=recipe.precision == "fp16",  # TRL's default: bf16
                     activation_checkpointing=recipe.gradient_checkpointing, use_cpu=not torch.cuda.is_available())
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[_MlflowLog()])
    task_experiment(task)
    with mlflow.start_run(run_name=f"dpo-{task}") as run:
        mlflow.log_params({"task": task, "kind": entry["kind"], "dataset_version": version, "method": "dpo",
                           "recipe_digest": recipe.digest(), "base_model": recipe.base_model, "sft_run_id": sft.run_id,
                           "dpo.beta": recipe.dpo.beta, "preference_pairs": len(rows)})
        mlflow.log_text(yaml.safe_dump(raw_recipe, sort_keys=False), "recipe.yaml")
        mlflow.set_tags({"task": task, "dataset_version": version, "stage": "train", "method": "dpo"})
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
        if "ref" in model.peft_config:
            model.delete_adapter("ref")
        tmp, adapter_dir = out_dir / "adapter.tmp", out_dir / "adapter"
        model.save_pretrained(str(tmp))
        shutil.rmtree(adapter_dir, ignore_errors=True)
        os.replace(tmp, adapter_dir)
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        result = TrainResult(task=task, kind=entry["kind"], run_id=run.info.run_id, adapter_dir=str(adapter_dir),
                             base_model=recipe.base_model, dataset_version=version, recipe_digest=recipe.digest(),
                             train_examples=len(rows), train_loss=float(output.training_loss), train_tokens=0,
                             tokens_per_s=0.0, seconds=seconds, seq_budget=sft.seq_budget, policy=sft.policy,
                             data={"preference_pairs": len(rows), "sft_run_id": sft.run_id, "losses": losses})
        mlflow.log_metrics({"train_loss_final": result.train_loss, "train_seconds": seconds})
        mlflow.log_artifacts(str(adapter_dir), "adapter")
    write_atomic(out_dir / "train.json", json.dumps(asdict(result), indent=2))
    return result


def launch_command(task: str, entry: dict[str, Any], raw_recipe: dict[str, Any], recipe: Recipe, data_dir: Path,
                   registry_dir: Path, recipes_dir: Path = RECIPES_DIR) -> list[str]:
    """`accelerate launch` running this module's worker on one process per GPU (or `num_processes`;
    without CUDA, `num_processes` CPU processes on gloo, one when unset).

    The worker's arguments go through a JSON file in the run folder; DeepSpeed backends
    get their shipped JSON config (recipes/deepspeed/) as an absolute path.
    """
    config = accelerate_config(recipe, recipes_dir)
    spec = run_dir(registry_dir, task, entry["dataset_version"], recipe) / "launch.json"
    write_atomic(spec, json.dumps({"task": task, "entry": entry, "raw_recipe": raw_recipe,
                                   "data_dir": str(data_dir.resolve()), "registry_dir": str(registry_dir.resolve())}))
    processes = recipe.num_processes or max(torch.cuda.device_count(), 1)
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(config),
               "--num_processes", str(processes)]
    if recipe.distributed.startswith("deepspeed"):
        stage = recipe.distributed.removeprefix("deepspeed_")
        command += ["--deepspeed_config_file", str((recipes_dir / "deepspeed" / f"{stage}.json").resolve())]
    return [*command, "-m", "factory.train", str(spec)]


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _worker(spec_path: str) -> None:
    """One `accelerate launch` process: train from the spec `launch_command` wrote. It dies with its
    launcher (which dies with the `factory` process that started it: factory.procs), and exits at
    once when that process died while this one was starting."""
    import torch.distributed as dist

    die_with_parent(os.getppid())
    driver = os.environ.get(_DRIVER_ENV)
    if driver and not psutil.pid_exists(int(driver)):
        os._exit(1)

    spec = json.loads(Path(spec_path).read_text())
    try:
        train(spec["task"], spec["entry"], Recipe.model_validate(spec["raw_recipe"]), spec["raw_recipe"],
              Path(spec["data_dir"]), Path(spec["registry_dir"]))
    finally:  # the process group's communication threads must end before the interpreter does
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
