"""Loading a base model and its LoRA adapter for inference (evaluation, serving, the registry's pyfunc).

Kept apart from the trainer so that scoring or serving a specialist never imports TRL or the
training-time attention kernels.
"""

from __future__ import annotations

from factory import mkl

mkl.load_on_amd()  # before transformers imports torch: MKL's fast kernels on AMD CPUs (factory/mkl.py)

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(base_path: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer; a missing pad token falls back to the eos token."""
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_specialist(base_path: str, adapter_dir: str):
    """(model, tokenizer): the base with the adapter applied, in eval mode (`model.disable_adapter()`
    gives the bare base).

    The base is loaded unquantized, also for an adapter trained with qlora: evaluation then scores
    what serving runs (one unquantized base shared by the adapters), at the cost of the small
    difference between the NF4 weights the adapter was trained against and these."""
    from peft import PeftModel

    tokenizer = load_tokenizer(base_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter_dir)
    return model.eval(), tokenizer
