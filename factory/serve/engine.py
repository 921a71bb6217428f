"""The in-process serving engine: concurrent requests, of any tasks sharing a base, decoded together.

One thread owns the model. Requests wait in a bounded FIFO queue; at every decoding step the
engine admits waiting requests (oldest first) into the running batch, up to `max_batch` rows,
runs one forward pass for all running rows, each row through its own task's LoRA adapter, and
retires the rows that produced the end-of-sequence token or used their budget. That is
continuous batching: a request joins the batch at the next step instead of waiting for the batch
to finish, so a short answer is not held up by a long one, and the queue is served in arrival
order (nothing starves).

Where the time went, and what each part below saves (SmolLM2-135M, fp32, this 2-core CPU, 14 rows
of ~130 tokens; the weights are read once per forward whatever the rows, so a step of 14 rows
costs about twice a step of one):
- `_Slots`: the batch's key/value cache in preallocated buffers, written in place; transformers'
  DynamicCache copies the whole cache at every step (a fifth of the step).
- `_MixedLoRA`: every adapter's matrices stacked, two products per layer for the whole batch;
  PEFT's mixed-adapter batches split the batch by adapter in every layer and set up hooks on
  every call (a third of the step).
- `_padded`: 9 to 15 rows run as 16 (faster matrix kernels).
- `_join`: the prompts admitted at one step are prefilled in one forward pass; each from the end of
  its task's shared prefix (`PrefixCache`: the system prompt and tool list its prompts share,
  learnt from the prompts, at least `MIN_SHARED_PREFIX` tokens).

Rows of different lengths share the cache, left-aligned by padding that the attention mask hides;
position ids count each row's real tokens, so every token keeps the position it has when it
generates alone. Answers are greedy, as `evaluate.generate`'s, and equal to them but for float
rounding: the same token's logits computed in a batch of another shape can differ in the last
bits, which changes an answer only where two tokens tie (tests check the sample prompts).

Trade-offs: a prefill stalls the running rows' next step; the batch's cache grows to its longest
row (padding columns are dropped once no row needs them); LoRA dropout is off (inference).

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
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

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
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


def supports(model) -> bool:
    """Whether the engine can batch `model`: every layer keeps a plain growing cache (no sliding
    window or other per-layer cache types, which its padding scheme does not handle), and no
    adapter is DoRA (PEFT cannot mix DoRA adapters in a batch, nor can `_MixedLoRA`)."""
    dora = any(any(getattr(m, "use_dora", {}).values()) for m in _tuner_layers(model))
    return not dora and all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


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
    fan-in-fan-out weights and other adapted module types keep PEFT's own path.
    """

    def __init__(self, model, tasks: list[str]):
        self.tasks = tasks
        self.rows: torch.Tensor | None = None  # per row, its task's index in `tasks`, during a forward
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
        """The rows' tasks for the next forward passes; None: the hooks add nothing."""
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
                gate = self._gates[columns] = ((owner == self.rows[:, None]) * scale).unsqueeze(1)
            return out + ((args[0].to(a.dtype) @ a) * gate @ b).to(out.dtype)

        return add_update


class _SlotLayer(DynamicLayer):
    """One layer's view of the running batch's cache for a decoding step: the new token's keys and
    values are written into the preallocated buffers' next column, where DynamicLayer would copy the
    whole cache (`torch.cat`) at every step."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int, start: int, end: int):
        super().__init__()
        self._buffers, self._rows, self._start, self._end = (keys, values), rows, start, end
        self.keys, self.values = keys[:rows, :, start:end], values[:rows, :, start:end]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self._end + key_states.shape[-2]
        keys, values = self._buffers
        keys[:self._rows, :, self._end:end] = key_states
        values[:self._rows, :, self._end:end] = value_states
        self.keys, self.values = keys[:self._rows, :, self._start:end], values[:self._rows, :, self._start:end]
        return self.keys, self.values


class _Slots:
    """The running batch's key/value cache, mask and position ids.

    Per layer, keys and values live in buffers [row capacity, heads, column capacity, head_dim]: rows
    0..n-1 are in use, columns start..end. Rows are left-padded to the batch's width (the mask hides the
    padding, whatever it holds). A decoding step writes column `end` in place; a joining row is
    written into slot n, right-aligned at `end`; a leaving row's slot is refilled with the last row
    (rows have no order), and columns no row attends to any more are dropped from the left. Buffers are
    reallocated (one copy) only when rows or columns run out, with `SLACK` spare columns: copying the
    cache once per SLACK steps instead of at every step saves a fifth of a 16-row step on this CPU.
    """

    SLACK = 64

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.keys: list[torch.Tensor] = []  # per layer
        self.values: list[torch.Tensor] = []
        self.n = self.start = self.end = 0
        self.mask = self._next_mask = torch.zeros(0, 0, dtype=torch.long)  # [n, end - start]
        self.positions = torch.zeros(0, dtype=torch.long)  # the next token's position id, per row

    def step(self, rows: int) -> tuple[list[_SlotLayer], torch.Tensor, torch.Tensor]:
        """(cache layers, attention mask, position ids) for the next decoding step of `rows` >= n rows;
        `advance` after it. Rows past n are padding: each attends to its own new column only (so its
        attention stays finite) and its output is dropped."""
        self._reserve(rows, self.end - self.start, 1)
        mask = torch.zeros(rows, self.end - self.start + 1, dtype=torch.long)
        mask[:self.n, :-1], mask[:, -1] = self.mask, 1
        positions = torch.cat([self.positions, torch.zeros(rows - self.n, dtype=torch.long)])
        self._next_mask = mask[:self.n]
        layers = [_SlotLayer(k, v, rows, self.start, self.end) for k, v in zip(self.keys, self.values)]
        return layers, mask, positions.unsqueeze(1)

    def advance(self) -> None:
        """After a decoding step: its column is part of every row."""
        self.end, self.mask = self.end + 1, self._next_mask
        self.positions = self.positions + 1

    def add(self, kv: KV, length: int) -> None:
        """Put a prefilled row (the cache of its `length` prompt tokens) into slot n."""
        width = max(self.end - self.start, length)
        self._reserve(self.n + 1, width, 0, like=kv)
        if width > self.end - self.start:
            self.mask = torch.cat([self.mask.new_zeros(self.n, width - (self.end - self.start)), self.mask], dim=1)
            self.start = self.end - width
        for (keys, values), (k, v) in zip(zip(self.keys, self.values), kv):
            keys[self.n, :, self.end - length:self.end] = k[0]
            values[self.n, :, self.end - length:self.end] = v[0]
        row = torch.zeros(1, width, dtype=torch.long)
        row[0, width - length:] = 1
        self.mask = torch.cat([self.mask, row])
        self.positions = torch.cat([self.positions, torch.tensor([length])])
        self.n += 1

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

    def _reserve(self, rows: int, width: int, extra: int, like: KV | None = None) -> None:
        """Make room for `rows` rows and `width` columns ending at `end`, plus `extra` columns after it;
        the first allocation takes its layers, heads, head size and dtype from `like`."""
        if self.keys and rows <= self.keys[0].shape[0] and width <= self.end \
                and self.end + extra <= self.keys[0].shape[2]:
            return
        capacity = min(self.max_rows, max(rows, 2 * self.keys[0].shape[0] if self.keys else 4))
        used = self.end - self.start

        def grown(buffer: torch.Tensor) -> torch.Tensor:
            new = buffer.new_zeros(capacity, buffer.shape[1], width + extra + self.SLACK, buffer.shape[3])
            new[:self.n, :, width - used:width] = buffer[:self.n, :, self.start:self.end]
            return new

        keys, values = (self.keys, self.values) if self.keys else ([k for k, _ in like], [v for _, v in like])
        self.keys, self.values = [grown(b) for b in keys], [grown(b) for b in values]
        self.start, self.end = width - used, width


class Engine:
    """Continuous batching of greedy generation on one PEFT model (see the module docstring).

    `model` is a PeftModel holding every task's adapter under the task's name; `max_batch` rows decode
    together; `max_queue` requests may wait; `timeout` seconds bound a request from submit to answer.
    """

    def __init__(self, model, tokenizer, max_batch: int = 32, max_queue: int = 256, timeout: float = 60.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.timeout = max_batch, max_queue, timeout
        self.eos = tokenizer.eos_token_id
        self.prefixes = PrefixCache()
        self._lora = _MixedLoRA(model, list(model.peft_config)) if _MixedLoRA.supports(model) else None
        self._waiting: deque[_Request] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        # the running batch: its requests, in the order of their rows in `_slots`
        self._rows: list[_Request] = []
        self._slots = _Slots(max_batch)
        self._thread = threading.Thread(target=self._loop, name="factory-engine", daemon=True)
        self._thread.start()

    def submit(self, task: str, ids: list[int], budget: int) -> Future:
        """Queue a prompt (token ids) for `task`'s adapter; the future's result is a `Generation`.
        Raises BackendError("overloaded") when `max_queue` requests are already waiting."""
        request = _Request(task, list(ids), budget, time.monotonic() + self.timeout)
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
        if self._lora is not None:
            self._lora.close()

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
                    if joining:
                        self._join(joining)
                    if self._rows:
                        self._step()
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

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Cache,
                 tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass; (chosen token, its log-probability) per row from the last position."""
        inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                      logits_to_keep=1)
        if self._lora is None:
            out = self.model(**inputs, adapter_names=tasks)
        else:
            self._lora.set_rows(tasks)
            try:
                out = self.model(**inputs)
            finally:
                self._lora.set_rows(None)
        logprobs = out.logits[:, -1].float().log_softmax(-1)
        return logprobs.argmax(-1), logprobs.max(-1).values

    def _join(self, requests: list[_Request]) -> None:
        """Prefill the joining prompts together, each from its task's cached prefix, and add them to the
        running batch. A row is laid out [padding][cached prefix][padding][new tokens]: the prefixes
        right-aligned to the longest, the new tokens to the longest rest; the mask hides the padding
        and position ids count each row's real tokens. One forward for several prompts reads the
        weights once (a two-prompt prefill costs 1.3 single ones here); the padding is the price."""
        found = [self.prefixes.lookup(r.task, r.ids) for r in requests]
        cached = max(shared for shared, _ in found)
        new = max(len(r.ids) - shared for r, (shared, _) in zip(requests, found))
        ids = torch.full((len(requests), new), self.eos)
        mask = torch.zeros(len(requests), cached + new, dtype=torch.long)
        positions = torch.zeros(len(requests), new, dtype=torch.long)
        for i, (request, (shared, _)) in enumerate(zip(requests, found)):
            rest = len(request.ids) - shared
            ids[i, new - rest:] = torch.tensor(request.ids[shared:])
            mask[i, cached - shared:cached] = mask[i, cached + new - rest:] = 1
            positions[i, new - rest:] = torch.arange(shared, len(request.ids))
        cache = DynamicCache(config=self.model.config)
        if cached:
            template = next(kv for _, kv in found if kv)
            for index, layer in enumerate(cache.layers):
                keys, values = (t.new_zeros(len(requests), t.shape[1], cached, t.shape[3]) for t in template[index])
                for i, (shared, kv) in enumerate(found):
                    if shared:
                        keys[i, :, cached - shared:], values[i, :, cached - shared:] = kv[index][0][0], kv[index][1][0]
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
        tokens, logprobs = self._forward(ids, mask, positions, cache, [r.task for r in requests])
        for i, request in enumerate(requests):
            columns = mask[i].nonzero().squeeze(1)
            kv = [(layer.keys[i:i + 1, :, columns], layer.values[i:i + 1, :, columns]) for layer in cache.layers]
            self.prefixes.learn(request.task, request.ids, kv)
            self._slots.add(kv, len(request.ids))
            self._rows.append(request)
            self._record(len(self._rows) - 1, int(tokens[i]), float(logprobs[i]))
        self._retire()

    def _step(self) -> None:
        """One decoding step for every running row."""
        rows = _padded(len(self._rows), self.max_batch)
        padding = rows - len(self._rows)
        last = torch.tensor([[r.tokens[-1]] for r in self._rows] + [[self.eos]] * padding)
        layers, mask, positions = self._slots.step(rows)
        cache = Cache(layers=layers)  # not DynamicCache(config=...): it would build layers only to drop them
        tokens, logprobs = self._forward(last, mask, positions, cache,
                                         [r.task for r in self._rows] + [self._rows[0].task] * padding)
        self._slots.advance()
        for i, (token, logprob) in enumerate(zip(tokens[:len(self._rows)].tolist(), logprobs.tolist())):
            self._record(i, token, logprob)
        self._retire()

    def _record(self, row: int, token: int, logprob: float) -> None:
        request = self._rows[row]
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
        self._rows, self._slots = [], _Slots(self.max_batch)
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


def _padded(rows: int, limit: int) -> int:
    """The rows a decoding step runs: 9 to 15 rows are padded to 16 (when `limit` allows). Matrix products with fewer than
    16 rows take slower kernels here (MKL on AVX-512): a 14-row step of SmolLM2-135M costs 91 ms,
    a 16-row one 77 ms. (Batch-size buckets, as vLLM pads batches to its captured graph sizes.)"""
    return 16 if 8 < rows < 16 <= limit else rows


def _tuner_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _timed_out(request: _Request, timeout: float) -> None:
    request.future.set_exception(BackendError("backend_timeout", f"no answer within {timeout:g} s"))
