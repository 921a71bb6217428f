"""Bench the GPU recipes: `make bench-gpu` (`python -m bench.gpu [--steps N]`) writes bench/results/gpu.json.

Without CUDA it prints that nothing was measured and exits 0. With CUDA, for each case:

* qlora-7b: the `qlora-7b` recipe on Qwen2.5-7B's architecture, one GPU;
* lora-8b: the `lora-8b-zero3` recipe on Llama-3.1-8B's architecture, one GPU (distributed none);
* lora-8b-zero3: the same on two GPUs under DeepSpeed ZeRO-3, when two are visible;

the model is built from its config (`QWEN25_7B`, `LLAMA31_8B`, hard-coded: AutoConfig cannot fetch a hub id
offline) with random bf16 weights and saved to a temporary folder, then trained for `--steps`
steps through the project's own setup (`training_args`, `setup_model`, `setup_trainer`: the
attention path, QLoRA as `factory train` runs them; Liger where liger-kernel is installed, as
`use_liger_kernel` in the result says) on synthetic agent calls shaped like
the sample tasks (`TASK_SHAPES`). Random weights train at the speed real ones do: the same
matmuls, attention and optimizer steps.

Figures per case, measured after the first `WARMUP` steps (compilation, allocation):
tokens/s (every example's tokens), MFU, peak GPU memory (allocated and reserved; next to the
preflight's estimate, `factory.resources.gpu_training_memory`), seconds per 10k examples of the
sample-task mix, and projected GPU-hours for a 10k-example task of each shape (its tokens at
the measured rate, times the recipe's epochs, times the GPUs).

MFU = model FLOPs per second / the GPUs' dense bf16 peak (`PEAK_BF16_TFLOPS`). Model FLOPs per
token (`flops_per_token`): 6 per trainable parameter (forward, gradient of the input, gradient of
the weight), 4 per frozen one (forward and the input's gradient, which the adapters below it need;
no weight gradient), plus attention's 12 x layers x hidden x its mean causal context. Gradient
checkpointing's second forward is not counted (MFU, not hardware FLOPs utilization); QLoRA's
dequantization neither: both are costs the figure then shows as lower utilization.

Each case runs in its own process (`--case`), so peak memory is that case's; the ZeRO-3 case
runs under `accelerate launch` with the recipe's shipped DeepSpeed config, as `factory train`
launches it. One command: about 1-2 minutes a case on an H100 (writing and loading the random
checkpoint included) for the default 12 steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "gpu.json"
NO_CUDA = "bench.gpu: no CUDA GPU visible; nothing measured, bench/results/gpu.json left as it was"
STEPS = 12
WARMUP = 2

# The few config.json numbers of the GPU recipes' base models, from their config.json files on the
# Hugging Face hub (Qwen/Qwen2.5-7B-Instruct, meta-llama/Llama-3.1-8B-Instruct): 7,615,616,512 and
# 8,030,261,248 parameters as transformers builds them (tests/test_gpu_kernels.py checks the counts)
QWEN25_7B = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
             "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
             "tie_word_embeddings": False}
LLAMA31_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
# case -> (recipe, its overrides, model config, GPUs)
CASES = {
    "qlora-7b": ("qlora-7b", [], QWEN25_7B, 1),
    "lora-8b": ("lora-8b-zero3", ["distributed=none"], LLAMA31_8B, 1),
    "lora-8b-zero3": ("lora-8b-zero3", ["num_processes=2"], LLAMA31_8B, 2),
}
# The sample tasks' shapes in tokens (SmolLM2's tokenizer, `setup_data` of datasets/samples through
# `make prepare`): training examples, prompt prefix the whole task shares (system prompt, tools),
# prompt (min, max) and completion (min, max). A 7B tokenizer splits text into about as many tokens.
TASK_SHAPES = {
    "classify-intent": (590, 38, (52, 84), (2, 3)),
    "draft-reply": (344, 27, (56, 89), (11, 40)),
    "order-action": (329, 182, (199, 235), (38, 50)),
    "extract-ticket": (321, 51, (67, 104), (24, 35)),
    "respond": (294, 803, (818, 1153), (13, 59)),
    "call-tool": (246, 65, (128, 463), (31, 62)),
}
# dense bf16 tensor-core peak (no sparsity), TFLOP/s, from the vendors' datasheets; matched in the device name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
                    "L4": 121.0, "RTX 4090": 165.0}


def synthetic_examples(task: str, n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """`n` tokenized examples shaped like the sample task `task` (`TASK_SHAPES`): the task's shared
    prefix, then a prompt rest and a completion of uniform random lengths within the task's range;
    random token ids below 32,000 (inside every vocabulary here); labels -100 on the prompt."""
    rng = random.Random(f"{task}-{seed}")
    _, shared, (p_min, p_max), (c_min, c_max) = TASK_SHAPES[task]
    prefix = [rng.randrange(32000) for _ in range(shared)]
    examples = []
    for _ in range(n):
        prompt = prefix + [rng.randrange(32000) for _ in range(rng.randint(p_min, p_max) - shared)]
        completion = [rng.randrange(32000) for _ in range(rng.randint(c_min, c_max))]
        examples.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return examples


def mix(n: int) -> list[dict[str, list[int]]]:
    """`n` examples of the sample tasks, each task in proportion to its training examples. (The
    trainer shuffles them, so a batch mixes tasks; on CUDA no prefix is shared, so a batch's
    speed depends on its examples' lengths only.)"""
    rng = random.Random(0)
    tasks = rng.choices(list(TASK_SHAPES), weights=[s[0] for s in TASK_SHAPES.values()], k=n)
    return [synthetic_examples(task, 1, seed=i)[0] for i, task in enumerate(tasks)]


def mean_tokens(task: str) -> float:
    """Mean tokens of an example of the sample task `task`."""
    _, _, (p_min, p_max), (c_min, c_max) = TASK_SHAPES[task]
    return (p_min + p_max + c_min + c_max) / 2


def mix_mean_tokens() -> float:
    """Mean tokens of an example of the sample-task mix `mix` draws from (its expectation)."""
    weights = {task: shape[0] for task, shape in TASK_SHAPES.items()}
    return sum(w * mean_tokens(task) for task, w in weights.items()) / sum(weights.values())


def flops_per_token(trainable: int, frozen: int, layers: int, hidden: int, context: float) -> float:
    """Model FLOPs of one trained token: 6 x trainable + 4 x frozen parameters + 12 x layers x
    hidden x the mean causal context (attention's QK^T and AV: 4 x context x hidden forward,
    twice that backward). Why 4 for a frozen weight: its forward (2) and the gradient of its
    input (2), which LoRA's adapters in earlier layers need; its own gradient is never computed."""
    return 6 * trainable + 4 * frozen + 12 * layers * hidden * context


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of the GPU named `name` (torch.cuda.get_device_name), None if unknown."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def random_checkpoint(config: dict, folder: Path) -> None:
    """A checkpoint of the model `config` describes, with random bf16 weights (initialized on the GPU,
    where it takes seconds) and the embedded SmolLM2 tokenizer (only its pad and eos tokens are used)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from factory.base_model import resolve_base
    from factory.models import load_tokenizer

    settings = dict(config)
    built = AutoConfig.for_model(settings.pop("model_type"), **settings)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(built, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    load_tokenizer(resolve_base("embedded:smollm2-135m-instruct")).save_pretrained(folder)


def run_case(case: str, model_dir: Path, steps: int, out_dir: Path) -> dict | None:
    """Train `case` for `steps` steps on `model_dir` through the project's training setup; the
    figures of this process (None on ranks other than 0). Runs on CPU too (tests, tiny model):
    GPU memory and MFU are then None."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from factory.models import load_tokenizer
    from factory.recipe import load_recipe
    from factory.resources import gpu_training_memory
    from factory.train import attention_path, device_facts, setup_model, setup_trainer, training_args

    name, overrides, _, gpus = CASES[case]
    liger = importlib.util.find_spec("liger_kernel") is not None  # measured with it where the gpu extra is installed
    recipe, _ = load_recipe(None, name, [f"base_model={model_dir}", f"max_steps={steps}", "save_steps=1000000",
                                         "eval_steps=null", "gradient_accumulation_steps=1",
                                         f"use_liger_kernel={str(liger).lower()}", *overrides], ROOT / "recipes")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tokenizer = load_tokenizer(str(model_dir))
    args = training_args(recipe, out_dir, evaluate=False)
    args.disable_tqdm = True
    model = setup_model(recipe, str(model_dir))
    examples = mix(recipe.batch_size * gpus * steps)
    trainer = setup_trainer(args, model, tokenizer, Dataset.from_list(examples), None, recipe.shared_prefix)

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    if not trainer.is_world_process_zero():
        return None
    (t0, n0), (t1, n1) = clock.marks[min(WARMUP, len(clock.marks) - 2)], clock.marks[-1]
    tokens_per_s = (n1 - n0) / (t1 - t0)

    config = json.loads((model_dir / "config.json").read_text())
    estimate = gpu_training_memory(config, recipe, gpus)  # its parameter counts are exact (a meta-device build)
    total, trainable = estimate.parameters, estimate.trainable
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    context = sum(n * (n + 1) / 2 for n in (len(e["input_ids"]) for e in examples)) / sum(
        len(e["input_ids"]) for e in examples)
    flops = flops_per_token(trainable, total - trainable, layers, hidden, context)
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_tflops(device_name)
    seconds_10k = 10_000 * mix_mean_tokens() / tokens_per_s
    return {
        "recipe": name, "overrides": overrides, "gpus": gpus, "device": device_name,
        "attention_path": attention_path(recipe, *device_facts()), "use_liger_kernel": bool(args.use_liger_kernel),
        "parameters": total, "trainable_parameters": trainable, "steps_timed": len(clock.marks) - 1 - WARMUP,
        "tokens_per_s": round(tokens_per_s, 1),
        "flops_per_token": flops, "flops_formula": "6*trainable + 4*frozen + 12*layers*hidden*mean_context",
        "mfu": round(tokens_per_s * flops / (peak * 1e12 * gpus), 4) if cuda and peak else None,
        "peak_gpu_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_gpu_memory_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "preflight_estimate_gib": round(estimate.total / 2**30, 2),
        "seconds_per_10k_examples": round(seconds_10k, 1),
        "gpu_hours_10k_examples": {task: round(10_000 * mean_tokens(task) / tokens_per_s * recipe.epochs * gpus / 3600,
                                               3) for task in TASK_SHAPES},
        "epochs": recipe.epochs,
    }


def _launch(case: str, model_dir: Path, steps: int, part: Path) -> None:
    """Run `case` in its own process (two under `accelerate launch` and ZeRO-3 for the two-GPU case)."""
    from factory.recipe import Recipe, accelerate_config

    name, _, _, gpus = CASES[case]
    worker = ["-m", "bench.gpu", "--case", case, "--model-dir", str(model_dir), "--steps", str(steps),
              "--part", str(part)]
    if gpus == 1:
        command = [sys.executable, *worker]
    else:
        recipe = Recipe(base_model=str(model_dir), distributed="deepspeed_zero3")
        command = [str(Path(sys.executable).with_name("accelerate")), "launch",
                   "--config_file", str(accelerate_config(recipe, ROOT / "recipes")), "--num_processes", str(gpus),
                   "--deepspeed_config_file", str(ROOT / "recipes" / "deepspeed" / "zero3.json"), *worker]
    subprocess.run(command, cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--case", choices=list(CASES))
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--part", type=Path)
    options = parser.parse_args(argv)
    import torch

    if options.case:  # one case's worker process
        with tempfile.TemporaryDirectory() as out:
            figures = run_case(options.case, options.model_dir, options.steps, Path(out))
        if figures is not None:
            options.part.write_text(json.dumps(figures))
        return 0
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    if options.steps <= WARMUP + 1:
        parser.error(f"--steps must be more than {WARMUP + 1} (the first {WARMUP} are not timed)")
    results = {}
    for case, (_, _, config, gpus) in CASES.items():
        if gpus > torch.cuda.device_count():
            results[case] = {"skipped": f"needs {gpus} GPUs, {torch.cuda.device_count()} visible"}
            continue
        if gpus > 1 and importlib.util.find_spec("deepspeed") is None:
            results[case] = {"skipped": "needs deepspeed: pip install '.[gpu]'"}
            continue
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, part = Path(tmp) / "model", Path(tmp) / "part.json"
            random_checkpoint(config, model_dir)
            _launch(case, model_dir, options.steps, part)
            results[case] = json.loads(part.read_text())
        print(f"{case}: {json.dumps(results[case])}", flush=True)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
