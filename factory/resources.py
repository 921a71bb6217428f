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
"""

from __future__ import annotations

import json
import math
import os
import shutil
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
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(config)
    try:
        built = AutoConfig.for_model(settings.pop("model_type"), **settings)
        with torch.device("meta"):  # (accelerate's init_empty_weights leaves tied embeddings untied)
            model = AutoModelForCausalLM.from_config(built)
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"cannot build a causal LM from this config: {err!r}") from None
    return sum(p.numel() for p in model.parameters())


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


def preflight_training(base: str | Path, method: str, precision: str, out_dir: str | Path) -> None:
    """`check_memory` for the run, then `check_disk` of `out_dir` for `training_disk_bytes`.

    Called by `train.train` before the tokenizer or any weight is loaded; raises
    ResourceError naming what does not fit. With CUDA the weights go to GPU
    memory, which is not checked: an oversized model fails there with torch's
    OutOfMemoryError while loading.
    """
    import torch

    if not torch.cuda.is_available():
        check_memory(base, method, precision)
    check_disk(out_dir, training_disk_bytes(base, method, precision))
