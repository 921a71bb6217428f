"""Resource preflight: refuse, in seconds and with a clear message, a run that cannot fit.

`check_memory` estimates the memory a training run needs from the base model's
`config.json` (or its safetensors headers) and compares it with what this machine has
available, before any weight is loaded. `check_disk` checks that a folder's file system
has room for what a stage is about to write, plus a reserve (`FACTORY_MIN_FREE_MB`,
default 200). The stages call them first: ingest (need: the input not read yet),
mine (the curated records), training (the base model's size, `training_disk_bytes`).

Both raise `ResourceError`, a `FactoryError`, which the CLI prints as a one-line error (and a
ValueError, as it was before that base existed, for callers that catch ValueError).

The memory estimate is deliberately coarse (it ignores sequence length and batch size,
which the overhead factors cover for the small batches this factory trains with): its job
is to catch a 70B base on a 32 GB machine, not to fit a run to the last gigabyte.

On CUDA, `check_gpu_memory` does the same for GPU memory, part by part and with the recipe's
batch and sequence budget (`gpu_training_memory`): weights as loaded (4-bit NF4, bf16, fp32),
the trainable parameters, their gradients and optimizer state, the activations of a micro-batch,
the CUDA context; sharded as DeepSpeed ZeRO shards them. It compares that with the free memory
`torch.cuda.mem_get_info` reports, and refuses in seconds, before any weight is loaded, naming
the parts. Coarse too (within ~20% of what runs show is its aim, unmeasured here: no GPU): it
catches an 8B full fine-tune on one 80 GiB GPU, not the last gigabyte.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.errors import FactoryError

MIN_FREE_ENV = "FACTORY_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 200
# bytes a weight takes in memory as the recipe loads it; qlora: 4-bit NF4, plus the
# quantization constants and the layers bitsandbytes leaves in the compute dtype
BYTES_PER_PARAMETER = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}
QLORA_BYTES_PER_PARAMETER = 0.6
# training memory as a multiple of the weights' memory:
#   lora / qlora: the frozen weights, plus 20% for the adapter, its gradients and AdamW
#     states (1-3% of the model each at r <= 64) and the activations of small batches;
#   dora: as lora, with the extra weight-norm activations;
#   full: weights + gradients + AdamW's two moments (all in the weights' dtype) + 10%.
TRAINING_FACTOR = {"lora": 1.2, "qlora": 1.2, "dora": 1.3, "full": 4.4}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
GiB = 1 << 30
MiB = 1 << 20


class ResourceError(FactoryError, ValueError):
    """Not enough memory or disk for what a stage is about to do, or an invalid reserve setting."""


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


# --- the model's size --------------------------------------------------------------------------


def model_dir(base: str | Path) -> Path | None:
    """The local folder of a base model: the folder itself, or a hub id's snapshot in the
    local Hugging Face cache; None when neither exists (nothing is downloaded)."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(str(base), "config.json")
    except Exception:  # an id the hub client rejects is not cached either
        return None
    return Path(config).parent if isinstance(config, str) else None


def config_parameters(config: dict[str, Any]) -> int:
    """Exact parameter count of the causal LM a config.json mapping describes.

    The model is built by transformers on the meta device (no memory is allocated, a 70B
    takes about a second), so every architecture transformers knows is counted as it
    would load, tied embeddings once. Raises ValueError when transformers cannot build a
    causal LM from the mapping (no or unknown `model_type`, inconsistent sizes).
    """
    return sum(p.numel() for p in meta_model(config).parameters())


def meta_model(config: dict[str, Any]):
    """The causal LM a config.json mapping describes, built on the meta device (no memory).

    Raises ValueError when transformers cannot build one (no or unknown `model_type`,
    inconsistent sizes).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(config)
    try:
        built = AutoConfig.for_model(settings.pop("model_type"), **settings)
        with torch.device("meta"):  # (accelerate's init_empty_weights leaves tied embeddings untied)
            return AutoModelForCausalLM.from_config(built)
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"cannot build a causal LM from this config: {err!r}") from None


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, else every one in the folder."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def safetensors_parameters(path: Path) -> int:
    """Parameter count of one safetensors file, from its header (safetensors maps the file;
    no weight is read). Raises OSError when the file is unreadable or not safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as f:
            return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    except SafetensorError as err:
        raise OSError(f"{path}: not a safetensors file ({err})") from None


def parameter_count(base: str | Path) -> tuple[int, str] | None:
    """(parameters, where the count came from) for a base model, or None when it has no local
    folder or config.json to count from.

    Safetensors headers give the exact count; without weight files (or with unreadable
    ones) the count is computed from config.json (`config_parameters`). An architecture
    whose config lacks the sizes `config_parameters` reads gives None too. Raises nothing.
    """
    folder = model_dir(base)
    if folder is None:
        return None
    try:
        files = _weight_files(folder)
        if files:
            return sum(safetensors_parameters(f) for f in files), f"{len(files)} safetensors file(s)"
    except (ValueError, OSError, KeyError, TypeError, AttributeError):
        pass  # a missing shard or a corrupt header: fall back on the config
    config_path = folder / "config.json"
    try:
        return config_parameters(json.loads(config_path.read_text())), str(config_path)
    except (OSError, ValueError, AttributeError, TypeError):
        return None  # no usable config: loading the model reports that better than an estimate could


def bytes_per_parameter(method: str, precision: str) -> float:
    """Memory per weight as a recipe loads the base: 4-bit for qlora, else its precision."""
    return QLORA_BYTES_PER_PARAMETER if method == "qlora" else BYTES_PER_PARAMETER[precision]


def training_memory_bytes(parameters: int, method: str, precision: str) -> int:
    """Estimated memory of a training run: the weights x the method's `TRAINING_FACTOR`."""
    return int(parameters * bytes_per_parameter(method, precision) * TRAINING_FACTOR[method])


# --- memory --------------------------------------------------------------------------------------


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory_bytes() -> int | None:
    """Memory this process can still use: /proc/meminfo's MemAvailable, lowered to what is
    left under a cgroup (container) memory limit when there is one; None when unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None:
            available = min(available, max(limit - usage, 0))
    return available


def check_memory(base: str | Path, method: str, precision: str) -> int | None:
    """Raise ResourceError when training `base` with `method` at `precision` cannot fit in RAM.

    The estimate (`training_memory_bytes` of `parameter_count`) is compared with
    `available_memory_bytes()`; the error names the model, the estimate and what is
    available. Returns the estimate in bytes, or None when the check was skipped: the base
    has no local folder, no weight files and no usable config.json (a hub id that is not
    cached: loading it fails with its own clear error), or the available memory is unknown.

    Reads only config.json and safetensors headers: nothing is loaded.
    """
    counted = parameter_count(base)
    available = available_memory_bytes()
    if counted is None or available is None:
        return None
    parameters, source = counted
    need = training_memory_bytes(parameters, method, precision)
    if need > available:
        raise ResourceError(
            f"base model {str(base)!r} is too large for this machine's memory: {parameters / 1e9:.2f}B parameters "
            f"(from {source}) need about {_size(need)} to train with {method} at {precision}, and "
            f"{_size(available)} is available; use a smaller base model, method qlora on a GPU, or a larger machine")
    return need


# --- GPU memory ----------------------------------------------------------------------------------

# bitsandbytes NF4: 4 bits a weight plus its block's absmax (blocks of 64): an fp32 absmax, or with
# double quantization an 8-bit one plus an fp32 constant per 256 blocks
NF4_BYTES = {False: 0.5 + 4 / 64, True: 0.5 + 1 / 64 + 4 / (64 * 256)}
# TRL's chunked log-prob head on CUDA (trl/kernels/chunked_logprob.py): fp32 tiles of up to 4096
# tokens x 32768 vocabulary entries, a product buffer and its tile; never the batch's logits
HEAD_TILE_BYTES = 2 * 4096 * 32768 * 4
CUDA_CONTEXT_BYTES = GiB  # the CUDA context and cuBLAS/cuDNN workspaces, about 0.5-1 GiB
ALLOCATOR_SLACK = 0.10  # PyTorch's caching allocator: blocks cached but not reusable (fragmentation)


@dataclass(frozen=True)
class GpuMemory:
    """Estimated bytes one GPU holds while training (`gpu_training_memory`), part by part."""

    weights: int
    parameters: int  # the model's
    trainable: int  # the parameters the optimizer updates (the adapter, or every weight)
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    tokens: int  # of a micro-batch: batch_size x max_seq_length

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    def summary(self) -> str:
        return (f"weights {_size(self.weights)}, trainable parameters' gradients {_size(self.gradients)} and "
                f"optimizer state {_size(self.optimizer)}, activations {_size(self.activations)} for "
                f"{self.tokens} tokens a micro-batch, CUDA context and allocator {_size(self.overhead)}")


def _linears(model) -> list[tuple[str, Any]]:
    """(name, layer) of the model's linear layers, its output head (the LM head) excepted, as PEFT's
    "all-linear" and bitsandbytes' 4-bit loading leave it out."""
    import torch

    head = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def gpu_training_memory(config: dict[str, Any], recipe: Any, processes: int = 1) -> GpuMemory:
    """Estimated GPU memory of one process training the model of `config` (a config.json mapping)
    with `recipe` (a `factory.recipe.Recipe`), on `processes` GPUs.

    * weights: qlora's linear layers in NF4 (`NF4_BYTES`), its other weights (embeddings, norms,
      the LM head) in fp32, as PEFT's `prepare_model_for_kbit_training` casts them; else every
      weight in the recipe's precision.
    * trainable: LoRA's A and B (r x (in + out)) on the targeted linear layers (DoRA adds a
      magnitude per output), in bf16 for qlora (TRL casts a quantized model's adapters) and fp32
      otherwise (PEFT's); full: every weight, in the recipe's precision. Gradients take as much;
      the optimizer two moments each (AdamW, in the parameters' dtype), or 2 bytes for an 8-bit one.
    * activations of a micro-batch of batch_size x max_seq_length tokens (a padding-free row holds
      at most that), in 16 bits unless fp32: per layer and token, the inputs each layer keeps for
      its backward (6h + 2kv + 4i values for a Llama-style layer with fused attention, no score
      matrix; plus 6h + i for LoRA dropout's copies), or with gradient checkpointing each layer's
      input and one layer's set; plus TRL's head tiles (`HEAD_TILE_BYTES`).
    * overhead: the CUDA context plus `ALLOCATOR_SLACK` of the rest.
    DeepSpeed ZeRO-2 shards gradients and optimizer state over `processes`, ZeRO-3 the weights too
    (adding two layers' weights gathered at a time); DDP and one process shard nothing.
    Raises ValueError when transformers cannot build the model (`meta_model`).
    """
    model = meta_model(config)
    text = model.config.get_text_config()
    layers = text.num_hidden_layers
    total = sum(p.numel() for p in model.parameters())
    linears = _linears(model)
    width = 2 if recipe.precision in ("bf16", "fp16") else 4

    if recipe.method == "qlora":
        quantized = sum(m.weight.numel() for _, m in linears)
        weights = quantized * NF4_BYTES[recipe.quantization.double_quant] + (total - quantized) * 4
    else:
        weights = total * width
    if recipe.method == "full":
        trainable, trainable_width = total, width
    else:
        targets = recipe.lora.target_modules
        adapted = [m for n, m in linears if targets == "all-linear" or n.rsplit(".", 1)[-1] in targets]
        trainable = sum(recipe.lora.r * (m.in_features + m.out_features) for m in adapted)
        trainable += sum(m.out_features for m in adapted) if recipe.method == "dora" else 0
        trainable_width = 2 if recipe.method == "qlora" else 4
    gradients = trainable * trainable_width
    optimizer = trainable * (2 if "8bit" in recipe.optimizer else 2 * trainable_width)

    shards = processes if recipe.distributed.startswith("deepspeed") else 1
    if recipe.distributed == "deepspeed_zero3" and shards > 1:
        weights = weights / shards + 2 * weights / layers
    gradients, optimizer = gradients / shards, optimizer / shards

    tokens = recipe.batch_size * recipe.max_seq_length
    activations = tokens * activation_bytes_per_token(text, recipe, recipe.gradient_checkpointing) + HEAD_TILE_BYTES
    rest = weights + gradients + optimizer + activations
    return GpuMemory(weights=int(weights), parameters=total, trainable=int(trainable), gradients=int(gradients),
                     optimizer=int(optimizer), activations=int(activations),
                     overhead=int(CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * rest), tokens=tokens)


def activation_bytes_per_token(text_config: Any, recipe: Any, checkpointing: bool) -> float:
    """Bytes a training token's activations hold until its backward (a Llama-style decoder's `text_config`):
    per layer the inputs it keeps (6h + 2kv + 4i values with fused attention, no score matrix; plus
    6h + i for LoRA dropout's copies), or with gradient checkpointing each layer's input and one
    layer's set, plus the final hidden state; 16 bits unless fp32."""
    h, i, layers = text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers
    kv = getattr(text_config, "head_dim", None) or h // text_config.num_attention_heads
    kv *= getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    width = 2 if recipe.precision in ("bf16", "fp16") else 4
    per_layer = 6 * h + 2 * kv + 4 * i + (6 * h + i if recipe.method != "full" and recipe.lora.dropout else 0)
    kept = layers * h + per_layer if checkpointing else layers * per_layer
    return (kept + h) * width


# Peak bytes per token of a CPU training step over `activation_bytes_per_token`, by gradient checkpointing:
# PyTorch's CPU kernels keep more than the inputs (the recomputed layer's temporaries, the allocator's
# cached blocks). Fitted to SmolLM2-135M, LoRA r16, fp32, one padding-free row of 1-8k tokens on this
# 2-core x86 machine (bench/LOG.md, 2026-12-07), and applied to other bases through the formula.
CPU_ACTIVATION_FACTOR = {False: 1.85, True: 9.6}
CPU_STEP_OVERHEAD = 650 * MiB  # what a step holds whatever its length (the head, the optimizer's temporaries)


def cpu_step_bytes(config: Any, recipe: Any, tokens: int, checkpointing: bool) -> int:
    """Estimated peak memory of one CPU training step over `tokens` tokens (a padding-free micro-batch) of the
    model of transformers `config`, beyond its weights and optimizer state. Checkpointing never estimates more
    than running without it (a model of few layers keeps about as much either way)."""
    text = config.get_text_config()
    per_token = min(activation_bytes_per_token(text, recipe, ck) * CPU_ACTIVATION_FACTOR[ck]
                    for ck in {False, checkpointing})
    return int(tokens * per_token + CPU_STEP_OVERHEAD)


def check_gpu_memory(base: str | Path, recipe: Any, free: list[int], processes: int = 1) -> GpuMemory | None:
    """Raise ResourceError when training `base` with `recipe` does not fit the GPUs whose free bytes
    are `free` (one entry per GPU this process checks), each holding `gpu_training_memory`.

    Returns the estimate, or None when the base has no local config.json to estimate from (a hub
    id not cached: loading reports that) or transformers cannot build it. The error names the
    model, each part of the estimate, the GPU and its free memory, and what would lower the need.
    """
    folder = model_dir(base)
    try:
        config = json.loads((folder / "config.json").read_text()) if folder else None
        need = gpu_training_memory(config, recipe, processes) if config else None
    except (OSError, ValueError):
        return None
    if need is None:
        return None
    short = [(gpu, f) for gpu, f in enumerate(free) if need.total > f]
    if short:
        gpu, available = short[0]
        raise ResourceError(
            f"base model {str(base)!r} does not fit GPU {gpu}: {recipe.method} at {recipe.precision} needs about "
            f"{_size(need.total)} per GPU ({need.summary()}) and {_size(available)} is free there; lower batch_size "
            "or max_seq_length, turn on gradient_checkpointing, use method qlora, or shard over more GPUs "
            "(distributed: deepspeed_zero3)")
    return need


def visible_gpus_free_bytes(recipe: Any) -> tuple[list[int], int]:
    """(free bytes of each GPU this process will use, processes the run shards over), from
    `torch.cuda.mem_get_info`. A launched worker (LOCAL_RANK set) checks its own GPU, the others
    may already hold its siblings' weights; a single process checks GPU 0.
    """
    import torch

    if "LOCAL_RANK" in os.environ:
        rank = int(os.environ["LOCAL_RANK"])
        return [torch.cuda.mem_get_info(rank)[0]], int(os.environ.get("WORLD_SIZE", "1"))
    if recipe.distributed == "none":
        return [torch.cuda.mem_get_info(0)[0]], 1
    processes = recipe.num_processes or torch.cuda.device_count()
    return [torch.cuda.mem_get_info(g)[0] for g in range(processes)], processes


# --- disk ----------------------------------------------------------------------------------------


def min_free_bytes() -> int:
    """The free space every write must leave: `FACTORY_MIN_FREE_MB` MiB (default 200).

    Raises ResourceError when the variable is not a non-negative number.
    """
    raw = os.environ.get(MIN_FREE_ENV, str(DEFAULT_MIN_FREE_MB))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or math.isinf(value):
        raise ResourceError(f"{MIN_FREE_ENV}={raw!r}: expected a number of MiB >= 0")
    return int(value * MiB)


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(path: str | Path, need_bytes: int) -> int:
    """Raise ResourceError unless the file system of `path` has `need_bytes` free, plus the
    `FACTORY_MIN_FREE_MB` reserve. Returns the free bytes.

    `path` need not exist yet: the nearest existing parent is measured
    (`shutil.disk_usage`). The error names the path, the need, the reserve and the free
    space, or the invalid `FACTORY_MIN_FREE_MB`.
    """
    reserve = min_free_bytes()
    free = shutil.disk_usage(_existing(Path(path))).free
    need = max(int(need_bytes), 0)
    if free < need + reserve:
        raise ResourceError(
            f"disk too full to write {path}: need {_size(need)} plus {_size(reserve)} kept free "
            f"({MIN_FREE_ENV}), and {_size(free)} is free there")
    return free


def files_bytes(paths: list[Path]) -> int:
    """Total size of `paths` (missing files count 0)."""
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


def weights_bytes(base: str | Path, method: str = "lora", precision: str = "fp32") -> int:
    """The base model's size: its weight files on disk, else its parameters x their in-memory
    bytes; 0 when unknown (no local folder)."""
    folder = model_dir(base)
    if folder is None:
        return 0
    on_disk = files_bytes([p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)])
    if on_disk:
        return on_disk
    counted = parameter_count(base)
    return int(counted[0] * bytes_per_parameter(method, precision)) if counted else 0


def training_disk_bytes(base: str | Path, method: str, precision: str) -> int:
    """Disk a training run writes, as a bound: full fine-tuning keeps up to two checkpoints and
    the final model, so 3x the base's size; an adapter run's checkpoints hold the adapter and
    its optimizer states, a fraction of the base, so 1x the base's size bounds them."""
    return (3 if method == "full" else 1) * weights_bytes(base, method, precision)


def preflight_training(base: str | Path, method: str, precision: str, out_dir: str | Path,
                       recipe: Any = None) -> int | None:
    """`check_memory` for the run (with CUDA: `check_gpu_memory` of the `recipe`, when given,
    on the GPUs `visible_gpus_free_bytes` names), then `check_disk` of `out_dir` for
    `training_disk_bytes`. Returns `check_memory`'s estimate of the weights and optimizer state
    in RAM (None on CUDA or when it was skipped).

    Called by `train.train` before the tokenizer or any weight is loaded; raises
    ResourceError naming what does not fit.
    """
    import torch

    need = None
    if not torch.cuda.is_available():
        need = check_memory(base, method, precision)
    elif recipe is not None:
        check_gpu_memory(base, recipe, *visible_gpus_free_bytes(recipe))
    check_disk(out_dir, training_disk_bytes(base, method, precision))
    return need
