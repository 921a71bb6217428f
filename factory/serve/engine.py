"""The in-process serving engine: concurrent requests, of any tasks sharing a base, decoded together.

One thread owns the model. Requests wait in a bounded FIFO queue; at every decoding step the
engine admits waiting requests (oldest first) into the running batch, up to `max_batch` rows,
runs one forward pass for all running rows, each row through its own task's LoRA adapter
(PEFT's mixed-adapter batches: `adapter_names=` in the forward), and retires the rows that
produced the end-of-sequence token or used their budget. That is continuous batching: a request
joins the batch at the next step instead of waiting for the batch to finish, so a short answer
is not held up by a long one, and the queue is served in arrival order (nothing starves).

Rows of different lengths share one key/value cache, left-aligned by padding that the attention
mask hides; position ids count each row's real tokens, so every token keeps the position it has
when it generates alone. A joining row is prefilled apart (CPU prefill is compute-bound: batching
prompts saves little) and its cache padded into the batch's.

Shared prefix (`PrefixCache`): the prompts of a task start with the same system prompt and tool
list. The engine keeps, per task, the key/value cache of the longest prefix its recent prompts
share (at least `MIN_SHARED_PREFIX` tokens; learnt from the prompts themselves, so it needs no
knowledge of the chat template) and prefills a new request from the end of that prefix. The cache
is per task, not per base, because the adapter changes the keys and values of every token.

Trade-offs: a joining row's prefill stalls the running rows' next step (one prompt at a time);
the batch's cache grows to its longest row, and padding columns are dropped once no row needs
them. Answers are greedy, as `evaluate.generate`'s, and equal to them but for float rounding:
the same token's logits computed in a batch of another shape can differ in the last bits, which
changes an answer only where two tokens tie (a test checks the sample prompts).

Raises, through the request's future: `BackendError("overloaded")` at submit when the queue is
full, `BackendError("backend_timeout")` when the request's deadline passes before its answer is
complete (waiting or generating). The server escalates both to the upstream LLM.
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
from transformers.cache_utils import DynamicLayer

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
    window or other per-layer cache types, which its padding scheme does not handle)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


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


class Engine:
    """Continuous batching of greedy generation on one PEFT model (see the module docstring).

    `model` is a PeftModel holding every task's adapter under the task's name; `max_batch` rows decode
    together; `max_queue` requests may wait; `timeout` seconds bound a request from submit to answer.
    """

    def __init__(self, model, tokenizer, max_batch: int = 32, max_queue: int = 256, timeout: float = 60.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.timeout = max_batch, max_queue, timeout
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.prefixes = PrefixCache()
        self._waiting: deque[_Request] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        # the running batch
        self._rows: list[_Request] = []
        self._kv: KV = []
        self._mask = torch.zeros(0, 0, dtype=torch.long)
        self._positions = torch.zeros(0, dtype=torch.long)  # the next token's position id, per row
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
                    for request in joining:
                        self._join(request)
                    if self._rows:
                        self._step()
                except Exception as err:  # a failing forward must not leave callers waiting forever
                    self._fail_all(BackendError("backend_error", f"generation failed: {type(err).__name__}: {err}"))
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

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, kv: KV,
                 tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor, KV]:
        """One forward pass; (chosen token, its log-probability) per row from the last position, and the cache."""
        cache = DynamicCache(config=self.model.config)
        for layer, (keys, values) in zip(cache.layers, kv):  # adopted as they are: `update` would copy them
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=1, adapter_names=tasks)
        logprobs = out.logits[:, -1].float().log_softmax(-1)
        chosen, values = logprobs.argmax(-1), logprobs.max(-1).values
        return chosen, values, [(layer.keys, layer.values) for layer in cache.layers]

    def _join(self, request: _Request) -> None:
        """Prefill one prompt (from its task's cached prefix) and add it to the running batch."""
        shared, prefix_kv = self.prefixes.lookup(request.task, request.ids)
        rest = request.ids[shared:]
        ids = torch.tensor([rest])
        mask = torch.ones(1, len(request.ids), dtype=torch.long)
        positions = torch.arange(shared, len(request.ids)).unsqueeze(0)
        token, logprob, kv = self._forward(ids, mask, positions, prefix_kv or [], [request.task])
        self.prefixes.learn(request.task, request.ids, kv)
        self._add_row(request, kv, len(request.ids))
        self._record(len(self._rows) - 1, int(token[0]), float(logprob[0]))
        self._retire()

    def _add_row(self, request: _Request, kv: KV, length: int) -> None:
        width = self._mask.shape[1]
        if self._rows and length > width:  # the batch's rows gain left padding
            self._kv = [(_pad_left(k, length - width), _pad_left(v, length - width)) for k, v in self._kv]
            self._mask = _pad_left(self._mask, length - width)
            width = length
        row_mask = torch.ones(1, length, dtype=torch.long)
        if self._rows:
            kv = [(_pad_left(k, width - length), _pad_left(v, width - length)) for k, v in kv]
            self._kv = [(torch.cat([bk, k]), torch.cat([bv, v])) for (bk, bv), (k, v) in zip(self._kv, kv)]
            self._mask = torch.cat([self._mask, _pad_left(row_mask, width - length)])
        else:
            self._kv, self._mask = kv, row_mask
        self._rows.append(request)
        self._positions = torch.cat([self._positions, torch.tensor([length])])

    def _step(self) -> None:
        """One decoding step for every running row."""
        last = torch.tensor([[r.tokens[-1]] for r in self._rows])
        self._mask = torch.cat([self._mask, torch.ones(len(self._rows), 1, dtype=torch.long)], dim=1)
        tokens, logprobs, self._kv = self._forward(last, self._mask, self._positions.unsqueeze(1), self._kv,
                                                   [r.task for r in self._rows])
        self._positions += 1
        for i, (token, logprob) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
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
        if len(keep) == len(self._rows):
            return
        index = torch.tensor(keep, dtype=torch.long)
        self._rows = [self._rows[i] for i in keep]
        self._positions = self._positions[index]
        self._mask = self._mask[index]
        # columns no remaining row attends to (the left padding of the longest rows that left)
        used = self._mask.any(0).nonzero()
        start = int(used[0]) if len(used) else self._mask.shape[1]
        self._mask = self._mask[:, start:]
        self._kv = [(k[index, :, start:], v[index, :, start:]) for k, v in self._kv]

    def _generation(self, request: _Request) -> Generation:
        return Generation.of(self.tokenizer.decode(request.tokens, skip_special_tokens=True), request.logprobs)

    def _fail_all(self, error: BackendError) -> None:
        with self._wake:
            pending = list(self._waiting) + self._rows
            self._waiting.clear()
        self._rows, self._kv = [], []
        self._mask, self._positions = torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        for request in pending:
            if not request.future.done():
                request.future.set_exception(error)


def _pad_left(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """`tensor` with `n` zero columns before its sequence axis (dim 2 of a cache, dim 1 of a mask)."""
    if n <= 0:
        return tensor
    dim = 2 if tensor.dim() == 4 else 1
    shape = list(tensor.shape)
    shape[dim] = n
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _timed_out(request: _Request, timeout: float) -> None:
    request.future.set_exception(BackendError("backend_timeout", f"no answer within {timeout:g} s"))
