"""The GPU recipes' code paths run on CPU: QLoRA on bitsandbytes' CPU backend, DDP on gloo processes.

Both train the tiny random model through the real `train()`: nothing of bitsandbytes or
accelerate is mocked. What stays GPU-only, and why, is in `factory.train.check_device`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from factory.io import load_split
from factory.models import load_specialist
from factory.recipe import Recipe, load_recipe
from factory.train import check_device, setup_data, setup_model, train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
TOOLS = [{"type": "function", "function": {"name": "get_order_status", "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string"}}}}}]


def _task(tmp: Path, n: int) -> tuple[Path, dict]:
    """A one-task data folder in the layout `factory mine` writes, and its catalog entry."""
    rows = [{"messages": [{"role": "system", "content": "Answer with the tool to call."},
                          {"role": "user", "content": f"Where is my order A{10000 + i * 7}?"}],
             "tools": TOOLS,
             "output": {"content": None, "tool_calls": [{"name": "get_order_status",
                                                         "arguments": {"order_id": f"A{10000 + i * 7}"}}]}}
            for i in range(n)]
    folder = tmp / "data" / "order-status" / "v1"
    folder.mkdir(parents=True)
    for split, part in (("train", rows), ("validation", rows[:4])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return tmp / "data", {"status": "ready", "dataset_version": "v1", "kind": "tool_call"}


def _recipe(tiny_model_dir: Path, *overrides: str) -> tuple[Recipe, dict]:
    return load_recipe(None, "cpu-lora", [f"base_model={tiny_model_dir}", "learning_rate=0.01", "batch_size=4",
                                          "max_train_samples=null", "warmup_ratio=0", "min_train_steps=0",
                                          "lr_scheduler=constant", "save_steps=1000", *overrides], RECIPES)


def _losses(run_id: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, "loss"), key=lambda m: m.step)]


def test_qlora_trains_on_4bit_layers_on_cpu_and_its_adapter_loads_back_and_generates(tmp_path, tiny_model_dir,
                                                                                     tracking):
    bnb = pytest.importorskip("bitsandbytes", reason="the `dev` and `gpu` extras install it")
    recipe, raw = _recipe(tiny_model_dir, "method=qlora", "max_steps=16", "logging_steps=4")
    model = setup_model(recipe, str(tiny_model_dir))
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 14 and all(m.weight.quant_type == "nf4" for m in four_bit)  # 7 linear layers x 2
    adapted = [m.base_layer for m in model.modules() if hasattr(m, "lora_A")]
    assert len(adapted) == len(four_bit) and all(isinstance(m, bnb.nn.Linear4bit) for m in adapted)

    data_dir, entry = _task(tmp_path, 48)
    result = train("order-status", entry, recipe, raw, data_dir, tmp_path / "registry")
    losses = _losses(result.run_id)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses

    specialist, tokenizer = load_specialist(str(tiny_model_dir), result.adapter_dir)
    example = setup_data(load_split(data_dir, "order-status", "v1", "validation"), tokenizer, recipe)[0][0]
    batch = {k: torch.tensor([v]) for k, v in example.items()}  # input_ids, labels (-100 on the prompt)
    prompt = torch.tensor([example["input_ids"][:example["labels"].count(-100)]])
    with torch.no_grad():
        tuned = specialist(**batch).loss
        with specialist.disable_adapter():
            bare = specialist(**batch).loss
        generated = specialist.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    # trained against NF4 weights, applied to the unquantized base as evaluation and serving load it
    assert tuned < bare - 0.3, (tuned, bare)
    assert generated.shape[1] > prompt.shape[1]


def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir,
                                                                                 tracking, monkeypatch):
    """Two gloo processes of batch 4 against one process of batch 4 accumulating 2 micro-batches.

    The distributed sampler gives rank r the micro-batches r, r+2, ... of the seeded order, the
    ones the single process accumulates at the same step; the loss is normalized by the tokens
    of the global batch on both paths. Measured: the curves are equal to the last bit (a
    2-rank all-reduce is one fp32 addition, as accumulation is, and the x2 / 2 scalings are
    exact). The tolerance, 1e-4, leaves room for another reduction order (more ranks, other
    DDP buckets) and is far below the gap to one process without accumulation (half the
    global batch; checked, so a launch that ran only one process fails).
    """
    monkeypatch.chdir(ROOT)  # the recipe's accelerate config is found under recipes/
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # else accelerate gives each process half the cores
    data_dir, entry = _task(tmp_path, 64)
    steps = ["max_steps=8", "logging_steps=1"]
    runs = {name: _recipe(tiny_model_dir, *steps, *overrides) for name, overrides in
            {"ddp": ["distributed=ddp", "num_processes=2"], "accumulated": ["gradient_accumulation_steps=2"],
             "half batch": []}.items()}
    curves = {name: _losses(train("order-status", entry, recipe, raw, data_dir, tmp_path / name).run_id)
              for name, (recipe, raw) in runs.items()}
    assert len(curves["ddp"]) == 8
    assert curves["ddp"] == pytest.approx(curves["accumulated"], abs=1e-4, rel=0)
    assert max(abs(a - b) for a, b in zip(curves["ddp"], curves["half batch"])) > 1e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="what stays GPU-only is refused only without CUDA")
def test_without_cuda_only_deepspeed_and_paged_optimizers_are_refused():
    for name, needs in (("lora-8b-zero3", "distributed 'deepspeed_zero3'"), ("qlora-7b", "'paged_adamw_8bit'")):
        with pytest.raises(ValueError, match=f"{needs}.* needs CUDA GPUs"):
            check_device(load_recipe(None, name, [], RECIPES)[0])
    check_device(load_recipe(None, "qlora-7b", ["optimizer=adamw_torch"], RECIPES)[0])
    check_device(load_recipe(None, "cpu-lora", ["distributed=ddp", "num_processes=2"], RECIPES)[0])
