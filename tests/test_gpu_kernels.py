"""The GPU path's kernel choices, checked on CPU: which attention runs where, what the CUDA paths feed
the model, the Liger flag, the GPU-memory preflight, and `python -m bench.gpu` without CUDA.

The device facts (device type, flash-attn installed, free GPU memory) are passed in; nothing
fakes CUDA globally. What can only run on a GPU (FlashAttention's and Liger's kernels, the
GPU bench's figures) is not claimed here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import SFTTrainer

from bench.gpu import (LLAMA31_8B, NO_CUDA, QWEN25_7B, RESULT, TASK_SHAPES, flops_per_token, mix, mix_mean_tokens,
                       peak_tflops, run_case, synthetic_examples)
from factory.models import load_tokenizer
from factory.recipe import load_recipe
from factory.resources import GiB, ResourceError, check_gpu_memory, config_parameters, gpu_training_memory
from factory.train import (ATTENTION_PATHS, SharedPrefixCollator, attention_path, liger_kernel, setup_data,
                           setup_model, setup_trainer, training_args)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
GPU_RECIPES = ("qlora-7b", "qlora-7b-llama", "qlora-7b-mistral", "lora-8b-zero3")
SYSTEM = "Route the customer's request: answer with the tool to call."
TOOLS = [{"type": "function", "function": {"name": "get_order_status", "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string"}}}}}]


def _rows(n: int) -> list[dict]:
    """Tool calls of one subtask, of different lengths (padding has something to pad)."""
    return [{"messages": [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": f"Where is my order A{10000 + i * 7}?" + " Please." * (3 * i)}],
             "tools": TOOLS,
             "output": {"content": None, "tool_calls": [{"name": "get_order_status",
                                                         "arguments": {"order_id": f"A{10000 + i * 7}"}}]}}
            for i in range(n)]


def _recipe(name: str = "cpu-lora", *overrides: str):
    return load_recipe(None, name, list(overrides), RECIPES)[0]


# --- which attention runs where ---------------------------------------------------------------------


def test_attention_path_by_device_and_recipe():
    cpu, qlora = _recipe(), _recipe("qlora-7b")
    assert attention_path(cpu, "cpu", flash_attn=False) == "sdpa_varlen"
    assert attention_path(cpu, "cpu", flash_attn=True) == "sdpa_varlen"  # flash-attn has no CPU kernel
    assert attention_path(qlora, "cuda", flash_attn=True) == "flash_attention_2"
    assert attention_path(qlora, "cuda", flash_attn=False) == "sdpa_packed"
    assert attention_path(cpu, "cuda", flash_attn=True) == "sdpa_packed"  # fp32: FlashAttention has no fp32 kernel
    for device, flash in (("cpu", False), ("cuda", True), ("cuda", False)):
        assert attention_path(_recipe("qlora-7b", "padding_free=false"), device, flash) == "padded"
    assert {ATTENTION_PATHS[p][0] for p in ("flash_attention_2", "sdpa_packed")} == {"flash_attention_2", "sdpa"}
    assert [p for p, (_, rows) in ATTENTION_PATHS.items() if not rows] == ["padded"]


def test_the_cuda_paths_batches_give_the_padded_loss_on_cpu(tiny_model_dir, tmp_path):
    """The CUDA path without flash-attn, run on CPU as it runs there: transformers' sdpa (the
    implementation "sdpa_packed" names), TRL's padding-free collator and TRL's own loss (the one
    `FactorySFTTrainer` keeps on CUDA), against the model's loss on padded batches.

    FlashAttention-2 has no CPU kernel: what it is fed, the same collated row, is checked instead
    (positions restart at each example, which is where the bounds come from; no label crosses one).
    """
    recipe = _recipe("cpu-lora", f"base_model={tiny_model_dir}", "batch_size=4")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = [dict(e) for e in setup_data(_rows(4), tokenizer, recipe)[0]]
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) == 4

    implementation = ATTENTION_PATHS[attention_path(recipe, "cuda", flash_attn=False)][0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation)
    trainer = setup_trainer(training_args(recipe, tmp_path, evaluate=False), model, tokenizer,
                            setup_data(_rows(4), tokenizer, recipe)[0], None, shared_prefix=True)
    collate = trainer.data_collator
    assert not isinstance(collate, SharedPrefixCollator)  # the shared prefix needs `_varlen_sdpa`
    row = collate(examples)
    assert "attention_mask" not in row and row["input_ids"].shape == (1, sum(lengths))

    starts = [sum(lengths[:i]) for i in range(4)]
    positions = row["position_ids"][0]
    assert (positions == 0).nonzero().flatten().tolist() == starts
    assert row["cu_seq_lens_q"].tolist() == [*starts, sum(lengths)]
    for start, n in zip(starts, lengths):
        assert positions[start:start + n].tolist() == list(range(n))
        assert row["labels"][0, start] == -100  # the previous example's last token predicts nothing

    padded = {"input_ids": torch.full((4, max(lengths)), tokenizer.pad_token_id),
              "attention_mask": torch.zeros(4, max(lengths), dtype=torch.long),
              "labels": torch.full((4, max(lengths)), -100)}
    for i, e in enumerate(examples):
        padded["input_ids"][i, :lengths[i]] = torch.tensor(e["input_ids"])
        padded["attention_mask"][i, :lengths[i]] = 1
        padded["labels"][i, :lengths[i]] = torch.tensor(e["labels"])
    model.eval()
    with torch.no_grad():
        reference = model(**padded).loss.item()
        packed = SFTTrainer.compute_loss(trainer, trainer.model, dict(row))
        crossing = model(input_ids=row["input_ids"], labels=row["labels"]).loss.item()  # no positions: no bounds
    assert packed.item() == pytest.approx(reference, abs=1e-5)
    assert abs(crossing - reference) > 1e-3


def test_the_shared_prefix_collator_is_used_only_with_per_example_attention(tiny_model_dir, tmp_path):
    recipe = _recipe("cpu-lora", f"base_model={tiny_model_dir}", "batch_size=4")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    train = setup_data(_rows(4), tokenizer, recipe)[0]
    args = training_args(recipe, tmp_path, evaluate=False)
    assert args.padding_free and not args.use_liger_kernel
    trainer = setup_trainer(args, setup_model(recipe, str(tiny_model_dir)), tokenizer, train, None, shared_prefix=True)
    assert isinstance(trainer.data_collator, SharedPrefixCollator)
    assert not training_args(_recipe("cpu-lora", f"base_model={tiny_model_dir}", "padding_free=false"),
                             tmp_path, evaluate=False).padding_free


# --- Liger kernels ------------------------------------------------------------------------------------


def test_liger_kernel_runs_on_cuda_only_and_is_refused_there_when_not_installed(capsys):
    on, off = _recipe("qlora-7b"), _recipe("qlora-7b", "use_liger_kernel=false")
    assert on.use_liger_kernel and not _recipe().use_liger_kernel
    assert on.digest() == off.digest()  # a speed setting: the same weights are learned
    assert liger_kernel(on, "cuda", installed=True)
    assert not liger_kernel(off, "cuda", installed=True)
    with pytest.raises(ValueError, match="needs liger-kernel"):
        liger_kernel(on, "cuda", installed=False)
    assert not liger_kernel(on, "cpu", installed=True)
    assert "use_liger_kernel ignored on cpu" in capsys.readouterr().out
    for name in GPU_RECIPES:
        assert _recipe(name).use_liger_kernel, name


# --- the GPU-memory preflight ---------------------------------------------------------------------------


def _base(tmp_path: Path, config: dict) -> Path:
    """A model folder holding only config.json, as the preflight reads it (no weights)."""
    folder = tmp_path / config["model_type"]
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_gpu_recipes_model_configs_count_their_published_parameters():
    assert config_parameters(QWEN25_7B) == 7_615_616_512  # Qwen2.5-7B: 7.61B
    assert config_parameters(LLAMA31_8B) == 8_030_261_248  # Llama 3.1 8B: 8.03B


def test_a_7b_qlora_fits_24_gib_and_is_refused_in_12_naming_its_parts(tmp_path):
    qwen, recipe = _base(tmp_path, QWEN25_7B), _recipe("qlora-7b")
    need = check_gpu_memory(qwen, recipe, [24 * GiB])
    assert need.total < 24 * GiB  # what check_gpu_memory let through
    assert need.gradients + need.optimizer < need.weights / 10  # an adapter's state, not the model's
    # NF4 linear layers (~3.4 GiB) + embeddings and LM head in fp32 (~4.1 GiB)
    assert 6.5 * GiB < need.weights < 8.5 * GiB
    assert need.trainable == 40_370_176  # r=16 on the 7 linear layers of 28 blocks
    with pytest.raises(ResourceError, match=r"does not fit GPU 1: qlora at bf16 needs about 1\d\.\d GiB per GPU "
                                            r"\(weights .*activations .* for 8192 tokens.*12\.0 GiB is free there"):
        check_gpu_memory(qwen, recipe, [24 * GiB, 12 * GiB])
    assert check_gpu_memory(tmp_path / "missing", recipe, [1]) is None  # no config to estimate from


def test_an_8b_full_fine_tune_does_not_fit_80_gib_and_zero3_shards_it(tmp_path):
    llama = _base(tmp_path, LLAMA31_8B)
    with pytest.raises(ResourceError, match="full at fp32 needs about 1[45]\\d\\.\\d GiB per GPU"):
        check_gpu_memory(llama, _recipe("lora-8b-zero3", "method=full", "precision=fp32"), [80 * GiB])
    one = gpu_training_memory(LLAMA31_8B, _recipe("lora-8b-zero3", "method=full"), processes=1)
    assert one.weights + one.gradients + one.optimizer >= 8 * 8_030_261_248  # bf16 weights, grads, 2 AdamW moments
    two = gpu_training_memory(LLAMA31_8B, _recipe("lora-8b-zero3", "method=full"), processes=2)
    assert two.total < 0.6 * one.total and two.activations == one.activations
    ddp = gpu_training_memory(LLAMA31_8B, _recipe("lora-8b-zero3", "method=full", "distributed=ddp"), processes=2)
    assert ddp.total == one.total  # DDP replicates everything


def test_activations_follow_the_batch_and_gradient_checkpointing(tmp_path):
    llama, recipe = _base(tmp_path, LLAMA31_8B), _recipe("lora-8b-zero3", "distributed=none")
    need = check_gpu_memory(llama, recipe, [80 * GiB])
    assert need.tokens == 4 * 4096 and need.activations < 12 * GiB
    with pytest.raises(ResourceError, match="activations 1\\d\\d\\.\\d GiB for 16384 tokens"):
        check_gpu_memory(llama, _recipe("lora-8b-zero3", "distributed=none", "gradient_checkpointing=false"),
                         [80 * GiB])
    half = gpu_training_memory(LLAMA31_8B, _recipe("lora-8b-zero3", "distributed=none", "batch_size=2"))
    assert half.activations < 0.6 * need.activations


# --- bench/gpu.py -------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is the no-CUDA path")
def test_bench_gpu_without_cuda_says_so_and_exits_0():
    before = RESULT.stat().st_mtime_ns if RESULT.exists() else None
    done = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert NO_CUDA in done.stdout
    assert (RESULT.stat().st_mtime_ns if RESULT.exists() else None) == before


def test_a_bench_case_trains_through_the_project_setup_and_reports_its_figures(tiny_model_dir, tmp_path):
    """The lora-8b case's recipe on the tiny model, on CPU: the code path of every figure but the
    GPU-only ones (MFU and peak GPU memory are None here)."""
    figures = run_case("lora-8b", tiny_model_dir, steps=4, out_dir=tmp_path)
    assert figures["attention_path"] == "sdpa_varlen" and figures["use_liger_kernel"] is False
    assert figures["steps_timed"] == 1 and figures["tokens_per_s"] > 0
    assert figures["mfu"] is None and figures["peak_gpu_memory_allocated_gib"] is None
    assert 0 < figures["trainable_parameters"] < figures["parameters"]
    mean = sum(len(e["input_ids"]) for e in mix(4000)) / 4000
    assert mix_mean_tokens() == pytest.approx(mean, rel=0.02)
    assert figures["seconds_per_10k_examples"] == pytest.approx(10_000 * mean / figures["tokens_per_s"], rel=0.02)
    assert set(figures["gpu_hours_10k_examples"]) == set(TASK_SHAPES)


def test_synthetic_examples_have_their_task_shape_and_lora_flops_count_no_frozen_weight_gradient():
    examples = synthetic_examples("respond", 8)
    _, shared, (p_min, p_max), (c_min, c_max) = TASK_SHAPES["respond"]
    assert len({tuple(e["input_ids"][:shared]) for e in examples}) == 1  # the task's system prompt and tools
    for e in examples:
        prompt = e["labels"].count(-100)
        assert p_min <= prompt <= p_max and c_min <= len(e["labels"]) - prompt <= c_max
    assert flops_per_token(trainable=10, frozen=100, layers=0, hidden=0, context=0) == 6 * 10 + 4 * 100
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
