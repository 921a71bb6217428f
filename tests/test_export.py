"""Exports of a registered specialist (`factory export`, `factory routes --export llamacpp`), each loaded back.

One module-scoped workspace: the synthetic classification task of test_registry.py, trained on the
tiny random Llama (SmolLM2's tokenizer and ChatML template) and registered as v1, made champion.
GGUF files are read back with the gguf package's reader and loaded with transformers' GGUF loader,
whose logits are compared with the PyTorch specialist's: a wrong tensor name, q/k permutation or
LoRA scale shows there, not only in the greedy answers of a random model.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from factory.export import ExportError, apply_gguf_adapter, load_gguf, ollama_template, write_gguf
from conftest import enter_workspace
from test_registry import TASK, cli, recipe_args, write_records

PROMPT = "<|im_start|>system\nSort the ticket.<|im_end|>\n<|im_start|>user\nwhere is my parcel<|im_end|>\n" \
         "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir):
    """The workspace with v1 of the task registered and champion; yields its paths."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        enter_workspace(root, mp)
        write_records(root / "datasets", 60)
        cli("mine", "--min-examples", "20")
        cli("train", TASK, *recipe_args(tiny_model_dir, 0))
        cli("register", TASK, *recipe_args(tiny_model_dir, 0))
        cli("promote", TASK, "--min-teacher-share", "0")
        adapter = next((root / "registry" / "training" / TASK).glob("*/adapter"))
        yield {"root": root, "exports": root / "registry" / "exports" / TASK / "v1", "tiny": tiny_model_dir,
               "adapter": adapter}


def specialist_logits(ws) -> torch.Tensor:
    from factory.models import load_specialist

    model, tokenizer = load_specialist(str(ws["tiny"]), str(ws["adapter"]))
    return logits(model, tokenizer)


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)).logits[0]


def fields(path: Path) -> dict:
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def recorded(key: str) -> dict:
    return json.loads(MlflowClient().get_model_version(TASK, "1").tags[f"export.{key}"])


def test_merged_loads_without_peft_and_is_recorded_with_its_sha256(ws):
    import mlflow

    result = cli("export", TASK, "--format", "merged", "--prompts", "6")
    assert "merged: ok - agreement 1.000 on 6 test prompts" in result.text
    folder = ws["exports"] / "merged"
    assert not (folder / "adapter_config.json").exists() and (folder / "chat_template.jinja").exists()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not hasattr(model, "peft_config")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert torch.allclose(logits(model, tokenizer), specialist_logits(ws), atol=1e-4)

    record = recorded("merged")
    assert record["status"] == "ok" and record["n"] == 6 and record["agreement"] == 1.0
    from factory.io import sha256_file

    assert record["sha256"]["model.safetensors"] == sha256_file(folder / "model.safetensors")
    logged = {Path(f.path).name for f in mlflow.artifacts.list_artifacts(record["artifact_uri"])}
    assert {"model.safetensors", "tokenizer.json", "export.json"} <= logged


@pytest.mark.parametrize("quant,ggml,atol", [("f16", "F16", 2e-2), ("q8_0", "Q8_0", 5e-2), ("q4_0", "Q4_0", None)])
def test_gguf_reads_back_and_generates_like_the_specialist(ws, quant, ggml, atol):
    result = cli("export", TASK, "--format", "gguf", "--quant", quant, "--prompts", "6", "--min-agreement", "0")
    assert f"gguf.{quant}: ok" in result.text
    path = ws["exports"] / "gguf" / f"{TASK}-{quant}.gguf"
    meta = fields(path)
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and "<|im_start|>" in meta["tokenizer.chat_template"]
    tensors = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert tensors["blk.1.attn_q.weight"] == ggml and tensors["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in tensors  # tied to token_embd
    assert tensors["token_embd.weight"] == ("Q8_0" if quant == "q4_0" else ggml)

    model, tokenizer = load_gguf(path)
    got = logits(model, tokenizer)
    if atol is not None:  # q4_0 of a random model is too coarse to compare logit by logit
        assert torch.allclose(got, specialist_logits(ws), atol=atol)
    out = model.generate(**tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False), max_new_tokens=4,
                         do_sample=False)
    assert out.shape[1] > 0
    record = recorded(f"gguf.{quant}")
    assert 0 <= record["agreement"] <= 1 and record["min_agreement"] == 0
    assert set(record["sha256"]) == {path.name}


def test_adapter_gguf_follows_llama_cpp_conventions_and_applies_back(ws):
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    cli("export", TASK, "--format", "gguf-adapter", "--prompts", "6")
    path = ws["exports"] / "gguf-adapter" / "adapter-f32.gguf"
    meta = fields(path)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama"
    config = json.loads((ws["adapter"] / "adapter_config.json").read_text())
    assert meta["adapter.lora.alpha"] == config["lora_alpha"]
    tensors = {t.name: np.asarray(t.data) for t in GGUFReader(path).tensors}
    assert len(tensors) == 2 * 2 * 7  # two layers, seven linear modules, A and B
    peft = load_file(ws["adapter"] / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0"
    assert np.array_equal(tensors["blk.0.ffn_down.weight.lora_a"], peft[f"{prefix}.mlp.down_proj.lora_A.weight"].numpy())
    # llama.cpp's rotary layout: transformers' GGUF loader undoes it on q's rows, so must it on lora_b's
    tiny = json.loads((ws["tiny"] / "config.json").read_text())
    processor = LlamaTensorProcessor(config=tiny)
    back = processor.process(tensors["blk.0.attn_q.weight.lora_b"], "blk.0.attn_q.weight").weights
    assert np.array_equal(back, peft[f"{prefix}.self_attn.q_proj.lora_B.weight"].numpy())

    base = AutoModelForCausalLM.from_pretrained(ws["tiny"]).eval()
    apply_gguf_adapter(base, path)
    assert torch.allclose(logits(base, AutoTokenizer.from_pretrained(ws["tiny"])), specialist_logits(ws), atol=1e-4)
    assert recorded("gguf-adapter.f32")["agreement"] == 1.0


def test_ollama_folder_has_the_gguf_and_a_chatml_modelfile(ws):
    cli("export", TASK, "--format", "ollama", "--prompts", "6", "--min-agreement", "0")
    folder = ws["exports"] / "ollama" / "ollama-q8_0"
    modelfile = (folder / "Modelfile").read_text()
    assert f"FROM ./{TASK}-q8_0.gguf" in modelfile and (folder / f"{TASK}-q8_0.gguf").exists()
    assert '{{ .Role }}\n{{ .Content }}<|im_end|>' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "PARAMETER temperature 0" in modelfile
    model, tokenizer = load_gguf(folder / f"{TASK}-q8_0.gguf")
    assert model.config.num_hidden_layers == 2
    assert recorded("ollama.q8_0")["status"] == "ok"


def test_an_export_below_the_agreement_threshold_fails_and_is_recorded_failed(ws):
    result = cli("export", TASK, "--format", "gguf", "--quant", "q4_0", "--prompts", "6", "--min-agreement", "1.01",
                 ok=False)
    assert result.exit_code == 1 and "gguf.q4_0: failed" in result.text
    assert "below the agreement threshold" in result.text
    assert recorded("gguf.q4_0")["status"] == "failed"


def test_bad_formats_quants_and_versions_are_refused_with_their_reason(ws):
    assert "unknown export format 'onnx'" in cli("export", TASK, "--format", "onnx", ok=False).text
    refused = cli("export", TASK, "--format", "gguf", "--quant", "q4_k_m", ok=False).text
    assert "q4_k_m does not apply to --format gguf" in refused and "q4_0" in refused
    assert "does not apply to --format merged" in cli("export", TASK, "--format", "merged", "--quant", "f16",
                                                       ok=False).text
    assert f"task '{TASK}' has no version 7" in cli("export", TASK, "--format", "merged", "--version", "7",
                                                    ok=False).text


def test_other_architectures_and_chat_templates_are_refused(ws, tmp_path):
    config = json.loads((ws["tiny"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ExportError, match="model_type 'gpt2' cannot be exported to GGUF"):
        write_gguf(tmp_path, tmp_path / "x.gguf", "f16", "gpt2-model")
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn"}}))
    with pytest.raises(ExportError, match="RoPE scaling 'yarn'"):
        write_gguf(tmp_path, tmp_path / "x.gguf", "f16", "yarn-model")
    tokenizer = AutoTokenizer.from_pretrained(ws["tiny"])
    tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    with pytest.raises(ExportError, match="not ChatML"):
        ollama_template(tokenizer, "task v1")


def test_routes_export_llamacpp_writes_base_and_adapter_ggufs_and_a_server_command(ws):
    cli("routes", "--export", "llamacpp")
    exports = ws["root"] / "registry" / "exports"
    script = (exports / "llamacpp.sh").read_text()
    base = exports / "llamacpp" / f"base-{ws['tiny'].name}-f16.gguf"
    adapter = exports / "llamacpp" / f"{TASK}-v1.gguf"
    assert f"llama-server -m {base.resolve()} --port 8080 --lora-scaled {adapter.resolve()}:0" in script
    assert fields(base)["general.type"] == "model" and fields(adapter)["general.type"] == "adapter"
    request = json.loads((exports / "llamacpp-requests.json").read_text())[TASK]
    assert request["body"]["lora"] == [{"id": 0, "scale": 1.0}]
    assert request["body"]["prompt"].endswith("<|im_start|>assistant\n")
    syntax = subprocess.run(["sh", "-n", str(exports / "llamacpp.sh")], capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
