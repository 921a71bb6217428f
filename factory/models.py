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


def load_resident(base_path: str):
    """The base model for a long-lived server, its weights read into process memory.

    transformers maps a safetensors checkpoint's tensors straight from the file when their dtype
    matches, so the weights are page cache the kernel may reclaim while a server idles; the next
    forward pass then reads them back from disk. Measured once on the shared 2-core VM under
    memory load: a 60-token forward 10.2 s after a 20 s pause, against 0.52 s with the weights
    resident (the two were alike on a quiet machine). The cost is reading the file once at load.
    """
    return AutoModelForCausalLM.from_pretrained(base_path, disable_mmap=True)


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
