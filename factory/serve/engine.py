"""The in-process serving engine: concurrent requests, of any tasks sharing a base, decoded together.

One thread owns the model. Requests wait in a bounded FIFO queue; before every forward pass the
engine admits waiting requests (oldest first) into the running batch, up to `max_batch` rows,
runs one forward pass for the running rows' next tokens and the admitted prompts together, each
token through its own task's LoRA adapter, and retires the rows that produced the end-of-sequence
token or used their budget. That is continuous batching: a request joins the batch at the next
step instead of waiting for the batch to finish, so a short answer is not held up by a long one,
and the queue is served in arrival order (nothing starves).

Where the time went, and what each part below saves (SmolLM2-135M, fp32, this 2-core CPU, 14 rows
of ~130 tokens; the weights are read once per forward whatever the rows, so a step of 14 rows
costs about twice a step of one):
- `_Slots`: the batch's key/value cache in preallocated buffers, written in place; transformers'
  DynamicCache copies the whole cache at every step (a fifth of the step).
- one pass for everything (`Engine._pass`): the pass is one sequence of tokens, the running rows'
  next tokens then the new prompts' tokens, and `_Slots.attend` (the model's attention while the
  engine owns it) keeps each row to its own cache. A prompt's prefill no longer stalls the batch
  for a forward of its own, which read all the weights again for ~30 tokens: at 16 clients of the
  load test the engine's time for 96 requests fell from 17.0 s (12.1 of steps, 4.9 of prefills) to
  15.3 s. (The same idea as the piggybacked prefills of Sarathi-Serve and vLLM's chunked prefill.)
- `_MixedLoRA`: every adapter's matrices stacked, two products per layer for the whole pass, each
  token gated to its own adapter; PEFT's mixed-adapter batches split the batch by adapter in every
  layer and set up hooks on every call (a third of the step).
- `_padded`: 9 to 15 tokens run as 16, and 4 to 15 rows of the vocabulary projection (faster
  matrix kernels).
- `PrefixCache`: each prompt is prefilled from the end of its task's shared prefix (the system
  prompt and tool list its prompts share, learnt from the prompts, at least `MIN_SHARED_PREFIX`
  tokens), copied into its row.

Rows of different lengths share the cache, right-aligned and left-padded (the attention mask hides
the padding); position ids count each row's real tokens, so every token keeps the position it
has when it generates alone. Answers are greedy, as `evaluate.generate`'s, and equal to them but
for float rounding: the same token's logits computed in a batch of another shape can differ in
the last bits, which changes an answer only where two tokens tie (tests check the sample prompts).

Trade-offs: a long prompt makes the pass it joins long (it is not split across passes); the
batch's cache grows to its longest row (padding columns are dropped once no row needs them); LoRA
dropout is off (inference); only plain LoRA adapters on models whose attention goes through
transformers' attention interface are batched (`supports`).

Constrained answers (`submit`'s `constraint`): a row's grammar masks its logits before its argmax, in
the pass that computes them, and its log-probability is taken under the mask (renormalised over the
allowed tokens), as `evaluate.generate` does; rows of different grammars and unconstrained rows share
the batch. The matcher is built in the submitting thread, off the engine's loop.

Raises, through the request's future: `BackendError("overloaded")` at submit when the queue is
full, `BackendError("backend_timeout")` when the request's deadline passes before its answer is
complete (waiting or generating), `BackendError("backend_error")` when a forward pass fails (every
request then in the engine fails with it). The server escalates all three to the upstream LLM.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer

from factory.constrain import Constraint, advance, mask_logits
from factory.evaluate.generate import Generation

# tokens: a shorter shared prefix is prefilled anew (reusing it saves less than the lookup's bookkeeping)
MIN_SHARED_PREFIX = 16


class BackendError(Exception):
    """A serving engine gave no answer; `reason` is the escalation reason ("backend_timeout",
    "backend_error", "overloaded")."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [batch, heads, length, head_dim]


@dataclass(eq=False)
class _Request:
    task: str
    ids: list[int]
    budget: int
    deadline: float
    future: Future = field(default_factory=Future)
    matcher: object = None  # the answer's grammar matcher (`Constraint.matcher`), None: unconstrained
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


def supports(model) -> bool:
    """Whether the engine can batch `model`: every adapter is plain LoRA on linear layers (what
    `_MixedLoRA` stacks: DoRA and the other variants, LoRA biases and `modules_to_save` are served one
    request at a time), and every layer keeps a plain growing cache (no sliding window or other
    per-layer cache types, which `_Slots` does not lay out). The model's attention layers must
    dispatch through transformers' attention interface, as its Llama, Qwen and Mistral families do."""
    return _MixedLoRA.supports(model) and \
        all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


class PrefixCache:
    """Per task: the token ids of the prefix its prompts share and their key/value cache (batch 1)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[list[int], KV]] = {}

    def lookup(self, task: str, ids: list[int]) -> tuple[int, KV | None]:
        """(shared length, cache of that many tokens) for a prompt; (0, None) when it shares less than
        MIN_SHARED_PREFIX tokens with the task's prefix. At least one prompt token is left to prefill."""
        entry = self._entries.get(task)
        if entry is None:
            return 0, None
        prefix, kv = entry
        shared = min(len(os.path.commonprefix([prefix, ids])), len(ids) - 1)
        if shared < MIN_SHARED_PREFIX:
            return 0, None
        return shared, [(k[:, :, :shared], v[:, :, :shared]) for k, v in kv]

    def learn(self, task: str, ids: list[int], kv: KV) -> None:
        """After a prefill of `ids` (whose full cache is `kv`): keep the part it shares with the task's prefix,
        or the whole prompt when the task has none yet or shares too little with it (the next prompt trims it)."""
        entry = self._entries.get(task)
        shared = len(os.path.commonprefix([entry[0], ids])) if entry else 0
        if entry and shared >= MIN_SHARED_PREFIX:
            if shared < len(entry[0]):
                self._entries[task] = (entry[0][:shared], [(k[:, :, :shared].clone(), v[:, :, :shared].clone())
                                                           for k, v in entry[1]])
            return
        self._entries[task] = (list(ids), [(k.clone(), v.clone()) for k, v in kv])


class _MixedLoRA:
    """Every task's LoRA adapter applied to a mixed batch in two matrix products per layer.

    PEFT's mixed-adapter batches (`adapter_names=`) split the batch by adapter in every LoRA layer and
    run each group apart: on this CPU that is a quarter of a 14-row decoding step. Here each layer's
    A matrices (and B matrices) of all tasks are stacked into one, and each row's share of the rank
    columns is kept by a gate holding its own adapter's scaling there and zero elsewhere:
    x A_all^T * gate B_all^T is the sum PEFT computes, with every row through its own adapter. While
    the engine runs, the model's adapter layers are disabled (PEFT's base-only forward, without the
    per-call hook setup `adapter_names` costs) and forward hooks on them add the stacked update while
    `rows` is set; `close` removes the hooks and enables the adapters again.

    Only plain LoRA on linear layers (`supports`): DoRA and the other variants, LoRA biases,
    fan-in-fan-out weights and other adapted module types are not batched (PEFT cannot mix DoRA
    adapters in a batch either).
    """

    def __init__(self, model, tasks: list[str]):
        self.tasks = tasks
        self.rows: torch.Tensor | None = None  # per token, its task's index in `tasks`, during a forward
        self._columns: list[tuple[torch.Tensor, torch.Tensor]] = []  # distinct (owner task, scaling) per rank column
        self._gates: dict[int, torch.Tensor] = {}  # for the current rows, per distinct columns
        self._hooks = []
        for module in _tuner_layers(model):
            names = [t for t in tasks if t in module.lora_A]
            a = torch.cat([module.lora_A[t].weight for t in names])  # [rank sum, in]
            b = torch.cat([module.lora_B[t].weight for t in names], dim=1)  # [out, rank sum]
            owner = torch.cat([torch.full((module.r[t],), tasks.index(t)) for t in names])
            scale = torch.cat([torch.full((module.r[t],), float(module.scaling[t])) for t in names]).to(a.dtype)
            columns = next((i for i, (o, sc) in enumerate(self._columns)
                            if torch.equal(o, owner) and torch.equal(sc, scale)), len(self._columns))
            if columns == len(self._columns):
                self._columns.append((owner, scale))
            self._hooks.append(module.register_forward_hook(self._hook(a.T.contiguous(), b.T.contiguous(), columns)))
        self._model = model
        model.base_model.disable_adapter_layers()

    @staticmethod
    def supports(model) -> bool:
        from peft.tuners.lora import Linear

        layers = _tuner_layers(model)
        extras = any(getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None)
                     or getattr(config, "bias", "none") != "none" for config in model.peft_config.values())
        return bool(layers) and not extras and all(
            type(m) is Linear and not m.lora_variant and not any(m.lora_bias.values()) and not m.fan_in_fan_out
            for m in layers)

    def set_rows(self, tasks: list[str] | None) -> None:
        """The tasks of the tokens of the next forward passes (a batch of one sequence); None: the hooks add
        nothing."""
        self.rows = None if tasks is None else torch.tensor([self.tasks.index(t) for t in tasks])
        self._gates = {}

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._model.base_model.enable_adapter_layers()

    def _hook(self, a: torch.Tensor, b: torch.Tensor, columns: int):
        def add_update(module, args, out):
            if self.rows is None:
                return out
            gate = self._gates.get(columns)
            if gate is None:
                owner, scale = self._columns[columns]
                gate = self._gates[columns] = ((owner == self.rows[:, None]) * scale).unsqueeze(0)
            return out + ((args[0].to(a.dtype) @ a) * gate @ b).to(out.dtype)

        return add_update


class _Slots:
    """The running batch's key/value cache, mask and position ids, and the attention of one forward pass.

    Per layer, keys and values live in buffers [row capacity, kv heads, column capacity, head_dim]:
    rows 0..n-1 are in use, columns start..end-1. Rows are right-aligned at `end` and left-padded
    to the batch's width (the mask hides the padding, whatever it holds). A forward pass writes
    column `end` of the running rows in place (their next token) and puts each joining prompt into
    a new slot, right-aligned at that same column; a leaving row's slot is refilled with the last
    row (rows have no order), and columns no row attends to any more are dropped from the left.
    Buffers are reallocated (one copy) only when rows or columns run out, with `SLACK` spare
    columns: copying the cache once per SLACK steps instead of at every step (transformers'
    DynamicCache `torch.cat`s it) saves a fifth of a 16-row step on this CPU.
    """

    SLACK = 64

    def __init__(self, max_rows: int, layers: int, heads: int, head_dim: int, dtype: torch.dtype):
        self.max_rows, self._shape, self._dtype = max_rows, (layers, heads, head_dim), dtype
        self.keys: list[torch.Tensor] = []  # per layer
        self.values: list[torch.Tensor] = []
        self.n = self.start = self.end = 0
        self.mask = torch.zeros(0, 0, dtype=torch.bool)  # [n, end - start]
        self.positions = torch.zeros(0, dtype=torch.long)  # the next token's position id, per row
        # the pass being run: the running rows' mask with the new column, and per joining prompt
        # (slot, first token's index in the pass, new tokens, prompt length, its causal mask)
        self._pass_mask = self.mask
        self._joins: list[tuple[int, int, int, int, torch.Tensor]] = []

    def plan(self, joins: list[tuple[int, int, int]], prefixes: list[KV | None]) -> None:
        """Make room for the next pass: the running rows' next token, and joining prompts given as
        (first token's index in the pass, tokens to compute, prompt length), each with the cache of its
        prompt's first length - tokens tokens (None when none is reused), which is copied into its slot."""
        width = max([self.end - self.start + 1] + [length for _, _, length in joins])
        self._reserve(self.n + len(joins), width - 1)
        if width - 1 > self.end - self.start:
            self.mask = torch.cat([self.mask.new_zeros(self.n, width - 1 - (self.end - self.start)), self.mask], 1)
            self.start = self.end - (width - 1)
        self._pass_mask = torch.cat([self.mask, self.mask.new_ones(self.n, 1)], 1)[:, None, None, :]
        self._joins = [(self.n + j, first, new, length, torch.ones(new, length, dtype=torch.bool).tril(length - new))
                       for j, (first, new, length) in enumerate(joins)]
        for (slot, _, new, length, _), kv in zip(self._joins, prefixes):
            if kv is not None:
                column = self.end + 1 - length
                for keys, values, (k, v) in zip(self.keys, self.values, kv):
                    keys[slot, :, column:column + length - new] = k[0]
                    values[slot, :, column:column + length - new] = v[0]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        """One layer's attention for the pass `plan` laid out: `query`, `key`, `value` [1, heads, tokens,
        head_dim] hold the running rows' next tokens (first n), then each joining prompt's new tokens,
        then padding. Writes the keys and values into the cache; returns [1, tokens, heads, head_dim]
        (padding tokens get zeros). Running rows attend together over the batch's columns; each joining
        prompt causally over its own slot."""
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        keys, values, n, end = self.keys[layer], self.values[layer], self.n, self.end
        out = query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])
        if n:
            keys[:n, :, end], values[:n, :, end] = key[0, :, :n].transpose(0, 1), value[0, :, :n].transpose(0, 1)
            rows = sdpa(query[0, :, :n].transpose(0, 1).unsqueeze(2), keys[:n, :, self.start:end + 1],
                        values[:n, :, self.start:end + 1], attn_mask=self._pass_mask, scale=scale, enable_gqa=True)
            out[0, :n] = rows[:, :, 0]
        for slot, first, new, length, causal in self._joins:
            tokens = slice(first, first + new)
            keys[slot, :, end + 1 - new:end + 1] = key[0, :, tokens]
            values[slot, :, end + 1 - new:end + 1] = value[0, :, tokens]
            prompt = sdpa(query[:, :, tokens], keys[slot:slot + 1, :, end + 1 - length:end + 1],
                          values[slot:slot + 1, :, end + 1 - length:end + 1], attn_mask=causal, scale=scale,
                          enable_gqa=True)
            out[0, tokens] = prompt[0].transpose(0, 1)
        return out

    def prompt_cache(self, join: int) -> KV:
        """The `join`-th joining prompt's cache after its pass (views of the buffers), before `advance`."""
        slot, _, _, length, _ = self._joins[join]
        columns = slice(self.end + 1 - length, self.end + 1)
        return [(k[slot:slot + 1, :, columns], v[slot:slot + 1, :, columns]) for k, v in zip(self.keys, self.values)]

    def advance(self) -> None:
        """After a pass: its column is part of every running row, and the joining prompts are running rows."""
        width = self.end + 1 - self.start
        joined = torch.zeros(len(self._joins), width, dtype=torch.bool)
        for j, (_, _, _, length, _) in enumerate(self._joins):
            joined[j, width - length:] = True
        self.mask = torch.cat([self._pass_mask[:, 0, 0], joined])
        self.positions = torch.cat([self.positions + 1, torch.tensor([j[3] for j in self._joins], dtype=torch.long)])
        self.n, self.end, self._joins = self.n + len(self._joins), self.end + 1, []

    def keep(self, rows: list[int]) -> list[int]:
        """Keep only `rows` (ascending); returns the kept rows' old indices in their new slot order."""
        order, tail = list(range(len(rows))), [i for i in rows if i >= len(rows)]
        kept = set(rows)
        for slot in range(len(rows)):
            order[slot] = slot if slot in kept else tail.pop()
        for slot, old in enumerate(order):
            if old != slot:
                for buffer in (*self.keys, *self.values):
                    buffer[slot, :, self.start:self.end] = buffer[old, :, self.start:self.end]
        index = torch.tensor(order, dtype=torch.long)
        self.n, self.mask, self.positions = len(rows), self.mask[index], self.positions[index]
        used = self.mask.any(0).nonzero()  # drop the columns no remaining row attends to
        trim = int(used[0]) if len(used) else self.mask.shape[1]
        self.mask, self.start = self.mask[:, trim:], self.start + trim
        return order

    def _reserve(self, rows: int, width: int) -> None:
        """Make room for `rows` rows and `width` columns ending at `end`, plus the column `end` itself."""
        if self.keys and rows <= self.keys[0].shape[0] and width <= self.end < self.keys[0].shape[2]:
            return
        capacity = min(self.max_rows, max(rows, 2 * self.keys[0].shape[0] if self.keys else 4))
        used = self.end - self.start
        layers, heads, head_dim = self._shape

        def grown(buffer: torch.Tensor | None) -> torch.Tensor:
            new = torch.zeros(capacity, heads, width + 1 + self.SLACK, head_dim, dtype=self._dtype)
            if buffer is not None:
                new[:self.n, :, width - used:width] = buffer[:self.n, :, self.start:self.end]
            return new

        self.keys = [grown(b) for b in (self.keys or [None] * layers)]
        self.values = [grown(b) for b in (self.values or [None] * layers)]
        self.start, self.end = width - used, width


class Engine:
    """Continuous batching of greedy generation on one PEFT model (see the module docstring).

    `model` is a PeftModel holding every task's adapter under the task's name, one that `supports`
    accepts (else ValueError); `max_batch` rows decode together; `max_queue` requests may wait;
    `timeout` seconds bound a request from submit to answer. The engine owns the model until
    `close`: its adapters are disabled (`_MixedLoRA` adds them) and its attention is `_Slots.attend`.
    """

    def __init__(self, model, tokenizer, max_batch: int = 32, max_queue: int = 256, timeout: float = 60.0):
        if not supports(model):
            raise ValueError("the engine cannot batch this model (see `supports`): serve it one request at a time")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.timeout = max_batch, max_queue, timeout
        self.eos = tokenizer.eos_token_id
        self.prefixes = PrefixCache()
        self._lora = _MixedLoRA(model, list(model.peft_config))
        self._attention, model.config._attn_implementation = model.config._attn_implementation, ATTENTION
        self._waiting: deque[_Request] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        # the running batch: its requests, in the order of their rows in `_slots`
        self._rows: list[_Request] = []
        self._slots = self._new_slots()
        self._thread = threading.Thread(target=self._loop, name="factory-engine", daemon=True)
        self._thread.start()

    def submit(self, task: str, ids: list[int], budget: int, constraint: Constraint | None = None) -> Future:
        """Queue a prompt (token ids) for `task`'s adapter, its answer following `constraint` (None:
        unconstrained); the future's result is a `Generation`. Raises BackendError("overloaded") when
        `max_queue` requests are already waiting."""
        matcher = None if constraint is None else \
            constraint.matcher(self.tokenizer, self.model.config.get_text_config().vocab_size)
        request = _Request(task, list(ids), budget, time.monotonic() + self.timeout, matcher=matcher)
        with self._wake:
            if self._stopped:
                raise BackendError("backend_error", "the serving engine is stopped")
            if len(self._waiting) >= self.max_queue:
                raise BackendError("overloaded", f"{len(self._waiting)} requests are waiting for the specialists "
                                                 f"(the queue holds {self.max_queue})")
            self._waiting.append(request)
            self._wake.notify()
        return request.future

    def close(self) -> None:
        """Stop the loop; requests not answered yet fail with BackendError."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join()
        self._lora.close()
        self.model.config._attn_implementation = self._attention

    def _new_slots(self) -> _Slots:
        config = self.model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return _Slots(self.max_batch, config.num_hidden_layers, config.num_key_value_heads, head_dim,
                      self.model.dtype)

    # -- the loop (engine thread only) --

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopped and not self._waiting and not self._rows:
                        self._wake.wait()
                    if self._stopped:
                        break
                    joining = self._admit()
                try:
                    if joining or self._rows:  # (every waiting request may have expired)
                        self._pass(joining)
                except Exception as err:  # a failing forward must not leave callers waiting forever
                    self._fail_all(BackendError("backend_error", f"generation failed: {type(err).__name__}: {err}"),
                                   joining)
        self._fail_all(BackendError("backend_error", "the serving engine stopped"))

    def _admit(self) -> list[_Request]:
        """Pop the waiting requests the batch has room for, oldest first; expired ones fail."""
        joining, now = [], time.monotonic()
        while self._waiting and len(self._rows) + len(joining) < self.max_batch:
            request = self._waiting.popleft()
            if now > request.deadline:
                _timed_out(request, self.timeout)
            else:
                joining.append(request)
        return joining

    def _pass(self, joining: list[_Request]) -> None:
        """One forward pass: the running rows' next token, and the joining prompts' prefill, each from the end
        of its task's cached prefix, all as one sequence of tokens (the weights are read once for all of
        them; `_Slots.attend` keeps each row's attention to its own cache). Then the joining requests
        are running rows with their first token, and the rows that are done retire."""
        found = [self.prefixes.lookup(r.task, r.ids) for r in joining]
        ids = [r.tokens[-1] for r in self._rows]
        positions, tasks = self._slots.positions.tolist(), [r.task for r in self._rows]
        keep, joins = list(range(len(ids))), []
        for request, (shared, _) in zip(joining, found):
            joins.append((len(ids), len(request.ids) - shared, len(request.ids)))
            ids += request.ids[shared:]
            positions += range(shared, len(request.ids))
            tasks += [request.task] * (len(request.ids) - shared)
            keep.append(len(ids) - 1)
        padding = _padded(len(ids)) - len(ids)
        self._slots.plan(joins, [kv for _, kv in found])
        tokens, logprobs = self._forward(torch.tensor([ids + [self.eos] * padding]),
                                         torch.tensor([positions + [0] * padding]),
                                         tasks + tasks[-1:] * padding, torch.tensor(keep),
                                         [r.matcher for r in self._rows + joining])
        for j, request in enumerate(joining):
            self.prefixes.learn(request.task, request.ids, self._slots.prompt_cache(j))
        self._slots.advance()
        self._rows += joining
        for i, (token, logprob) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
            self._record(i, token, logprob)
        self._retire()

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, tasks: list[str], keep: torch.Tensor,
                 matchers: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The model on one sequence of tokens [1, tokens] laid out by `_slots.plan`, each token through its
        task's adapter; (chosen token, its log-probability) at the positions `keep`, each under its row's
        grammar matcher (`matchers`, None: unconstrained). 4 to 15 positions
        are padded to 16 (`_padded`): the vocabulary projection of 12 positions costs 14 ms here, of 16
        positions 5 ms."""
        rows = len(keep)
        keep = torch.cat([keep, keep[-1:].expand(_padded(rows, 3) - rows)])
        self._lora.set_rows(tasks)
        _active.slots = self._slots
        try:
            logits = self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=keep).logits
        finally:
            _active.slots = None
            self._lora.set_rows(None)
        scores = mask_logits(logits[0, :rows].float(), matchers)
        best, tokens = scores.max(-1)
        return tokens, best - scores.logsumexp(-1)

    def _record(self, row: int, token: int, logprob: float) -> None:
        request = self._rows[row]
        advance(request.matcher, token)
        request.tokens.append(token)
        request.logprobs.append(logprob)

    def _retire(self) -> None:
        """Answer the rows that are done, fail the expired ones, and drop both from the batch."""
        keep, now = [], time.monotonic()
        for i, request in enumerate(self._rows):
            if request.tokens[-1] == self.eos or len(request.tokens) >= request.budget:
                request.future.set_result(self._generation(request))
            elif now > request.deadline:
                _timed_out(request, self.timeout)
            else:
                keep.append(i)
        if len(keep) < len(self._rows):
            self._rows = [self._rows[i] for i in self._slots.keep(keep)]

    def _generation(self, request: _Request) -> Generation:
        return Generation.of(self.tokenizer.decode(request.tokens, skip_special_tokens=True), request.logprobs)

    def _fail_all(self, error: BackendError, joining: list[_Request] = ()) -> None:
        """Fail every request not answered: waiting, running and `joining` (popped from the queue, not running yet)."""
        with self._wake:
            pending = list(self._waiting) + self._rows + list(joining)
            self._waiting.clear()
        self._rows, self._slots = [], self._new_slots()
        for request in pending:
            if not request.future.done():
                request.future.set_exception(error)


def single_threaded(fn):
    """`fn` with torch on one thread, for the torch work a serving process does outside the engines
    (the router's embeddings, at startup and in request threads). A thread that runs torch on several
    threads gets an OpenMP thread team of its own, and with a second team in the process (libgomp)
    every engine step is slower for the life of the process: in `factory serve` on this machine,
    after one request took the embedding fallback, a step took 98 ms instead of 41."""

    def wrapped(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # this thread only (and the default of threads started meanwhile)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapped


def _padded(rows: int, above: int = 8) -> int:
    """`rows` padded to 16 when it is more than `above` and less than 16. Matrix products with fewer than 16
    rows take slower kernels here (MKL on AVX-512), whose time grows with the rows: a 14-row step of
    SmolLM2-135M cost 91 ms, a 16-row one 77 ms. (Batch-size buckets, as vLLM pads batches to its
    captured graph sizes.)"""
    return 16 if above < rows < 16 else rows


def _attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention of a model an engine runs (`ATTENTION`): its thread's `_Slots.attend`; (output, no
    weights) as transformers' attention functions return."""
    slots = getattr(_active, "slots", None)
    if slots is None:
        raise RuntimeError("this model is owned by a serving engine: only the engine's thread may run it")
    return slots.attend(module.layer_idx, query, key, value, scaling), None


ATTENTION = "factory_engine"
AttentionInterface.register(ATTENTION, _attend)
_active = threading.local()  # .slots: the pass the engine running in this thread lays out


def _tuner_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _timed_out(request: _Request, timeout: float) -> None:
    request.future.set_exception(BackendError("backend_timeout", f"no answer within {timeout:g} s"))
