"""Train: a LoRA specialist for one mined task, with TRL's SFTTrainer and PEFT.

Lifecycle (each setup step returns one component):

    setup_tokenizer -> setup_data -> training_args -> setup_model -> setup_trainer -> fit -> save

Prompts are rendered with the base model's own chat template (`render_prompt`), and
the assistant turn with `render_completion`: tool calls in the template's own tool
format where it has one, else as Hermes-style `<tool_call>` text (`render_output`;
SmolLM2's template ignores tools). Evaluation and serving use `render_prompt` and
`parse_output`, so the specialist sees at inference exactly the text it was trained on.

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
  Trade-off: one attention call per example and layer. (Plain sdpa on such a row does
  not see the example boundaries: measured, its loss differs from the padded one.)
* a shared prompt prefix computed once per batch (`SharedPrefixCollator`): the calls of
  one subtask start with the same system prompt and tool list, so the batch's row holds
  that prefix once, then each example's rest, which attends to the prefix and to itself.
  Loss and gradients are those of the unshared batch (up to float rounding: a test);
  on the sample tasks 23-51% of the tokens are shared, and agents' real system prompts
  are longer. Trade-off: the rest of each example runs attention with an explicit mask.
  Throughput still counts every example's tokens (`num_input_tokens_seen`), the tokens
  actually run are in `computed_tokens`.
* MKL's own fast kernels on AMD CPUs (`factory.mkl`, loaded by `import factory`): PyTorch's
  MKL otherwise gives them its generic matmul kernels; +10-12% tokens/s here.
* fp32, no gradient checkpointing: this CPU has no bf16 matmul units (a bf16 matmul
  runs at ~0.3x the fp32 speed) and the 135M model fits in memory many times over.
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
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
import torch.nn.functional as F
import yaml
from datasets import Dataset
from jinja2 import TemplateError
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (AttentionInterface, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase,
                          TrainerCallback, set_seed)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from trl import SFTConfig, SFTTrainer

from factory.base_model import resolve_base
from factory.catalog import check_task_name
from factory.io import load_split, write_atomic
from factory.recipe import RECIPES_DIR, Recipe, accelerate_config

TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
VARLEN_ATTENTION = "sdpa_varlen"


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


# --- rendering shared by training, evaluation and serving -----------------------------------------


def _supports_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    return "tools" in (tokenizer.chat_template or "")


def _renders_tool_calls(tokenizer: PreTrainedTokenizerBase) -> bool:
    return "tool_calls" in (tokenizer.chat_template or "")


@functools.lru_cache(maxsize=8)
def _injects_system(template: str, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the template adds a default system prompt longer than an empty one."""
    user = [{"role": "user", "content": "x"}]
    try:
        bare = tokenizer.apply_chat_template(user, tokenize=False)
        empty = tokenizer.apply_chat_template([{"role": "system", "content": ""}, *user], tokenize=False)
    except TemplateError:  # a template without a system role
        return False
    return len(bare) > len(empty)


def _messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[dict]:
    if messages and messages[0].get("role") not in ("system", "developer") \
            and _injects_system(tokenizer.chat_template or "", tokenizer):
        return [{"role": "system", "content": ""}, *messages]
    return messages


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict]) -> str:
    """The prompt text with the generation prompt appended; tools only where the template renders them.

    A conversation without a system message gets an empty one when the template would
    inject its own default (SmolLM2: "You are a helpful AI assistant named SmolLM..."):
    those tokens cost time in every training step and carry nothing task-specific.
    """
    kwargs = {"tools": tools} if tools and _supports_tools(tokenizer) else {}
    return tokenizer.apply_chat_template(_messages(tokenizer, messages), tokenize=False,
                                         add_generation_prompt=True, **kwargs)


def render_output(output: dict[str, Any]) -> str:
    """An output as the assistant's text: content, or tool calls in the Hermes/Qwen `<tool_call>` format."""
    calls = output.get("tool_calls") or []
    if calls:
        return "\n".join(
            "<tool_call>\n" + json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
            + "\n</tool_call>" for c in calls)
    return output.get("content") or ""


def render_completion(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict],
                      output: dict[str, Any]) -> str:
    """The assistant turn that follows `render_prompt`, ending with the eos token.

    Templates that render `tool_calls` (Qwen2.5, Llama 3.1, Mistral v0.3) format the
    calls themselves; other templates get `render_output`'s text as the content.
    Falls back to `render_output(output) + eos` when the template does not render the
    prompt as a prefix of the whole conversation.
    """
    calls = output.get("tool_calls") or []
    if calls and _renders_tool_calls(tokenizer):
        turn = {"role": "assistant", "content": output.get("content") or "", "tool_calls": [
            {"id": f"call{i:05d}", "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for i, c in enumerate(calls)]}
    else:
        turn = {"role": "assistant", "content": render_output(output)}
    prompt = render_prompt(tokenizer, messages, tools)
    kwargs = {"tools": tools} if tools and _supports_tools(tokenizer) else {}
    full = tokenizer.apply_chat_template([*_messages(tokenizer, messages), turn], tokenize=False, **kwargs)
    eos = tokenizer.eos_token
    if not full.startswith(prompt):
        return render_output(output) + eos
    completion = full[len(prompt):]
    end = completion.rfind(eos)
    return completion[: end + len(eos)] if end >= 0 else completion + eos


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _as_call(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict) and isinstance(value.get("name"), str) \
            and set(value) <= {"name", "arguments", "parameters", "id", "type"}:
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = _json(arguments)
        return {"name": value["name"], "arguments": arguments} if isinstance(arguments, dict) else None
    return None


def parse_output(text: str) -> dict[str, Any]:
    """Invert the renderings: tool calls become tool calls, anything else is content.

    Reads Hermes/Qwen `<tool_call>{...}</tool_call>` blocks, and a whole answer that is
    a call object (`{"name", "parameters"}`: Llama 3.1) or a list of them (Mistral's
    `[TOOL_CALLS] [...]`, with or without the marker).
    """
    calls = [c for c in (_as_call(_json(b)) for b in TOOL_CALL.findall(text)) if c]
    if not calls:
        body = text.strip().removeprefix("[TOOL_CALLS]").removeprefix("<|python_tag|>").strip()
        value = _json(body) if body[:1] in ("[", "{") else None
        parsed = [_as_call(v) for v in (value if isinstance(value, list) else [value])]
        if parsed and all(parsed):
            calls = parsed
    if calls:
        return {"content": None, "tool_calls": calls}
    return {"content": text.strip(), "tool_calls": []}


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


def setup_tokenizer(base_path: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer; a missing pad token falls back to the eos token."""
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def setup_data(rows: list[dict], tokenizer: PreTrainedTokenizerBase, recipe: Recipe) -> Dataset:
    """Tokenized examples: `input_ids` and `labels` (-100 on the prompt with completion_only_loss).

    Prompt and completion are tokenized separately, as at inference (the prompt is
    tokenized alone and generation continues it). Examples longer than max_seq_length
    are dropped rather than truncated, so no specialist learns cut-off answers. The
    first rows are kept, up to max_train_samples rows and max_train_tokens tokens: a
    task of short examples gets more of them for the same training time.
    Raises ValueError when no example fits, before any training time is spent.
    """
    if recipe.max_train_samples:
        rows = rows[: recipe.max_train_samples]
    examples, tokens = [], 0
    for row in rows:
        tools = row.get("tools") or []
        prompt = tokenizer(render_prompt(tokenizer, row["messages"], tools), add_special_tokens=False)["input_ids"]
        completion = tokenizer(render_completion(tokenizer, row["messages"], tools, row["output"]),
                               add_special_tokens=False)["input_ids"]
        if len(prompt) + len(completion) > recipe.max_seq_length:
            continue
        if recipe.max_train_tokens and tokens + len(prompt) + len(completion) > recipe.max_train_tokens:
            break
        tokens += len(prompt) + len(completion)
        labels = [-100] * len(prompt) + completion if recipe.completion_only_loss else prompt + completion
        examples.append({"input_ids": prompt + completion, "labels": labels})
    if not examples:
        raise ValueError(f"no training example fits max_seq_length={recipe.max_seq_length}")
    return Dataset.from_list(examples)


def setup_model(recipe: Recipe, base_path: str) -> torch.nn.Module:
    """The base model wrapped for the recipe's method, its adapter initialized from `recipe.seed`.

    lora/dora: PEFT adapters on `lora.target_modules`. qlora: the base loaded in
    4-bit through bitsandbytes (GPU only: `train` refuses it without CUDA).
    full: every weight trains (memory ~4x the model in fp32 with AdamW).
    """
    set_seed(recipe.seed)
    kwargs: dict[str, Any] = {"dtype": {"fp32": torch.float32, "bf16": torch.bfloat16,
                                        "fp16": torch.float16}[recipe.precision],
                              "attn_implementation": VARLEN_ATTENTION if recipe.padding_free else "sdpa"}
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


def training_args(recipe: Recipe, out_dir: Path, evaluate: bool) -> SFTConfig:
    """TRL's config for the recipe. Created before the model: under DeepSpeed ZeRO-3 it makes
    `from_pretrained` load the weights already partitioned across the GPUs."""
    return SFTConfig(
        output_dir=str(out_dir),
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler,
        warmup_steps=recipe.warmup_ratio,
        weight_decay=recipe.weight_decay,
        optim=recipe.optimizer,
        bf16=recipe.precision == "bf16",
        fp16=recipe.precision == "fp16",
        activation_checkpointing=recipe.gradient_checkpointing,
        # setup_data drops the longer examples; TRL refuses a max_length it cannot enforce padding-free
        max_length=None if recipe.padding_free and not recipe.packing else recipe.max_seq_length,
        packing=recipe.packing,
        padding_free=recipe.padding_free,
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
        use_cpu=not torch.cuda.is_available(),
    )


def setup_trainer(args: SFTConfig, model, tokenizer, train: Dataset, valid: Dataset | None,
                  shared_prefix: bool = False) -> FactorySFTTrainer:
    """The trainer; `shared_prefix` (padding-free, unpacked rows only) wraps its collator in `SharedPrefixCollator`."""
    trainer = FactorySFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid,
                                processing_class=tokenizer, callbacks=[_MlflowLog(), _Throughput()])
    if shared_prefix and args.padding_free and not args.packing:
        # after construction: TRL refuses a custom collator together with padding_free
        trainer.data_collator = SharedPrefixCollator(trainer.data_collator)
    return trainer


def _experiment(task: str) -> None:
    """Select the task's experiment; with the embedded store its artifacts go under FACTORY_ARTIFACT_ROOT."""
    name = f"task/{task}"
    if mlflow.get_experiment_by_name(name) is None and os.environ.get("FACTORY_ARTIFACT_ROOT"):
        root = Path(os.environ["FACTORY_ARTIFACT_ROOT"]) / task
        mlflow.create_experiment(name, artifact_location=root.resolve().as_uri())
    mlflow.set_experiment(name)


def resume_run(run_id: str):
    """Re-open a finished training run (in its own experiment) to log evaluation or a model to it."""
    mlflow.set_experiment(experiment_id=mlflow.get_run(run_id).info.experiment_id)
    return mlflow.start_run(run_id=run_id)


def _latest_checkpoint(out_dir: Path) -> str | None:
    """The newest checkpoint the trainer finished writing (its trainer_state.json is written last)."""
    complete = [p for p in out_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[1]))) if complete else None


def run_dir(registry_dir: Path, task: str, dataset_version: str, recipe: Recipe) -> Path:
    return registry_dir / "training" / check_task_name(task) / f"{dataset_version}-{recipe.digest()}"


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(task: str, entry: dict[str, Any], recipe: Recipe, raw_recipe: dict[str, Any], data_dir: Path,
          registry_dir: Path) -> TrainResult:
    """Train (or resume, or reuse) the specialist for `task` from its catalog `entry`.

    With `recipe.distributed` other than "none" and outside a launched worker, the same
    call runs in `accelerate launch` processes (`launch_command`) and this one waits.
    Raises ValueError when the task has no dataset ready, no example fits the recipe, the
    base model is not available locally, or the recipe needs CUDA GPUs and none is visible;
    subprocess.CalledProcessError when a distributed launch fails.
    """
    if entry.get("status") != "ready" or not entry.get("dataset_version"):
        raise ValueError(f"task {task!r} has no dataset ready (status: {entry.get('status')})")
    version = entry["dataset_version"]
    out_dir = run_dir(registry_dir, task, version, recipe)
    result_path = out_dir / "train.json"
    if result_path.exists():
        return TrainResult(**json.loads(result_path.read_text()))
    if (recipe.method == "qlora" or recipe.distributed != "none") and not torch.cuda.is_available():
        raise ValueError(f"method {recipe.method!r} with distributed {recipe.distributed!r} needs CUDA GPUs "
                         "(pip install '.[gpu]'); none is visible")
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe.distributed != "none" and "LOCAL_RANK" not in os.environ:
        subprocess.run(launch_command(task, entry, raw_recipe, recipe, data_dir, registry_dir), check=True)
        return TrainResult(**json.loads(result_path.read_text()))
    if recipe.torch_threads:
        torch.set_num_threads(recipe.torch_threads)

    base_path = resolve_base(recipe.base_model)
    from factory.resources import preflight_training  # memory and disk, before any weight is loaded
    preflight_training(base_path, recipe.method, recipe.precision, out_dir)
    try:
        tokenizer = setup_tokenizer(base_path)
    except OSError as err:  # a hub id that is not in the local cache: nothing is downloaded
        raise ValueError(f"base model {recipe.base_model!r} cannot be loaded: {err}") from None
    train_set = setup_data(load_split(data_dir, task, version, "train"), tokenizer, recipe)
    valid_rows = load_split(data_dir, task, version, "validation")
    valid_set = setup_data(valid_rows, tokenizer, recipe) if valid_rows and recipe.eval_steps else None
    args = training_args(recipe, out_dir, valid_set is not None)
    model = setup_model(recipe, base_path)
    trainer = setup_trainer(args, model, tokenizer, train_set, valid_set, recipe.shared_prefix)

    main = trainer.is_world_process_zero()
    run_file = out_dir / "mlflow_run.json"
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.exists() else None
    if main:
        _experiment(task)
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
            tokens_per_s=meter.tokens / meter.seconds if meter.seconds else 0.0, seconds=meter.seconds)
        mlflow.log_metrics({"train_loss_final": result.train_loss, "train_tokens_per_s": result.tokens_per_s,
                            "train_computed_tokens": trainer.computed_tokens, "train_seconds": result.seconds,
                            "train_peak_rss_mb": _peak_rss_mb()})
        mlflow.log_artifacts(str(adapter_dir), "adapter")
    write_atomic(result_path, json.dumps(asdict(result), indent=2))
    return result


def launch_command(task: str, entry: dict[str, Any], raw_recipe: dict[str, Any], recipe: Recipe, data_dir: Path,
                   registry_dir: Path, recipes_dir: Path = RECIPES_DIR) -> list[str]:
    """`accelerate launch` running this module's worker on one process per GPU (or `num_processes`).

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


def load_specialist(base_path: str, adapter_dir: str) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The base with the adapter applied, in eval mode (use `model.disable_adapter()` for the bare base)."""
    tokenizer = setup_tokenizer(base_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter_dir)
    return model.eval(), tokenizer


def _worker(spec_path: str) -> None:
    """One `accelerate launch` process: train from the spec `launch_command` wrote."""
    spec = json.loads(Path(spec_path).read_text())
    train(spec["task"], spec["entry"], Recipe.model_validate(spec["raw_recipe"]), spec["raw_recipe"],
          Path(spec["data_dir"]), Path(spec["registry_dir"]))


if __name__ == "__main__":
    _worker(sys.argv[1])
