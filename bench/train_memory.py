"""Training memory against its estimate: the peak of one CPU step, measured, over `resources.cpu_step_bytes`.

`train.memory_plan` splits a batch (or recomputes activations) from that estimate; its factors were
fitted here. Each point runs in a fresh process (peak RSS is per process): the embedded base with
LoRA r16, one padding-free row of N random tokens, the LM head on its last 50 positions (as the
completion-only loss), forward and backward; the weights' own memory (measured before the step)
is left out, as the estimate leaves it out.

Keys: `train_memory_estimate_ratio` (the worst measured / estimated over the points: <= 1 means the
plan never underestimates) and `train_memory_mb_per_token` / `_checkpointed` (the slope between
the two lengths).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

POINTS = [(1024, False), (4096, False), (1024, True), (4096, True)]
STEP = """
import resource, sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from factory.base_model import resolve_base
n, checkpointing = int(sys.argv[1]), sys.argv[2] == "1"
model = AutoModelForCausalLM.from_pretrained(resolve_base("embedded:smollm2-135m-instruct"), dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
if checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
model.train()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model(input_ids=torch.randint(0, 49000, (1, n)), logits_to_keep=50).logits.float().mean().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def run() -> dict[str, float]:
    from transformers import AutoConfig

    from factory.base_model import resolve_base
    from factory.recipe import load_recipe
    from factory.resources import cpu_step_bytes

    recipe, _ = load_recipe(None, "cpu-lora", [], Path(__file__).resolve().parents[1] / "recipes")
    config = AutoConfig.from_pretrained(resolve_base(recipe.base_model))
    measured = {}
    for n, checkpointing in POINTS:
        out = subprocess.run([sys.executable, "-c", STEP, str(n), "1" if checkpointing else "0"],
                             check=True, capture_output=True, text=True).stdout
        measured[n, checkpointing] = int(out.split()[-1])
        estimate = cpu_step_bytes(config, recipe, n, checkpointing)
        print(f"{n} tokens{' checkpointed' if checkpointing else ''}: {measured[n, checkpointing] / 2**20:,.0f} MiB "
              f"measured, {estimate / 2**20:,.0f} MiB estimated")
    ratio = max(measured[n, ck] / cpu_step_bytes(config, recipe, n, ck) for n, ck in POINTS)
    slope = {ck: (measured[4096, ck] - measured[1024, ck]) / 3072 / 2**20 for ck in (False, True)}
    return {"train_memory_estimate_ratio": ratio, "train_memory_mb_per_token": slope[False],
            "train_memory_mb_per_token_checkpointed": slope[True]}
