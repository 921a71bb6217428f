"""Specialists in memory: one copy of each base model, every task's LoRA adapter loaded into it.

Adapters are small (a few MB) while a base is hundreds of MB, so all tasks that share a
base share one `PeftModel`: each adapter is loaded under its task's name
(`PeftModel.load_adapter`) and `set_adapter` switches to it per request. Switching is a
pointer change, not a weight copy, but it mutates the model, so generation is serialised
by a lock: one request generates at a time per process. On a CPU that costs little (one
generation already uses every core); batching concurrent requests of the same task would
raise throughput and is left out for simplicity.

Answers go through the same `chat.render_prompt` / `chat.parse_output` as training and evaluation,
and their confidence is `evaluate.generate`'s (geometric mean token probability). Where the route
carries the calibration map its evaluation fitted on validation (`calibration_map`), the answer
also gets the calibrated probability: the expected score of the answer (P(right) for 0/1 scores).
The router keeps comparing the raw confidence with the threshold, which was certified on raw
confidence; the map is monotone, so it would keep the same answers anyway.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.base_model import cache_dir, resolve_base
from factory.evaluate.calibrate import apply_map
from factory.evaluate.generate import generate
from factory.evaluate.run import prompt_budget
from factory import chat, kinds
from factory.serve.router import Route
from factory.models import load_tokenizer


@dataclass(frozen=True)
class Answer:
    output: dict[str, Any]  # {"content": str | None, "tool_calls": [{"name", "arguments"}]}
    confidence: float  # raw: what the router compares with the threshold
    usable: bool
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    calibrated: float | None = None  # the route's calibration map applied; None when it has none


def calibrated_probability(route: Route, confidence: float, usable: bool) -> float | None:
    """The route's calibration map applied to an answer's confidence; None when the route has no map.

    An unusable answer is mapped from confidence 0, as evaluation fitted the map (it zeroes
    the confidence of answers that cannot be used). Raises ValueError naming the task for a
    malformed map.
    """
    mapping = route.extra.get("calibration_map")
    if not mapping:
        return None
    try:
        return float(apply_map(mapping, confidence if usable else 0.0))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"task {route.task!r}: malformed calibration_map {mapping!r}: {err}") from None


def adapter_path(route: Route, cache: Path | None = None) -> Path:
    """A local folder with the route's adapter: the URI itself when it is a folder, else an MLflow
    download (`runs:/...`, `models:/...`) cached under the factory cache, keyed by the tracking URI
    and the artifact URI (both name an immutable artifact: a run's files, a model version's files).

    Raises mlflow's MlflowException when the URI cannot be downloaded.
    """
    uri = route.adapter_uri.removeprefix("file://")
    if Path(uri).is_dir():
        return Path(uri)
    import mlflow

    key = f"{mlflow.get_tracking_uri()}\n{route.adapter_uri}"
    dest = (cache or cache_dir() / "adapters") / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (dest / "adapter_config.json").exists():
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=route.adapter_uri, dst_path=str(tmp)))
    os.replace(local, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


class Specialists:
    """The champions of `routes`, ready to answer; loading takes a few seconds per base model.

    Raises ValueError naming the task when a route's calibration map is malformed, at load
    rather than on its first request.
    """

    def __init__(self, routes: dict[str, Route], adapter_cache: Path | None = None):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        for route in routes.values():
            calibrated_probability(route, 1.0, True)
        self.routes = routes
        self._models: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self._lock = threading.Lock()
        for task, route in sorted(routes.items()):
            path = str(adapter_path(route, adapter_cache))
            if route.base_model not in self._models:
                base_path = resolve_base(route.base_model)
                self._tokenizers[route.base_model] = load_tokenizer(base_path)
                base = AutoModelForCausalLM.from_pretrained(base_path)
                self._models[route.base_model] = PeftModel.from_pretrained(base, path, adapter_name=task).eval()
            else:
                self._models[route.base_model].load_adapter(path, adapter_name=task)

    def answer(self, task: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
               max_new_tokens: int | None = None) -> Answer:
        """Greedy answer of `task`'s specialist with its raw confidence and, where the route has a map, its
        calibrated probability; the conversation is shortened to the task's sequence budget as in training.
        Raises KeyError for an unknown task, ChatError for a conversation the template cannot render."""
        route = self.routes[task]
        model, tokenizer = self._models[route.base_model], self._tokenizers[route.base_model]
        prompt, budget = fit_request(route, tokenizer, model.config, messages, tools, max_new_tokens)
        start = time.perf_counter()
        with self._lock:  # the adapter switch and the tokenizer's padding side are shared state
            model.set_adapter(task)
            gen = generate(model, tokenizer, [prompt], budget, batch_size=1)[0]
            prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return make_answer(route, gen.text, gen.confidence, gen.new_tokens, prompt_tokens,
                           time.perf_counter() - start, tools)


def fit_request(route: Route, tokenizer, config, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                max_new_tokens: int | None) -> tuple[str, int]:
    """(prompt, answer budget): the request's answer budget capped by the route's, and the conversation
    rendered as in training, shortened to the task's sequence budget (the base's context when the route
    names none) less that answer budget. `config` is the base's model config. Raises ChatError."""
    budget = min(route.max_new_tokens, max_new_tokens or route.max_new_tokens)
    seq_budget = int(route.extra.get("seq_budget") or config.max_position_embeddings)
    return chat.fit_prompt(tokenizer, messages, tools, prompt_budget(config, seq_budget, budget)), budget


def make_answer(route: Route, text: str, confidence: float, new_tokens: int, prompt_tokens: int, seconds: float,
                tools: list[dict[str, Any]]) -> Answer:
    """The `Answer` of a generated `text` whatever generated it: parsed as training rendered answers,
    judged usable by the task's kind, calibrated by the route's map. Raises ValueError for a malformed map."""
    output = chat.parse_output(text)
    usable = kinds.get(route.kind).usable(output, route.output_schema, tools)
    return Answer(output=output, confidence=confidence, usable=usable, prompt_tokens=prompt_tokens,
                  completion_tokens=new_tokens, seconds=seconds,
                  calibrated=calibrated_probability(route, confidence, usable))
