"""Train: a LoRA specialist for one mined task, with TRL's SFTTrainer and PEFT.

Lifecycle (each setup step returns one component):

    setup_tokenizer -> setup_data -> setup_model -> setup_trainer -> fit -> save

Prompts are rendered with the base model's own chat template (`render_prompt`) and
outputs with `render_output`; evaluation and serving call the same two functions,
so the specialist sees at inference exactly the text it was trained on. The loss
covers the completion only (the assistant output): prompts are long and repetitive,
so training on them costs time and teaches nothing the task needs.

A run's working folder is keyed by task, dataset version and recipe digest:
rerunning the same command resumes from the latest checkpoint after a crash, and
returns the finished result at once when the adapter is already saved.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
import yaml
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from trl import SFTConfig, SFTTrainer

from factory.base_model import resolve_base
from factory.mine import check_task_name, load_split, write_atomic
from factory.recipe import Recipe

TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


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


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict]) -> str:
    """The prompt text with the generation prompt appended; tools only where the template renders them."""
    kwargs = {"tools": tools} if tools and _supports_tools(tokenizer) else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def render_output(output: dict[str, Any]) -> str:
    """An output as the assistant's text: content, or tool calls in the Hermes/Qwen `<tool_call>` format."""
    calls = output.get("tool_calls") or []
    if calls:
        return "\n".join(
            "<tool_call>\n" + json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
            + "\n</tool_call>" for c in calls)
    return output.get("content") or ""


def parse_output(text: str) -> dict[str, Any]:
    """Invert `render_output`: tool-call blocks become tool calls, anything else is content."""
    calls = []
    for block in TOOL_CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            call = None
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            arguments = call.get("arguments", call.get("parameters", {}))
            calls.append({"name": call["name"], "arguments": arguments})
    if calls:
        return {"content": None, "tool_calls": calls}
    return {"content": text.strip(), "tool_calls": []}


# --- lifecycle ---------------------------------------------------------------------------------------


def setup_tokenizer(base_path: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer; a missing pad token falls back to the eos token."""
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def setup_data(rows: list[dict], tokenizer: PreTrainedTokenizerBase, recipe: Recipe) -> Dataset:
    """Prompt/completion text pairs; rows whose prompt alone exceeds max_seq_length are dropped.

    Raises ValueError when no example fits, before any training time is spent.
    """
    if recipe.max_train_samples:
        rows = rows[: recipe.max_train_samples]
    pairs = []
    for row in rows:
        prompt = render_prompt(tokenizer, row["messages"], row.get("tools") or [])
        if len(tokenizer(prompt)["input_ids"]) < recipe.max_seq_length - 4:
            pairs.append({"prompt": prompt, "completion": render_output(row["output"]) + tokenizer.eos_token})
    if not pairs:
        raise ValueError(f"no training example fits max_seq_length={recipe.max_seq_length}")
    return Dataset.from_list(pairs)


def setup_model(recipe: Recipe, base_path: str) -> torch.nn.Module:
    """The base model wrapped for the recipe's method.

    lora/dora: PEFT adapters on `lora.target_modules`. qlora: the base loaded in
    4-bit through bitsandbytes (GPU only; raises RuntimeError without CUDA).
    full: every weight trains (memory ~4x the model in fp32 with AdamW).
    """
    kwargs: dict[str, Any] = {"dtype": {"fp32": torch.float32, "bf16": torch.bfloat16,
                                        "fp16": torch.float16}[recipe.precision]}
    if recipe.method == "qlora":
        if not torch.cuda.is_available():
            raise RuntimeError("method 'qlora' needs a CUDA GPU and bitsandbytes (pip install '.[gpu]')")
        from transformers import BitsAndBytesConfig

        q = recipe.quantization
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype))
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if recipe.method == "full":
        return model
    config = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                        target_modules=recipe.lora.target_modules, use_dora=recipe.method == "dora",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class _MlflowLog(TrainerCallback):
    """Trainer logs (loss, learning rate, grad norm) as MLflow metrics of the active run."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if numbers:
            mlflow.log_metrics(numbers, step=state.global_step)


def setup_trainer(recipe: Recipe, model, tokenizer, train: Dataset, valid: Dataset | None, out_dir: Path) -> SFTTrainer:
    config = SFTConfig(
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
        gradient_checkpointing=recipe.gradient_checkpointing,
        max_length=recipe.max_seq_length,
        packing=recipe.packing,
        completion_only_loss=recipe.completion_only_loss,
        seed=recipe.seed,
        data_seed=recipe.seed,
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if recipe.eval_steps and valid is not None else "no",
        eval_steps=recipe.eval_steps,
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length",
        include_num_input_tokens_seen="non_padding",
    )
    return SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=valid,
                      processing_class=tokenizer, callbacks=[_MlflowLog()])


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
    checkpoints = sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return str(checkpoints[-1]) if checkpoints else None


def run_dir(registry_dir: Path, task: str, dataset_version: str, recipe: Recipe) -> Path:
    return registry_dir / "training" / check_task_name(task) / f"{dataset_version}-{recipe.digest()}"


def train(task: str, entry: dict[str, Any], recipe: Recipe, raw_recipe: dict[str, Any], data_dir: Path,
          registry_dir: Path) -> TrainResult:
    """Train (or resume, or reuse) the specialist for `task` from its catalog `entry`.

    Raises ValueError when the task has no dataset ready or no example fits the recipe.
    """
    if entry.get("status") != "ready" or not entry.get("dataset_version"):
        raise ValueError(f"task {task!r} has no dataset ready (status: {entry.get('status')})")
    version = entry["dataset_version"]
    out_dir = run_dir(registry_dir, task, version, recipe)
    result_path = out_dir / "train.json"
    if result_path.exists():
        return TrainResult(**json.loads(result_path.read_text()))
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe.torch_threads:
        torch.set_num_threads(recipe.torch_threads)

    base_path = resolve_base(recipe.base_model)
    tokenizer = setup_tokenizer(base_path)
    train_set = setup_data(load_split(data_dir, task, version, "train"), tokenizer, recipe)
    valid_rows = load_split(data_dir, task, version, "validation")
    valid_set = setup_data(valid_rows, tokenizer, recipe) if valid_rows and recipe.eval_steps else None
    model = setup_model(recipe, base_path)
    trainer = setup_trainer(recipe, model, tokenizer, train_set, valid_set, out_dir)

    run_file = out_dir / "mlflow_run.json"
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.exists() else None
    _experiment(task)
    with mlflow.start_run(run_id=run_id, run_name=f"train-{task}", log_system_metrics=True) as run:
        write_atomic(run_file, json.dumps({"run_id": run.info.run_id}))
        if run_id is None:
            mlflow.log_params({"task": task, "kind": entry["kind"], "dataset_version": version,
                               "recipe_digest": recipe.digest(), "base_model": recipe.base_model,
                               **{f"recipe.{k}": v for k, v in _flat(recipe.model_dump()).items()}})
            mlflow.log_text(yaml.safe_dump(raw_recipe, sort_keys=False), "recipe.yaml")
            mlflow.log_input(mlflow.data.from_pandas(train_set.to_pandas(), name=f"{task}@{version}",
                                                     source=str(data_dir / task / version)), context="training")
            mlflow.set_tags({"task": task, "dataset_version": version, "stage": "train"})
        start = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=_latest_checkpoint(out_dir))
        seconds = time.perf_counter() - start
        adapter_dir = out_dir / "adapter"
        tmp = out_dir / "adapter.tmp"
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(adapter_dir, ignore_errors=True)  # left by a run killed between saving and train.json
        os.replace(tmp, adapter_dir)
        tokens = int(trainer.state.num_input_tokens_seen)
        result = TrainResult(
            task=task, kind=entry["kind"], run_id=run.info.run_id, adapter_dir=str(adapter_dir),
            base_model=recipe.base_model, dataset_version=version, recipe_digest=recipe.digest(),
            train_examples=len(train_set), train_loss=float(output.training_loss), train_tokens=tokens,
            tokens_per_s=tokens / seconds if seconds else 0.0, seconds=seconds)
        mlflow.log_metrics({"train_loss_final": result.train_loss, "train_tokens_per_s": result.tokens_per_s,
                            "train_seconds": seconds})
        mlflow.log_artifacts(str(adapter_dir), "adapter")
    write_atomic(result_path, json.dumps(asdict(result), indent=2))
    return result


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
