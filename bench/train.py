"""Bench training speed: the factory's default recipe against naive TRL, same data, same run.

Data: `EXAMPLES` calls of one subtask of the sample agent (`STEP`, a seeded sample), read
by `factory.ingest`, in the same order for every side: the factory trains one specialist
per subtask, so a batch holds calls of one subtask, as here. `STEP` is the tool-call
subtask, the mission's main kind and the one of the four sample tasks whose batches
share the least prompt prefix (23% of the tokens), so the figure is the conservative
one. All sides use the same base model, LoRA (rank, alpha, targets) and batch size:

* baseline (`train_baseline_tokens_per_s`): TRL as its quick start has it: a default
  `SFTConfig` (gradient checkpointing, bf16 autocast, padded batches, TRL's
  full-vocabulary head with its entropy and accuracy metrics), `use_cpu=True` (which
  bf16 needs without a GPU) and the LoRA as `peft_config`, on the conversations in
  TRL's prompt/completion form: the chat template renders them, with its default system
  prompt where a record has none.
* TRL in fp32 (`train_trl_fp32_tokens_per_s`): the same with `bf16=False` and no
  gradient checkpointing, to separate what the precision costs from what the factory's
  own batching and loss gain.
* factory (`train_tokens_per_s`): the default recipe through `factory.train`'s setup
  (padding-free batches with per-example attention, the batch's shared prompt prefix run
  once, LM head on completion positions, fp32, no injected system prompt). Its rate
  counts every example's tokens, as the other sides do; `train_computed_tokens_per_s`
  counts the tokens the model actually ran (the shared prefix once per batch).

Every side runs as `python -m bench.train`, whose package (bench/__init__.py) loads MKL's
own fast kernels before torch where `factory.mkl` applies (AMD CPUs; `train_mkl_on_amd` says
whether it did), so the ratios compare training setups on the same matmul library.

Each side runs in its own process (so `*_peak_rss_mb` is that side's peak RSS), in the
order factory, baseline, TRL fp32, factory; the factory figure is the mean of its two
runs. A rate is the non-padding tokens the trainer counted after its first step divided
by the time after it (the first step pays one-off allocation). The baseline runs 2 steps
only (it is ~50x slower: a full pass would take a quarter of an hour); the others one
epoch (TRL fp32: 3 steps). `train_speedup` = factory / baseline tokens/s.
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import MKL_ON_AMD

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "datasets" / "samples" / "logs"
EXAMPLES = 48
STEP = "order_action"
STEPS = {"factory": -1, "baseline": 2, "trl_fp32": 3}


def _rows(tmp: Path, n: int) -> list[dict]:
    from factory import ingest

    ingest.ingest([LOGS], tmp / "raw", tmp / "quarantine")
    records = sorted((r for r in ingest.read_records(tmp / "raw") if r.outcome == "ok" and r.step == STEP),
                     key=lambda r: r.id)
    random.Random(0).shuffle(records)
    return [{"messages": r.messages, "tools": r.tools, "output": r.output} for r in records[:n]]


def _clock(trainer):
    """A callback that measures tokens (the examples' and those run) and seconds after the first optimizer step."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            computed = getattr(trainer, "computed_tokens", state.num_input_tokens_seen)
            now = (time.perf_counter(), state.num_input_tokens_seen, computed)
            if state.global_step == 1:
                self.first = now
            self.last = now

    return Clock()


def _trainer(side: str, rows: list[dict], base: str | None, out: Path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from factory.base_model import resolve_base
    from factory.recipe import load_recipe
    from factory.chat import render_output
    from factory.models import load_tokenizer
    from factory.train import setup_data, setup_model, setup_trainer, training_args

    recipe, _ = load_recipe(None, None, [f"base_model={base}"] if base else [], ROOT / "recipes")
    path = resolve_base(recipe.base_model)
    if side == "factory":
        recipe = recipe.model_copy(update={"max_train_samples": None, "max_train_tokens": None, "epochs": 1.0})
        tokenizer = load_tokenizer(path)
        args = training_args(recipe, out, evaluate=False)
        args.save_strategy, args.disable_tqdm = "no", True
        return setup_trainer(args, setup_model(recipe, path), tokenizer, setup_data(rows, tokenizer, recipe)[0], None,
                             recipe.shared_prefix)
    data = Dataset.from_list([{"prompt": r["messages"],
                               "completion": [{"role": "assistant", "content": render_output(r["output"])}]}
                              for r in rows])
    fp32 = {"bf16": False, "gradient_checkpointing": False} if side == "trl_fp32" else {}
    config = SFTConfig(output_dir=str(out), use_cpu=True, num_train_epochs=1, max_steps=STEPS[side],
                       per_device_train_batch_size=recipe.batch_size, report_to="none", save_strategy="no",
                       disable_tqdm=True, include_num_input_tokens_seen="non_padding", **fp32)
    lora = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                      target_modules=recipe.lora.target_modules, task_type="CAUSAL_LM")
    return SFTTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=config, train_dataset=data,
                      processing_class=AutoTokenizer.from_pretrained(path), peft_config=lora)


def _side(side: str, rows_path: Path, base: str | None) -> dict[str, float]:
    """Run one side in a fresh process; returns its tokens, seconds and peak RSS."""
    command = [sys.executable, "-m", "bench.train", side, str(rows_path), *([base] if base else [])]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench side {side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rate(figures: dict[str, float]) -> float:
    return figures["tokens"] / figures["seconds"]


def run(examples: int = EXAMPLES, base: str | None = None) -> dict[str, float]:
    """Figures for bench/results/latest.json; `base` overrides the recipe's base model (tests)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.json"
        rows_path.write_text(json.dumps(_rows(Path(tmp), examples)))
        first = _side("factory", rows_path, base)
        baseline = _side("baseline", rows_path, base)
        trl_fp32 = _side("trl_fp32", rows_path, base)
        second = _side("factory", rows_path, base)
    factory_rate = (_rate(first) + _rate(second)) / 2
    computed_rate = (first["computed_tokens"] + second["computed_tokens"]) / (first["seconds"] + second["seconds"])
    return {
        "train_tokens_per_s": round(factory_rate, 1),
        "train_computed_tokens_per_s": round(computed_rate, 1),
        "train_baseline_tokens_per_s": round(_rate(baseline), 1),
        "train_speedup": round(factory_rate / _rate(baseline), 2),
        "train_trl_fp32_tokens_per_s": round(_rate(trl_fp32), 1),
        "train_speedup_vs_trl_fp32": round(factory_rate / _rate(trl_fp32), 2),
        "train_peak_rss_mb": round(max(first["peak_rss_mb"], second["peak_rss_mb"]), 1),
        "train_baseline_peak_rss_mb": round(baseline["peak_rss_mb"], 1),
        "train_trl_fp32_peak_rss_mb": round(trl_fp32["peak_rss_mb"], 1),
        "train_bench_examples": float(examples),
        "train_mkl_on_amd": float(MKL_ON_AMD),
    }


def _main(argv: list[str]) -> None:
    if not argv:
        print(json.dumps(run(), indent=2))
        return
    side, rows_path, base = argv[0], Path(argv[1]), (argv[2] if len(argv) > 2 else None)
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer(side, json.loads(rows_path.read_text()), base, Path(out))
        clock = _clock(trainer)
        trainer.add_callback(clock)
        trainer.train()
    if clock.last[0] == clock.first[0]:
        raise SystemExit(f"bench side {side}: too few examples for two optimizer steps")
    (t0, tokens0, computed0), (t1, tokens1, computed1) = clock.first, clock.last
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens": tokens1 - tokens0, "computed_tokens": computed1 - computed0, "seconds": t1 - t0,
                      "peak_rss_mb": peak}))


if __name__ == "__main__":
    _main(sys.argv[1:])
