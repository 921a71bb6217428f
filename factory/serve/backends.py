"""Where the specialists' answers are generated: in this process, or by a vLLM or llama.cpp server.

`factory serve --backend local` (the default) generates in-process (`specialists.Specialists`).
`--backend vllm --backend-url URL` and `--backend llamacpp --backend-url URL` ask a serving engine
for the answer and its token log-probabilities instead; the router keeps matching, the
confidence threshold and escalation. Both remote backends get the same input as local
generation: the conversation rendered and shortened by `factory.chat` with the base's
tokenizer (`specialists.fit_request`), sent as token ids. A string prompt would be tokenized
again by the server, which adds a BOS token where the model's metadata asks for one
(llama.cpp's README on `prompt`; vLLM's `add_special_tokens` defaults to true), and the local
path does not. Decoding is greedy (`temperature: 0`), and the confidence is `evaluate.generate`'s:
the geometric mean of the chosen tokens' probabilities, over the tokens the server reports (zero
for an empty answer); an unusable answer still escalates through `router.decide`, and the
calibration map maps it from zero as evaluation did. So the task's certified threshold applies.
Not verified against live servers (none run here): whether each engine reports the
end-of-sequence token's log-probability, which the local path counts; if it does not, the mean
covers one token fewer.

vLLM (`POST {URL}/v1/completions`, OpenAI's completions API): `model` is the task's LoRA
name as `--lora-modules task=path` registered it, `logprobs: 1`; read back
`choices[0].text`, `choices[0].logprobs.token_logprobs` (the chosen tokens' log-probs;
vLLM reports raw model log-probs by default, as `_ChosenLogprobs` records them); the
completion's token count is the number of log-probs.

llama.cpp (`POST {URL}/completion`, llama-server's native endpoint, as
`factory routes --export llamacpp` configures the server: one base GGUF, every adapter loaded
at scale 0 by `--lora-scaled`, ids in the order of the exported tasks sharing the base, that
is sorted by name): `"lora": [{"id": i, "scale": 1.0}]` turns the task's adapter on for
this request only (its README: "If a LoRA adapter is not specified in the list, its scale
will default to 0.0"), `n_probs: 1`, `repeat_penalty: 1.0` (older builds default to 1.1,
which greedy local decoding does not apply). Read back, as tools/server/README.md of
ggml-org/llama.cpp documents the response: `content`, `completion_probabilities[*].logprob`
(the chosen token's log-probability, computed "via a simple softmax of the logits without
considering any other sampler settings" unless `post_sampling_probs` is set, which is not).
(The README's example names that list `probs`; its text and the server name it
`completion_probabilities`.)

Constrained answers: where the route's kind has a grammar (`specialists.route_constraint`), the request
carries its GBNF text, as each engine takes a grammar: vLLM's `structured_outputs: {"grammar": ...}`
(vLLM's structured-outputs API since 0.10.2; the `guided_grammar` field it replaced was removed in
0.12.0; either of vLLM's grammar backends, xgrammar or guidance, reads GBNF), and llama-server's
`grammar`. The log-probabilities both report are the model's before the grammar's mask (vLLM's default
`--logprobs-mode raw_logprobs`; llama.cpp's plain softmax, as above), not renormalised over the
allowed tokens as the local engine's are: a remote answer's confidence is at most what the local path
reports for the same answer, so it escalates at least as often.

Failures: a timeout (`--backend-timeout`, seconds, for each of connect/read/write), an
unreachable server, a non-200 status or a body without those fields raise `BackendError`,
whose `reason` ("backend_timeout" or "backend_error") the server uses as the escalation
reason: the request goes to the upstream LLM, is counted in `factory_backend_errors` and
logged with the message.

Deployment, from the exports of `factory routes` (written to registry/exports/):

    factory routes --export vllm         # registry/exports/vllm.sh
    sh registry/exports/vllm.sh          # vllm serve BASE --port 8000 --enable-lora --lora-modules task=path ...
    factory serve --backend vllm --backend-url http://127.0.0.1:8000

    factory routes --export llamacpp     # registry/exports/llamacpp.sh and llamacpp/*.gguf
    sh registry/exports/llamacpp.sh      # llama-server -m base-f16.gguf --port 8080 --lora-scaled a.gguf:0,...
    factory serve --backend llamacpp --backend-url http://127.0.0.1:8080

One URL serves one base model (both engines load one base per process), so a remote backend
refuses a routing table whose tasks span several bases; the exports start one server per base.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from factory.base_model import resolve_base
from factory.evaluate.generate import confidence
from factory.models import load_tokenizer
from factory.serve.engine import BackendError
from factory.serve.router import Route
from factory.serve.specialists import (Answer, Specialists, calibrated_probability, fit_request, make_answer,
                                      route_constraint)

BACKENDS = ("local", "vllm", "llamacpp")


@dataclass(frozen=True)
class Completion:
    text: str
    logprobs: list[float]  # of the chosen tokens, in order


def vllm_request(task: str, prompt_ids: list[int], max_tokens: int,
                 grammar: str | None = None) -> tuple[str, dict[str, Any]]:
    """(path, body) of a vLLM completions request on the task's LoRA module, its answer following the GBNF
    `grammar` when one is given."""
    body = {"model": task, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1}
    if grammar is not None:
        body["structured_outputs"] = {"grammar": grammar}
    return "/v1/completions", body


def vllm_completion(body: dict[str, Any]) -> Completion:
    """The answer of a vLLM completions response. Raises KeyError, IndexError or TypeError for another shape."""
    choice = body["choices"][0]
    return Completion(choice["text"], [float(lp) for lp in choice["logprobs"]["token_logprobs"]])


def llamacpp_request(lora_id: int, prompt_ids: list[int], max_tokens: int,
                     grammar: str | None = None) -> tuple[str, dict[str, Any]]:
    """(path, body) of a llama-server /completion request with only adapter `lora_id` on, its answer
    following the GBNF `grammar` when one is given."""
    body = {"prompt": prompt_ids, "n_predict": max_tokens, "temperature": 0, "repeat_penalty": 1.0, "n_probs": 1,
            "lora": [{"id": lora_id, "scale": 1.0}]}
    if grammar is not None:
        body["grammar"] = grammar
    return "/completion", body


def llamacpp_completion(body: dict[str, Any]) -> Completion:
    """The answer of a llama-server /completion response. Raises KeyError or TypeError for another shape."""
    return Completion(body["content"], [float(p["logprob"]) for p in body["completion_probabilities"]])


def lora_ids(routes: dict[str, Route]) -> dict[str, int]:
    """Each task's adapter id on a llama-server holding one base: its index among the tasks sorted by
    name, the order `registry.export_llamacpp` passes them to `--lora-scaled`. The ids are only right
    for the routing table the export was written from: re-export after `factory routes` changes it."""
    return {task: i for i, task in enumerate(sorted(routes))}


class RemoteSpecialists:
    """`Specialists.answer` on a vLLM or llama.cpp server; loads only the base's tokenizer and config.

    Raises ValueError for an unknown backend or a routing table spanning several base models (one
    server holds one base), and ValueError naming the task for a malformed calibration map.
    The HTTP client pools connections and is shared by the server's worker threads.
    """

    def __init__(self, backend: str, url: str, routes: dict[str, Route], timeout: float = 30.0):
        from transformers import AutoConfig

        if backend not in ("vllm", "llamacpp"):
            raise ValueError(f"unknown remote backend {backend!r}; choose vllm or llamacpp")
        bases = {route.base_model for route in routes.values()}
        if len(bases) > 1:
            raise ValueError(f"--backend {backend} serves one base model per URL, but the routes use "
                             f"{len(bases)}: {', '.join(sorted(bases))}; serve each base's tasks apart")
        for route in routes.values():
            calibrated_probability(route, 1.0, True)
        self.backend, self.url, self.routes, self.timeout = backend, url.rstrip("/"), routes, timeout
        self._lora_ids = lora_ids(routes)
        base_path = resolve_base(bases.pop()) if bases else None
        self._tokenizer = load_tokenizer(base_path) if base_path else None  # no routes: nothing to answer
        self._config = AutoConfig.from_pretrained(base_path) if base_path else None
        self._client = httpx.Client(timeout=timeout)

    def answer(self, task: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
               max_new_tokens: int | None = None) -> Answer:
        """As `Specialists.answer`, generated by the server. Raises KeyError for an unknown task, ChatError
        for a conversation the template cannot render, BackendError when the server gives no answer."""
        route = self.routes[task]
        prompt, budget = fit_request(route, self._tokenizer, self._config, messages, tools, max_new_tokens)
        ids = self._tokenizer(prompt, add_special_tokens=False)["input_ids"]
        constraint = route_constraint(route, tools)
        start = time.perf_counter()
        completion = self._complete(task, ids, budget, constraint.gbnf if constraint else None)
        return make_answer(route, completion.text, confidence(completion.logprobs), len(completion.logprobs),
                           len(ids), time.perf_counter() - start, tools)

    def _complete(self, task: str, ids: list[int], budget: int, grammar: str | None) -> Completion:
        """POST the request (its answer following the GBNF `grammar` when one is given) and read the answer.
        Raises BackendError."""
        if self.backend == "vllm":
            (path, body), parse = vllm_request(task, ids, budget, grammar), vllm_completion
        else:
            (path, body), parse = llamacpp_request(self._lora_ids[task], ids, budget, grammar), llamacpp_completion
        try:
            response = self._client.post(self.url + path, json=body)
        except httpx.TimeoutException:
            raise BackendError("backend_timeout", f"{self.backend} at {self.url} timed out after "
                               f"{self.timeout:g} s") from None
        except httpx.HTTPError as err:
            raise BackendError("backend_error", f"{self.backend} at {self.url} unreachable: "
                               f"{type(err).__name__}: {err}") from None
        if response.status_code != 200:
            raise BackendError("backend_error", f"{self.backend} answered HTTP {response.status_code}: "
                               f"{response.text[:300]}")
        try:
            return parse(response.json())
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise BackendError("backend_error", f"{self.backend} answered an unexpected body "
                               f"({type(err).__name__}: {err}): {response.text[:300]}") from None


def make_specialists(backend: str, url: str | None, routes: dict[str, Route], timeout: float = 30.0,
                     max_batch: int = 32, max_queue: int = 256) -> Specialists | RemoteSpecialists:
    """The specialists of `factory serve --backend`: in-process for "local" (no URL; `max_batch` rows decode
    together, `max_queue` requests wait, `timeout` seconds bound each), else on the server at `url` (each
    call bounded by `timeout`). Raises ValueError for an unknown backend, a missing or needless URL, and as
    the classes do."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "local":
        if url:
            raise ValueError("--backend-url needs --backend vllm or llamacpp; local generates in-process")
        return Specialists(routes, max_batch=max_batch, max_queue=max_queue, timeout=timeout)
    if not url:
        raise ValueError(f"--backend {backend} needs --backend-url (the server's base URL)")
    return RemoteSpecialists(backend, url, routes, timeout)
