"""The GPU path's kernel choices, checked on CPU: which attention runs where, what the CUDA paths feed
the model, the Liger flag, the GPU-memory preflight, and `python -m bench.gpu` without CUDA.

The device facts (device type, flash-attn installed, free GPU memory) are passed in; nothing
fakes CUDA globally. What can only run on a GPU (FlashAttention's and Liger's kernels, the
GPU bench's figures) is not claimed here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import SFTTrainer

from factory.models import load_tokenizer
from factory.recipe import load_recipe
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
