"""Recipes: one pydantic schema for every training run, loaded in three layers.

    recipes/base/<recipe>.yaml   the recipe chosen (`RECIPE=`; default "cpu-lora"); a base
                                 recipe may start from another with `extends: <name>`
  < recipes/tasks/<task>.yaml    per-task overrides, when the file exists (else the base alone)
  < key=value overrides          from the command line (dotted keys: lora.r=8)

Nested sections merge key by key. Everything is validated before any model is
loaded; an unknown key, a wrong type or a missing base model raises `RecipeError`
naming the file (or "command line") and the dotted field.

`distributed` picks one of the accelerate configs shipped in recipes/accelerate/
(DDP, DeepSpeed ZeRO-2, ZeRO-3 with the JSON configs in recipes/deepspeed/); training
then runs under `accelerate launch` (see `factory.train.train`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from factory.catalog import check_task_name
from factory.errors import FactoryError

RECIPES_DIR = Path("recipes")
DEFAULT_RECIPE = "cpu-lora"

EVAL_FIELDS = {"max_eval_samples", "max_new_tokens", "eval_batch_size", "target_quality", "escalation_delta",
               "constrained_decoding"}
# fields that change how fast a run goes, not what it learns: left out of the digest
_SPEED_FIELDS = {"torch_threads", "shared_prefix", "use_liger_kernel"}
# `factory select`'s candidate bases: a list to choose from, not what one run learns
_SELECT_FIELDS = {"candidates", "select_base"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Lora(_Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class Quantization(_Strict):
    """4-bit NF4 for QLoRA (bitsandbytes, GPU only)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class Relabel(_Strict):
    """`factory relabel` (factory.relabel): teacher-made examples join the train split until the task
    has `target_examples`, at most `max_share` of that split; `workers` teacher requests at a time."""

    max_share: float = Field(0.6, gt=0, lt=1)
    target_examples: int = Field(50, gt=0)
    workers: int = Field(4, gt=0)


class Dpo(_Strict):
    """`method: dpo`: TRL's DPO continuing the task's LoRA SFT adapter on its preference pairs, for the
    recipe's `epochs` (no `min_train_steps`) at its own `learning_rate`. `sft_weight` adds the chosen
    answers' own loss (RPO), which keeps DPO from lowering their likelihood along with the rejected
    ones': on the sample classify task, plain DPO at the SFT rate (32 steps) took the chosen answers'
    log-probability from -1.6 to -9.9 and the test score from 1.0 to 0. bench/quality.py: a rate of
    1e-4 (under bf16 autocast) moved nothing in 20 steps (test score 0.261 before and after), 5e-4
    (fp32) gained 0.217, and without the SFT term lost 0.130. The nightly runs it for a task with at
    least `min_pairs` pairs."""

    beta: float = Field(0.1, gt=0)
    learning_rate: float = Field(5e-4, gt=0)
    sft_weight: float = Field(1.0, ge=0)
    min_pairs: int = Field(8, gt=0)


class Recipe(_Strict):
    base_model: str = Field(min_length=1)
    # dpo: LoRA SFT (this recipe with method lora) first, then DPO on its adapter (factory.train.train_dpo)
    method: Literal["lora", "qlora", "dora", "full", "dpo"] = "lora"
    lora: Lora = Lora()
    quantization: Quantization | None = None
    # the sequence budget: this quantile of the task's example lengths, at most max_seq_length;
    # longer examples lose earlier turns (padded batches on a GPU gain from 0.95: the longest
    # 5% no longer set every batch's width; padding-free rows pay only for the tokens they hold)
    max_seq_length: int = Field(512, gt=8)
    seq_length_quantile: float = Field(1.0, gt=0, le=1)
    # a task whose calls all carry one system prompt and tool list (a policy) can learn it into the
    # weights: trained and served without it (shorter rows, room for history), answering only requests
    # with that policy (another escalates: the policy changed). auto: when it takes over half of
    # max_seq_length; always: whenever the task has one; never: always read (factory.train.setup_data)
    learn_policy: Literal["auto", "always", "never"] = "auto"
    packing: bool = False
    padding_free: bool = True
    completion_only_loss: bool = True
    # the batch's common prompt prefix run once (padding-free, completion-only rows; same gradients)
    shared_prefix: bool = True
    # Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) on CUDA; ignored, with a message, elsewhere
    # (factory.train.liger_kernel says why)
    use_liger_kernel: bool = False
    optimizer: str = "adamw_torch"
    lr_scheduler: str = "linear"
    learning_rate: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    # a small task repeats its examples (more epochs) until it has had this many optimizer steps:
    # costs time on small tasks only, and a 135M base needs the steps (factory.train.train_steps)
    min_train_steps: int = Field(0, ge=0)
    batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # recompute each layer's activations in the backward: ~1/3 more compute for a fraction of the memory;
    # switched on by itself when a micro-batch of one longest example would not fit (factory.train.memory_plan)
    gradient_checkpointing: bool = False
    seed: int = 0
    max_train_samples: int | None = Field(None, gt=0)
    # training time is about tokens / throughput: a token budget bounds it whatever the example length
    max_train_tokens: int | None = Field(None, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    save_steps: int = Field(50, gt=0)
    logging_steps: int = Field(10, gt=0)
    torch_threads: int | None = Field(None, gt=0)
    distributed: Literal["none", "ddp", "deepspeed_zero2", "deepspeed_zero3"] = "none"
    num_processes: int | None = Field(None, gt=0)  # None: one per visible GPU
    # evaluation settings travel with the recipe so a run is reproducible from it alone
    max_eval_samples: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(96, gt=0)
    eval_batch_size: int = Field(16, gt=0)
    target_quality: float = Field(0.95, gt=0, le=1)
    # the escalation threshold is certified on validation: its kept quality reaches the target
    # on new traffic with probability >= 1 - escalation_delta (factory.evaluate.calibrate)
    escalation_delta: float = Field(0.1, gt=0, lt=1)
    # tool calls, agent turns and JSON answers decode under their schema's grammar (factory.constrain), in
    # evaluation and, through routes.json, in serving: the threshold is certified as the answers are decoded
    constrained_decoding: bool = True
    # base models `factory select` trains briefly and compares (factory.select): embedded names,
    # local checkpoint folders, hub ids in the local Hugging Face cache
    candidates: list[str] = []
    # `finetune` (make finetune, the demo, the nightly): when the specialist misses target_quality x the
    # teacher on test, `factory select` compares the candidates and the chosen base is trained and
    # registered instead. Costs each candidate's short training and one more full training.
    select_base: bool = False
    relabel: Relabel = Relabel()
    dpo: Dpo = Dpo()

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        from transformers.training_args import OptimizerNames

        if value not in {o.value for o in OptimizerNames}:
            raise ValueError(f"unknown optimizer {value!r}; e.g. adamw_torch, adamw_torch_fused, paged_adamw_8bit")
        return value

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        from transformers.trainer_utils import SchedulerType

        known = [s.value for s in SchedulerType]
        if value not in known:
            raise ValueError(f"unknown lr_scheduler {value!r}; one of {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _qlora_needs_quantization(self) -> Recipe:
        if self.method == "qlora" and self.quantization is None:
            self.quantization = Quantization()
        return self

    def digest(self) -> str:
        """Hash of the fields that shape the trained weights (evaluation and speed settings excluded;
        `relabel` shapes the dataset version instead, `dpo` only a dpo run)."""
        fields = self.model_dump(exclude=EVAL_FIELDS | _SPEED_FIELDS | _SELECT_FIELDS | {"relabel"}
                                 | (set() if self.method == "dpo" else {"dpo"}))
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


class RecipeError(FactoryError, ValueError):
    """A recipe that does not validate; the message names the file and the field (also a
    ValueError, as it was before `FactoryError`, for callers that catch that)."""


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: invalid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.start})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of recipe fields")
    return data


def _base_path(name: str, recipes_dir: Path) -> Path:
    path = Path(name) if name.endswith((".yaml", ".yml")) else recipes_dir / "base" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (recipes_dir / "base").glob("*.yaml"))
        raise RecipeError(f"{path}: no such recipe; known: {', '.join(known)}")
    return path


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"command line: override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as err:
        raise RecipeError(f"command line: override {text!r}: invalid YAML value: {err}") from None


def _merge(into: dict[str, Any], layer: dict[str, Any], source: str, origin: dict[str, str], prefix: str = "") -> None:
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, source, origin, f"{dotted}.")
        else:
            into[key] = value
        origin[dotted] = source


def _merge_base(merged: dict[str, Any], origin: dict[str, str], path: Path, recipes_dir: Path,
                seen: tuple[Path, ...] = ()) -> None:
    """Merge a base recipe after the chain of recipes it `extends`."""
    if path.resolve() in seen:
        raise RecipeError(f"{path}: extends: cycle through {', '.join(str(p) for p in seen)}")
    layer = _read(path)
    parent = layer.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise RecipeError(f"{path}: extends: expected a recipe name, got {parent!r}")
        _merge_base(merged, origin, _base_path(parent, recipes_dir), recipes_dir, (*seen, path.resolve()))
    _merge(merged, layer, str(path), origin)


def load_recipe(task: str | None = None, recipe: str | None = None, overrides: list[str] = (),
                recipes_dir: Path = RECIPES_DIR) -> tuple[Recipe, dict[str, Any]]:
    """Return the validated recipe and the merged raw layers (for logging to MLflow).

    `recipe` is a name under recipes/base/ or a path to a YAML file. Raises RecipeError.
    """
    if task is not None:
        try:
            check_task_name(task)  # a task name must not lead out of recipes/tasks/
        except ValueError as err:
            raise RecipeError(str(err)) from None
    base_path = _base_path(recipe or DEFAULT_RECIPE, recipes_dir)
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    _merge_base(merged, origin, base_path, recipes_dir)
    task_path = recipes_dir / "tasks" / f"{task}.yaml"
    if task and task_path.exists():
        _merge(merged, _read(task_path), str(task_path), origin)
    for text in overrides:
        keys, value = _parse_override(text)
        layer: dict[str, Any] = {keys[-1]: value}
        for key in reversed(keys[:-1]):
            layer = {key: layer}
        _merge(merged, layer, "command line", origin)
    try:
        return Recipe.model_validate(merged), merged
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "(recipe)"
            source = next((origin[k] for k in _prefixes(field) if k in origin), str(base_path))
            problems.append(f"{source}: {field}: {e['msg']}")
        raise RecipeError("\n".join(problems)) from None


def accelerate_config(recipe: Recipe, recipes_dir: Path = RECIPES_DIR) -> Path:
    """The shipped accelerate config for the recipe's `distributed` backend.

    Raises RecipeError for `distributed: none` or when the file is missing.
    """
    if recipe.distributed == "none":
        raise RecipeError("distributed: 'none' runs in this process, without accelerate launch")
    path = recipes_dir / "accelerate" / f"{recipe.distributed}.yaml"
    if not path.exists():
        raise RecipeError(f"{path}: missing accelerate config for distributed: {recipe.distributed}")
    return path


def _prefixes(field: str) -> list[str]:
    parts = field.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
