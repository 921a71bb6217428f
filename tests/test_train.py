"""Training on the tiny random model: rendering, the padding-free loss, learning, MLflow, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from factory import chat
from factory.recipe import Recipe, load_recipe
from factory.models import load_tokenizer
from factory.train import (STEP_MEMORY_SHARE, DataError, SharedPrefixCollator, choose_policy,
                           memory_plan, completion_loss, fixed_prefix, launch_command, setup_data,
                           setup_model, train, train_steps)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SYSTEM = "Route the customer's request: answer with the tool to call."
TOOLS = [{"type": "function", "function": {"name": "get_order_status", "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string"}}}}}]
def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        order = f"A{10000 + i * 7}"
        rows.append({"messages": [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": f"Where is my order {order}? Thanks."}],
                     "tools": TOOLS,
                     "output": {"content": None, "tool_calls": [{"name": "get_order_status",
                                                                 "arguments": {"order_id": order}}]}})
    return rows


def _task(tmp: Path, n: int = 48) -> tuple[Path, dict]:
    """A one-task data folder in the layout `factory mine` writes, and its catalog entry."""
    folder = tmp / "data" / "order-status" / "v1"
    folder.mkdir(parents=True)
    rows = _rows(n)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return tmp / "data", {"status": "ready", "dataset_version": "v1", "kind": "tool_call"}


def _recipe(tiny_model_dir: Path, *overrides: str) -> tuple[Recipe, dict]:
    return load_recipe(None, "cpu-lora", [f"base_model={tiny_model_dir}", "learning_rate=0.01", "batch_size=4",
                                          "max_train_samples=null", "warmup_ratio=0", *overrides], RECIPES)


# --- data ----------------------------------------------------------------------------------------


def test_setup_data_masks_prompts_and_skips_examples_that_cannot_fit(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    recipe, _ = _recipe(tiny_model_dir)
    data, report = setup_data(_rows(3), tokenizer, recipe)
    example = data[0]
    completion = [t for t in example["labels"] if t != -100]
    assert tokenizer.decode(completion).startswith("<tool_call>")
    assert example["input_ids"][-len(completion):] == completion
    assert report.examples == 3 and report.seq_budget == max(len(e["input_ids"]) for e in data)
    budget, _ = _recipe(tiny_model_dir, f"max_train_tokens={len(example['input_ids']) * 5 // 2}", "shared_prefix=false")
    assert len(setup_data(_rows(3), tokenizer, budget)[0]) == 2
    short, _ = _recipe(tiny_model_dir, f"max_seq_length={len(example['input_ids']) - 1}")
    with pytest.raises(DataError, match="1 too long"):  # one turn: nothing to drop, the answer is never cut
        setup_data(_rows(1), tokenizer, short)


def test_the_token_budget_counts_a_prefix_shared_by_the_task_once_per_batch(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    plain, _ = _recipe(tiny_model_dir, "shared_prefix=false")
    shared, _ = _recipe(tiny_model_dir)
    full, plain_report = setup_data(_rows(16), tokenizer, plain)
    _, report = setup_data(_rows(16), tokenizer, shared)
    prefix = len(tokenizer(SYSTEM, add_special_tokens=False)["input_ids"])  # shared by every example, at least
    assert plain_report.computed_tokens == plain_report.tokens == sum(len(e["input_ids"]) for e in full)
    assert report.tokens == plain_report.tokens
    assert report.computed_tokens <= report.tokens - 16 * prefix * 7 // 8


def test_long_dialogues_lose_earlier_turns_and_are_counted(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = []
    for i in range(4):
        history = [{"role": "system", "content": SYSTEM}]
        for turn in range(i * 4):
            history += [{"role": "user", "content": f"turn {turn}: " + "where is it " * 10},
                        {"role": "assistant", "content": "on its way " * 10}]
        rows.append({**_rows(1)[0], "messages": [*history, {"role": "user", "content": "Where is A10000?"}]})
    capped, _ = _recipe(tiny_model_dir, "max_seq_length=300")
    data, report = setup_data(rows, tokenizer, capped)
    assert report.seq_budget == 300 and report.examples == 4 and report.shortened >= 2
    assert report.messages_dropped >= 2 * report.shortened
    assert max(len(e["input_ids"]) for e in data) <= report.seq_budget


def test_a_policy_longer_than_the_budget_is_refused_before_training_naming_its_size(tiny_model_dir):
    """A task whose system prompt alone outgrows max_seq_length is refused before any training, with the
    prefix's size and the budget that would hold it; with that budget it trains, earlier turns dropped."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = SYSTEM + " " + " ".join(f"Rule {i}: never promise a refund before the order is found." for i in range(40))
    rows = []
    for i in range(6):
        history = [{"role": "system", "content": policy}]
        for turn in range(i * 3):
            history += [{"role": "user", "content": f"turn {turn}: where is it"}, {"role": "assistant", "content": "soon"}]
        rows.append({**_rows(1)[0], "messages": [*history, {"role": "user", "content": "Where is A10000?"}]})
    prompts = [tokenizer(chat.render_prompt(tokenizer, r["messages"], r["tools"]), add_special_tokens=False)["input_ids"]
               for r in rows]
    fixed = fixed_prefix(prompts)
    assert fixed > 400
    recipe, _ = _recipe(tiny_model_dir, "max_seq_length=64")
    with pytest.raises(DataError, match=f"fixed prompt prefix .* is {fixed} tokens .* raise it above"):
        setup_data(rows, tokenizer, recipe, context=2048)
    roomy, _ = _recipe(tiny_model_dir, f"max_seq_length={fixed + 64}")
    data, report = setup_data(rows, tokenizer, roomy, context=2048)
    assert report.examples == 6 and report.seq_budget == fixed + 64 and report.shortened >= 1
    assert all(tokenizer.decode(e["input_ids"]).count("Where is A10000?") == 1 for e in data)


def test_a_long_policy_is_learned_into_the_weights_and_rows_of_another_policy_are_skipped(tiny_model_dir):
    """`learn_policy: auto` leaves a short system prompt in the prompts and learns a long one: its
    examples are rendered without the policy (and tools), so they fit where they did not."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = SYSTEM + " " + " ".join(f"Rule {i}: never promise a refund before the order is found." for i in range(40))
    rows = [{**r, "messages": [{"role": "system", "content": policy}, *r["messages"][1:]]} for r in _rows(12)]
    rows[0] = {**rows[0], "messages": [{"role": "system", "content": "Another agent."}, *rows[0]["messages"][1:]]}
    short, _ = _recipe(tiny_model_dir, "max_seq_length=1024")
    assert choose_policy(_rows(12), tokenizer, short)[0] is None  # ~100 tokens of 1024: read, not learned
    fingerprint, tokens = choose_policy(rows, tokenizer, short)  # 11 of 12 share it: over 90%
    assert tokens > 400 and fingerprint == chat.policy_fingerprint(rows[1]["messages"], TOOLS)
    never, _ = _recipe(tiny_model_dir, "learn_policy=never")
    assert choose_policy(rows, tokenizer, never) == (None, 0)
    always, _ = _recipe(tiny_model_dir, "learn_policy=always")
    assert choose_policy(_rows(12), tokenizer, always)[0] is not None
    assert choose_policy([*_rows(6), *rows[1:7]], tokenizer, always)[0] is None  # two policies: none is fixed

    data, report = setup_data(rows, tokenizer, _recipe(tiny_model_dir, "max_seq_length=200")[0], context=2048,
                              policy=fingerprint)
    assert report.examples == 11 and report.skipped == {"policy_changed": 1} and report.policy == fingerprint
    text = tokenizer.decode(data[0]["input_ids"])
    assert "Rule 3" not in text and "get_order_status(" not in text and "Where is my order" in text
    assert report.longest == sorted((len(e["input_ids"]) for e in data), reverse=True)[:4]


def test_the_memory_plan_splits_the_batch_before_it_recomputes_activations(tiny_model_dir):
    """A batch that does not fit runs in the largest micro-batch that does, accumulated to the same batch;
    one example that does not fit alone gets gradient checkpointing; one that never fits is refused."""
    from transformers import LlamaConfig

    from factory.resources import ResourceError, cpu_step_bytes

    recipe, _ = _recipe(tiny_model_dir, "batch_size=8", "gradient_accumulation_steps=2")
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3)  # SmolLM2-135M's shape: nothing is built
    longest = [4000] * 8
    step = {(n, ck): cpu_step_bytes(config, recipe, n * 4000, ck) for n in (1, 2, 4, 8) for ck in (False, True)}
    assert step[(1, True)] < step[(1, False)] < step[(2, False)] < step[(8, False)]
    def plan(free: int) -> tuple[int, int, bool]:
        made = memory_plan(recipe, config, longest, available=int(free / STEP_MEMORY_SHARE) + 2)
        assert made.need <= made.budget
        return made.micro_batch, made.accumulation, made.checkpointing

    assert plan(step[(8, False)]) == (8, 2, False)
    assert plan(step[(4, False)]) == (4, 4, False)
    assert plan(step[(2, False)] - 8) == (1, 16, False)
    assert plan(step[(1, False)] - 8) == (2, 8, True)  # checkpointing holds less than half per token
    assert plan(step[(2, True)] - 8) == (1, 16, True)
    with pytest.raises(ResourceError, match="longest training example \\(4000 tokens\\)"):
        plan(step[(1, True)] - 8)
    assert memory_plan(recipe, config, longest, available=1, device="cuda").micro_batch == 8  # CUDA: own preflight


# --- the loss on padding-free batches ----------------------------------------------------------------


def test_padding_free_completion_loss_equals_the_padded_model_loss(tiny_model_dir):
    """Per-example attention on one concatenated row gives the loss of ordinary padded batches."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    recipe, _ = _recipe(tiny_model_dir)
    rows = _rows(4)
    rows[1]["messages"][1]["content"] += " It has been a very long week of waiting, please help me."
    examples = [dict(e) for e in setup_data(rows, tokenizer, recipe)[0]]
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    varlen = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa_varlen")
    with torch.no_grad():
        reference = plain(**padded).loss
        loss, _ = completion_loss(varlen, packed)
        padded_loss, _ = completion_loss(plain, padded)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    assert padded_loss.item() == pytest.approx(reference.item(), abs=1e-5)


def test_a_shared_prompt_prefix_runs_once_with_the_loss_and_gradients_of_the_unshared_batch(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    recipe, _ = _recipe(tiny_model_dir)
    rows = _rows(3)
    rows[2]["messages"][1]["content"] = "My parcel never came, order A99999. Please check it."
    examples = [dict(e) for e in setup_data(rows, tokenizer, recipe)[0]]
    unshared = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    shared = SharedPrefixCollator(unshared)(examples)
    prefix = shared["shared_prefix_len"]
    first_label = examples[0]["labels"].index(next(t for t in examples[0]["labels"] if t != -100))
    assert 20 < prefix < first_label  # the system prompt and tools, not the user's words
    assert shared["input_ids"].shape[1] == sum(len(e["input_ids"]) for e in examples) - 2 * prefix
    results = []
    for batch in (unshared(examples), shared):
        model = setup_model(recipe, str(tiny_model_dir))
        for name, weight in model.named_parameters():  # LoRA B starts at zero: give every adapter a gradient path
            if "lora_B" in name:
                torch.nn.init.normal_(weight, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        loss, _ = completion_loss(model, batch)
        loss.backward()
        results.append((loss.item(), {n: w.grad.clone() for n, w in model.named_parameters() if w.requires_grad}))
    (loss, grads), (shared_loss, shared_grads) = results
    assert shared_loss == pytest.approx(loss, abs=1e-5)
    assert grads.keys() == shared_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    with_all_labels = [{**e, "labels": e["input_ids"]} for e in examples]  # loss on the prompt: nothing is shared
    assert "shared_prefix_len" not in SharedPrefixCollator(unshared)(with_all_labels)


# --- training -----------------------------------------------------------------------------------------


def test_a_few_steps_lower_the_loss_and_log_the_run_to_mlflow(tmp_path, tiny_model_dir, tracking):
    data_dir, entry = _task(tmp_path)
    recipe, raw = _recipe(tiny_model_dir, "max_steps=16", "logging_steps=4", "save_steps=1000",
                          "lr_scheduler=constant")
    result = train("order-status", entry, recipe, raw, data_dir, tmp_path / "registry")
    losses = [m.value for m in sorted(MlflowClient().get_metric_history(result.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses
    run = MlflowClient().get_run(result.run_id)
    assert run.data.params["recipe.lora.r"] == str(recipe.lora.r)
    assert run.data.params["dataset_version"] == "v1" and run.data.tags["dataset_version"] == "v1"
    assert run.inputs.dataset_inputs[0].dataset.name == "order-status@v1"
    artifacts = {a.path for a in MlflowClient().list_artifacts(result.run_id)}
    assert {"recipe.yaml", "adapter"} <= artifacts
    assert "adapter/adapter_config.json" in {a.path for a in MlflowClient().list_artifacts(result.run_id, "adapter")}
    assert result.tokens_per_s > 0 and result.train_tokens > 0
    again = train("order-status", entry, recipe, raw, data_dir, tmp_path / "registry")
    assert again == result  # the finished run is reused, not retrained


def test_a_small_task_repeats_its_examples_up_to_min_train_steps(tmp_path, tiny_model_dir, tracking):
    data_dir, entry = _task(tmp_path, n=8)  # 2 steps an epoch at batch 4
    recipe, raw = _recipe(tiny_model_dir, "min_train_steps=6", "logging_steps=1", "save_steps=1000")
    result = train("order-status", entry, recipe, raw, data_dir, tmp_path / "registry")
    steps = sorted(m.step for m in MlflowClient().get_metric_history(result.run_id, "loss"))
    assert steps == [1, 2, 3, 4, 5, 6]
    assert result.train_examples == 8


def test_min_train_steps_leaves_large_tasks_and_explicit_max_steps_alone(tiny_model_dir):
    recipe, _ = _recipe(tiny_model_dir, "min_train_steps=64", "batch_size=8")
    assert train_steps(recipe, 100) == 64  # 13 steps an epoch
    assert train_steps(recipe, 512) == -1  # 64 steps: the epochs decide
    assert train_steps(recipe, 100, processes=8) == 64
    assert train_steps(recipe.model_copy(update={"epochs": 5.0}), 100) == -1  # 65 steps
    assert train_steps(recipe.model_copy(update={"max_steps": 10}), 100) == 10
    assert train_steps(recipe.model_copy(update={"min_train_steps": 0}), 100) == -1


def test_min_train_steps_repeats_long_examples_only_within_twice_the_token_budget(tiny_model_dir):
    """70 examples of ~2.3k computed tokens (a long-policy task) fill max_train_tokens in 9 steps: 64 steps
    would take ~7x the budget's time, so they get the steps twice the budget buys; short examples still 64."""
    recipe, _ = _recipe(tiny_model_dir, "min_train_steps=64", "batch_size=8", "max_train_tokens=160000")
    assert train_steps(recipe, 70, computed_tokens=160_000) == 18  # two epochs of 9 steps: 2 x 160k
    assert train_steps(recipe, 100, computed_tokens=25_000) == 64  # 13 steps of ~250-token examples
    assert train_steps(recipe, 70, computed_tokens=320_000) == -1  # one epoch already costs twice the budget


_WORKER = """
import json, sys
from pathlib import Path
from factory.recipe import Recipe
from factory.train import train
spec = json.loads(sys.argv[1])
train("order-status", spec["entry"], Recipe.model_validate(spec["raw"]), spec["raw"], Path(spec["data"]),
      Path(spec["registry"]))
"""


def test_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path, tiny_model_dir,
                                                                                    tracking):
    data_dir, entry = _task(tmp_path, n=64)
    recipe, raw = _recipe(tiny_model_dir, "max_steps=16", "save_steps=4", "logging_steps=4", "batch_size=2")
    reference = train("order-status", entry, recipe, raw, data_dir, tmp_path / "uninterrupted")

    registry = tmp_path / "killed"
    spec = json.dumps({"entry": entry, "raw": raw, "data": str(data_dir), "registry": str(registry)})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", _WORKER, spec], env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out_dir = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        states = list(registry.glob("training/*/*/checkpoint-*/trainer_state.json"))
        if states:
            out_dir = states[0].parents[1]
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert out_dir is not None, "no checkpoint appeared before the worker ended"
    assert not (out_dir / "train.json").exists(), "the worker finished before it could be killed"
    killed_run = json.loads((out_dir / "mlflow_run.json").read_text())["run_id"]

    resumed = train("order-status", entry, recipe, raw, data_dir, registry)
    assert resumed.run_id == killed_run  # the same MLflow run goes on
    assert 0 < resumed.train_tokens < reference.train_tokens  # this session trained only what was left
    ours = load_file(Path(resumed.adapter_dir) / "adapter_model.safetensors")
    theirs = load_file(Path(reference.adapter_dir) / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-5), name


def test_distributed_recipes_launch_through_accelerate(tmp_path, tiny_model_dir):
    recipe, raw = load_recipe(None, "lora-8b-zero3", ["num_processes=2"], RECIPES)
    entry = {"status": "ready", "dataset_version": "v1", "kind": "tool_call"}
    command = launch_command("order-status", entry, raw, recipe, tmp_path / "data", tmp_path / "registry", RECIPES)
    assert Path(command[0]).name == "accelerate" and command[1] == "launch"
    assert command[command.index("--config_file") + 1] == str(RECIPES / "accelerate" / "deepspeed_zero3.yaml")
    assert command[command.index("--num_processes") + 1] == "2"
    ds_config = Path(command[command.index("--deepspeed_config_file") + 1])
    assert ds_config.is_absolute() and json.loads(ds_config.read_text())["zero_optimization"]["stage"] == 3
    assert command[-3:-1] == ["-m", "factory.train"]
    spec = json.loads(Path(command[-1]).read_text())
    assert Recipe.model_validate(spec["raw_recipe"]) == recipe and spec["entry"] == entry


_REFUSE = """
import sys
from pathlib import Path
from factory.recipe import load_recipe
from factory.train import train
name, tmp = sys.argv[1], Path(sys.argv[2])
recipe, raw = load_recipe(None, name, [], Path("recipes"))
try:
    train("order-status", {"status": "ready", "dataset_version": "v1", "kind": "tool_call"}, recipe, raw,
          tmp / "data", tmp / "registry")
except ValueError as err:
    print(err)
"""


@pytest.mark.parametrize("name", ["qlora-7b", "lora-8b-zero3"])
def test_gpu_recipes_are_refused_without_cuda_before_anything_loads(tmp_path, name):
    done = subprocess.run([sys.executable, "-c", _REFUSE, name, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "needs CUDA GPUs" in done.stdout, done.stdout + done.stderr
    assert not (tmp_path / "registry").exists()
