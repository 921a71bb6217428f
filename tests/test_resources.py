"""Resource preflight (factory/resources.py): the model-size estimate against real models, and the
memory and disk checks against this machine's real /proc/meminfo and file systems (no mocks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from factory import resources
from factory.errors import FactoryError
from factory.resources import (MIN_FREE_ENV, ResourceError, check_disk, check_memory, config_parameters,
                               parameter_count, training_memory_bytes)

# Meta-Llama-3-70B's config.json (the sizes; no weights), shared with conftest's too_large_config
LLAMA_70B = json.loads((Path(__file__).parent / "fixtures" / "llama-3-70b-config.json").read_text())
# GPT-2 small as its hub config.json has it: no tie_word_embeddings (tied), no n_inner (4 x n_embd)
GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}


def _config_only(model: Path, dest: Path) -> Path:
    """A folder with `model`'s config.json and no weights: the count must come from the config."""
    dest.mkdir()
    shutil.copy(model / "config.json", dest)
    return dest


def test_the_tiny_models_estimate_is_within_20_percent_of_its_real_size(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    real_parameters = sum(p.numel() for p in model.parameters())
    real_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    from_config, source = parameter_count(_config_only(tiny_model_dir, tmp_path / "config-only"))
    assert source.endswith("config.json")
    estimate = from_config * resources.bytes_per_parameter("lora", "fp32")
    assert abs(estimate - real_bytes) <= 0.2 * real_bytes, (estimate, real_bytes)
    assert parameter_count(tiny_model_dir) == (real_parameters, "1 safetensors file(s)")  # headers: exact
    corrupt = _config_only(tiny_model_dir, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert parameter_count(corrupt) == (from_config, str(corrupt / "config.json"))  # falls back on the config


def test_smollm2s_config_estimate_matches_its_weights(smollm2_dir, tmp_path):
    exact, source = parameter_count(smollm2_dir)
    assert source.endswith("safetensors file(s)") and 130e6 < exact < 140e6
    estimate, _ = parameter_count(_config_only(smollm2_dir, tmp_path / "config-only"))
    assert abs(estimate - exact) <= 0.01 * exact


@pytest.mark.parametrize(("config", "published"), [(LLAMA_70B, 70.55e9), (GPT2, 124.4e6)])
def test_published_parameter_counts_from_configs(config, published):
    assert abs(config_parameters(config) - published) <= 0.01 * published


def test_training_memory_by_method_and_precision():
    n = 1_000_000_000
    lora = training_memory_bytes(n, "lora", "fp32")
    assert lora == int(n * 4 * 1.2)
    assert training_memory_bytes(n, "lora", "bf16") == lora // 2
    assert training_memory_bytes(n, "full", "fp32") > 3 * lora  # weights + gradients + two AdamW moments
    assert training_memory_bytes(n, "qlora", "bf16") < training_memory_bytes(n, "lora", "bf16") / 3


def test_a_config_without_sizes_is_not_counted(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    assert parameter_count(tmp_path) is None
    with pytest.raises(ValueError, match="mystery"):
        config_parameters({"model_type": "mystery"})
    assert parameter_count(tmp_path / "missing") is None  # no folder, not in the hub cache


def test_check_memory_refuses_a_model_too_large_naming_it_and_passes_the_tiny_one(tmp_path, tiny_model_dir,
                                                                                 too_large_config):
    config, parameters = too_large_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ResourceError) as err:
        check_memory(str(tmp_path), "lora", "fp32")
    message = str(err.value)
    assert str(tmp_path) in message and f"{parameters / 1e9:.2f}B parameters" in message and "is available" in message
    assert isinstance(err.value, FactoryError) and isinstance(err.value, ValueError)  # the CLI's one-line error
    assert 0 < check_memory(str(tiny_model_dir), "full", "fp32") < resources.available_memory_bytes()


def test_check_disk_against_the_real_free_space(tmp_path, monkeypatch):
    monkeypatch.delenv(MIN_FREE_ENV, raising=False)
    free = shutil.disk_usage(tmp_path).free
    target = tmp_path / "not" / "yet" / "there"  # measured at the nearest existing parent
    assert abs(check_disk(target, 1024) - free) < 1 << 30
    with pytest.raises(ResourceError, match="disk too full to write .*there: need"):
        check_disk(target, free + (1 << 30))
    monkeypatch.setenv(MIN_FREE_ENV, str(free // 2**20 + 1024))
    with pytest.raises(ResourceError, match=MIN_FREE_ENV) as err:
        check_disk(target, 0)
    assert str(target) in str(err.value) and "is free there" in str(err.value)
    monkeypatch.setenv(MIN_FREE_ENV, "lots")
    with pytest.raises(ResourceError, match="FACTORY_MIN_FREE_MB='lots'"):
        check_disk(target, 0)
    assert not (tmp_path / "not").exists()


def test_mine_checks_the_disk_before_doing_anything(tmp_path, monkeypatch):
    from factory.mine import mine
    from factory.records import Record

    records = [Record(id=f"r{i}", source="openai", location=f"x:{i}", output_text="billing",
                      messages=[{"role": "user", "content": f"question {i}"}]) for i in range(5)]
    monkeypatch.setenv(MIN_FREE_ENV, str(shutil.disk_usage(tmp_path).free // 2**20 + 1024))
    with pytest.raises(ResourceError, match="disk too full"):
        mine(records, tmp_path / "datasets")
    assert not (tmp_path / "datasets").exists()
