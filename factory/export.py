"""Taking a registered specialist out of the factory: a merged checkpoint, GGUF files, an Ollama folder.

Formats (`FORMATS`), one writer each, all written with the Python packages already installed
(peft, safetensors, the `gguf` package's GGUFWriter): nothing is downloaded or shelled out to.

- merged        `merge`: the adapter merged into the base (peft `merge_and_unload`), a plain
                float32 safetensors checkpoint with the tokenizer and chat template; loads in
                transformers (or vLLM, TGI) without PEFT. Costs a full copy of the base per task.
- gguf          `write_gguf`: the merged model as one GGUF per quantization (`MODEL_QUANTS`) for
                llama.cpp, Ollama, LM Studio. f32, f16, q8_0 and q4_0: the gguf package quantizes
                only the legacy block types (Q4_0/1, Q5_0/1, Q8_0); its K-quants (q4_k_m) dequantize
                only, so q4_0 is the 4-bit type offered (with q8_0 embeddings, as llama.cpp's mix keeps
                the embeddings above 4 bits).
- gguf-adapter  `write_gguf_adapter`: the LoRA alone as a llama.cpp LoRA GGUF, as llama.cpp's
                convert_lora_to_gguf.py writes it (general.type "adapter", adapter.type "lora",
                adapter.lora.alpha, `<tensor>.weight.lora_a` / `.lora_b`); a few MB per task on one
                shared base GGUF (`llama-server --lora-scaled`), at the cost of the adapter's
                matmuls at every token.
- ollama        `write_ollama`: a GGUF and a Modelfile (FROM, the ChatML chat template as a Go
                template, stop tokens, temperature 0) for `ollama create`.

Supported bases: llama-architecture checkpoints (`ARCHITECTURES`: Llama, SmolLM2, Qwen2) with a
byte-level BPE tokenizer whose llama.cpp pre-tokenizer is known (`_pre_tokenizer`); anything else
is refused with an `ExportError` naming what is missing.

Fidelity (`export`): every export is loaded back and answers (greedily, the evaluation's token
budget) up to `n_prompts` of the task's test prompts, rendered as evaluation renders them; the
share of answers identical to the PyTorch specialist's (base + adapter) is its agreement, and its
answers are scored by the task's kind against the logged (teacher) outputs. GGUF files are loaded
with transformers' GGUF loader, which dequantizes: the quantization error is measured, llama.cpp's
own kernels (which also quantize activations for q8_0/q4_0 dot products) are not. The adapter GGUF
is read back with the gguf reader and applied to the PyTorch base as llama.cpp applies it
(W + alpha/rank * B @ A, q/k rows un-permuted). Below `MIN_AGREEMENT` (0.95 for merged, f32, f16,
q8_0; q4_0 is measured but not gated unless asked) the export is recorded as failed.

Each export is logged to the version's MLflow run (`registry.record_export`): its files under
`exports/<format>[.<quant>]/` with their sha256, and a version tag `export.<format>[.<quant>]`
holding the record (status, files, sha256, agreement, task score).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from factory.errors import FactoryError

FORMATS = ("merged", "gguf", "gguf-adapter", "ollama")
MODEL_QUANTS = ("f32", "f16", "q8_0", "q4_0")
ADAPTER_QUANTS = ("f32", "f16")
DEFAULT_QUANTS = {"merged": (), "gguf": ("f16", "q8_0"), "gguf-adapter": ("f32",), "ollama": ("q8_0",)}
MIN_AGREEMENT = {"merged": 0.95, "f32": 0.95, "f16": 0.95, "q8_0": 0.95}
DEFAULT_PROMPTS = 64

# HF model_type -> (gguf MODEL_ARCH member, whether q/k rows are permuted into llama.cpp's rotary layout)
ARCHITECTURES = {"llama": ("LLAMA", True), "qwen2": ("QWEN2", False)}

CHATML = "<|im_start|>{role}\n{content}<|im_end|>\n"
OLLAMA_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                   "{{ end }}<|im_start|>assistant\n")


class ExportError(FactoryError):
    """An export that cannot be written for this model, or settings that do not fit the format."""


# --- GGUF: architecture, vocabulary, tensors ------------------------------------------------------------


def _architecture(config: dict[str, Any], where: str):
    """(gguf MODEL_ARCH, permute q/k) of a config.json; ExportError for an architecture or RoPE not supported."""
    import gguf

    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(f"{where}: model_type {model_type!r} cannot be exported to GGUF; supported: "
                          f"{', '.join(sorted(ARCHITECTURES))}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(f"{where}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported "
                          "by the GGUF export (only plain RoPE)")
    name, permute = ARCHITECTURES[model_type]
    return getattr(gguf.MODEL_ARCH, name), permute


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (per head; `rows` may be a LoRA B)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `_permute`."""
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _heads(config: dict[str, Any], hf_name: str) -> int | None:
    """How many heads a q/k projection's rows are permuted by (None: not a q/k projection)."""
    if ".q_proj." in hf_name:
        return config["num_attention_heads"]
    if ".k_proj." in hf_name:
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def _add_hparams(writer, config: dict[str, Any]) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    if head_dim * heads != config["hidden_size"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _pre_tokenizer(config: dict[str, Any], vocab: dict[str, int], where: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (the regex that splits text before BPE).

    llama.cpp recognises it by a hash of a test string's tokens; here by the model family, for the
    families the export supports. Raises ExportError for another BPE tokenizer.
    """
    if config["model_type"] == "qwen2":
        return "qwen2"
    if "<|begin_of_text|>" in vocab:
        return "llama-bpe"
    if "<|im_start|>" in vocab and "<repo_name>" in vocab:
        return "smollm"
    raise ExportError(f"{where}: unknown BPE pre-tokenizer (known: SmolLM2's smollm, Llama 3's llama-bpe, "
                      "Qwen2's qwen2): its GGUF would tokenize differently in llama.cpp")


def _add_vocab(writer, checkpoint: Path, config: dict[str, Any]) -> None:
    """Tokens, token types, merges, special token ids and chat template, as llama.cpp's converter writes
    a byte-level BPE ("gpt2") vocabulary; ids beyond the tokenizer up to vocab_size become [PAD<i>]."""
    import gguf
    from transformers import AutoTokenizer

    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{checkpoint}: no tokenizer.json (a fast tokenizer is needed for GGUF)")
    spec = json.loads(path.read_text())
    if spec["model"].get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(f"{checkpoint}: the tokenizer is not byte-level BPE (SentencePiece vocabularies are "
                          "not supported by the GGUF export)")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    vocab = tokenizer.get_vocab()
    size = config["vocab_size"]
    if max(vocab.values()) >= size:
        raise ExportError(f"{checkpoint}: the tokenizer has ids beyond the model's vocab_size {size}")
    by_id = {i: t for t, i in vocab.items()}
    added = {i: t.special for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.UNUSED if i not in by_id else
                     (gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED) if i in added else
                     gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(config, vocab, str(checkpoint)))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(checkpoint, load_merges=True, n_vocab=size)
    if "pad" not in special.special_token_ids and tokenizer.eos_token_id is not None:
        special.special_token_ids["pad"] = tokenizer.eos_token_id  # as training pads
    special.add_to_gguf(writer, quiet=True)


def _encode(name: str, data: np.ndarray, quant: str):
    """(array, ggml type or None) of one tensor: 1-D tensors stay f32; with q4_0 the embeddings and output
    are q8_0; rows that are not whole quantization blocks fall back to f16 (as llama.cpp's quantizer does)."""
    import gguf

    if data.ndim == 1 or quant == "f32":
        return data.astype(np.float32), None
    if quant == "f16":
        return data.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.Q8_0
    if quant == "q4_0" and name not in ("token_embd.weight", "output.weight"):
        qtype = gguf.GGMLQuantizationType.Q4_0
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def _file_type(quant: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]


def _load_weights(checkpoint: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{checkpoint}: no safetensors weights")
    return {k: v for f in files for k, v in load_file(f).items()}


def _finish(writer, tmp: Path, out: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def write_gguf(checkpoint: Path, out: Path, quant: str, name: str) -> Path:
    """Write the safetensors checkpoint folder `checkpoint` (config, weights, tokenizer) as one GGUF file.

    Tensor names come from the gguf package's `TensorNameMap` for the architecture; q/k rows of
    llama-architecture models are permuted into llama.cpp's rotary layout (transformers' GGUF loader
    undoes it); a tied LM head is left to `token_embd`. The file appears whole (written beside, then
    renamed). Holds the weights twice in memory (float32 and encoded) while writing.

    Raises ExportError for an unknown quant, an unsupported architecture, RoPE scaling or tokenizer,
    or a tensor without a GGUF name.
    """
    import gguf

    if quant not in MODEL_QUANTS:
        raise ExportError(f"{name}: quantization {quant!r} is not supported for GGUF; supported: "
                          f"{', '.join(MODEL_QUANTS)} (the gguf package cannot write K-quants such as q4_k_m)")
    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{name}: {checkpoint} is not a local checkpoint folder (no config.json)")
    config = json.loads((checkpoint / "config.json").read_text())
    arch, permute = _architecture(config, name)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _add_hparams(writer, config)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, checkpoint, config)
    for hf_name, tensor in _load_weights(checkpoint).items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        module, suffix = hf_name.rsplit(".", 1)
        target = names.get_name(module)
        if target is None:
            raise ExportError(f"{name}: tensor {hf_name} has no GGUF name for architecture "
                              f"{gguf.MODEL_ARCH_NAMES[arch]}")
        data = tensor.float().numpy()
        heads = _heads(config, hf_name) if permute and suffix == "weight" else None
        if heads:
            data = _permute(data, heads)
        encoded, qtype = _encode(f"{target}.{suffix}", data, quant)
        writer.add_tensor(f"{target}.{suffix}", encoded, raw_dtype=qtype)
    return _finish(writer, tmp, out)


def _lora_config(adapter_dir: Path, where: str) -> dict[str, Any]:
    """The adapter's config; ExportError for what a llama.cpp LoRA GGUF cannot express."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [field for field in ("use_dora", "alpha_pattern", "modules_to_save", "trainable_token_indices")
                   if config.get(field)]
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        unsupported.append("bias")
    if config.get("use_rslora") and config.get("rank_pattern"):
        unsupported.append("use_rslora with rank_pattern")
    if unsupported:
        raise ExportError(f"{where}: a llama.cpp LoRA GGUF cannot express {', '.join(unsupported)}; "
                          "export --format gguf (merged) instead")
    return config


def write_gguf_adapter(adapter_dir: Path, base: Path, out: Path, quant: str, name: str) -> Path:
    """Write the PEFT LoRA in `adapter_dir` as a llama.cpp LoRA GGUF for the base checkpoint folder `base`.

    Keys and tensors as convert_lora_to_gguf.py writes them: general.type "adapter", adapter.type
    "lora", adapter.lora.alpha, and per target `<gguf name>.weight.lora_a` (rank x in) and `.lora_b`
    (out x rank), B's rows permuted like the base's q/k. llama.cpp scales by alpha / rank; an rsLoRA
    adapter (alpha / sqrt(rank)) is written with alpha x sqrt(rank) so the scale is the same.

    Raises ExportError for an adapter quant other than f32/f16, an unsupported base (see `write_gguf`),
    DoRA, per-module alphas, saved modules, biases, or a target without a GGUF name (e.g. a LoRA on a
    tied LM head).
    """
    import gguf
    from safetensors.torch import load_file

    if quant not in ADAPTER_QUANTS:
        raise ExportError(f"{name}: adapter quantization {quant!r} is not supported; supported: "
                          f"{', '.join(ADAPTER_QUANTS)}")
    lora = _lora_config(adapter_dir, name)
    config = json.loads((base / "config.json").read_text())
    arch, permute = _architecture(config, name)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        module, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        pairs.setdefault(module, {})[part.split(".")[0]] = tensor.float().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    alpha = float(lora["lora_alpha"]) * (math.sqrt(lora["r"]) if lora.get("use_rslora") else 1.0)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    dtype = np.float16 if quant == "f16" else np.float32
    for module, ab in sorted(pairs.items()):
        target = names.get_name(module)
        if target is None or set(ab) != {"A", "B"}:
            raise ExportError(f"{name}: LoRA target {module} has no llama.cpp tensor (or lacks A or B)")
        b = ab["B"]
        heads = _heads(config, module + ".") if permute else None
        if heads:
            b = _permute(b, heads)
        writer.add_tensor(f"{target}.weight.lora_a", ab["A"].astype(dtype))
        writer.add_tensor(f"{target}.weight.lora_b", b.astype(dtype))
    return _finish(writer, tmp, out)


def apply_gguf_adapter(model, path: Path) -> None:
    """Add a LoRA GGUF to `model`'s weights in place as llama.cpp applies it: W += alpha / rank * B @ A
    (B's q/k rows un-permuted). Raises ExportError for a file that is not a LoRA adapter or names a
    tensor the model lacks."""
    import gguf
    import torch

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    if fields.get("general.type") != "adapter" or fields.get(gguf.Keys.Adapter.TYPE) != "lora":
        raise ExportError(f"{path}: not a LoRA adapter GGUF")
    alpha = float(fields[gguf.Keys.Adapter.LORA_ALPHA])
    config = model.config.to_dict()
    arch, permute = _architecture(config, str(path))
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    params = dict(model.named_parameters())
    to_hf = {f"{names.get_name(k.removesuffix('.weight'))}.weight": k for k in params if k.endswith(".weight")}
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    with torch.no_grad():
        for key in (k for k in tensors if k.endswith(".lora_a")):
            target = key.removesuffix(".lora_a")
            if target not in to_hf:
                raise ExportError(f"{path}: tensor {target} is not in the model")
            a, b = tensors[key], tensors[f"{target}.lora_b"]
            heads = _heads(config, to_hf[target]) if permute else None
            if heads:
                b = _unpermute(b, heads)
            params[to_hf[target]] += torch.from_numpy(alpha / a.shape[0] * (b @ a))


# --- merged and Ollama -------------------------------------------------------------------------------------


def merge(base: Path, adapter_dir: Path, out: Path) -> Path:
    """Merge the adapter into the base (peft `merge_and_unload`) and save a plain float32 safetensors
    checkpoint with the tokenizer (and its chat template) and generation config in the folder `out`.
    The base is loaded unquantized (also under a qlora adapter, as evaluation and serving load it)."""
    from factory.models import load_specialist

    model, tokenizer = load_specialist(str(base), str(adapter_dir))
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def ollama_template(tokenizer, where: str) -> str:
    """The Go template Ollama renders chats with, for a ChatML chat template (checked by rendering a
    system and a user message); ExportError for another template, which would need its own translation."""
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = "".join(CHATML.format(role=m["role"], content=m["content"]) for m in messages) + \
        "<|im_start|>assistant\n"
    if rendered != expected:
        raise ExportError(f"{where}: the chat template is not ChatML; the Ollama export translates ChatML "
                          "templates only (export --format gguf and write the Modelfile's TEMPLATE by hand)")
    return OLLAMA_TEMPLATE


def write_ollama(gguf_file: Path, tokenizer, out_dir: Path, max_new_tokens: int, where: str) -> Path:
    """A Modelfile beside `gguf_file` (in `out_dir`): FROM the GGUF, the ChatML template, stop tokens,
    temperature 0 (greedy, as the specialist was evaluated) and the evaluation's answer budget.
    Raises ExportError for a chat template that is not ChatML."""
    stops = dict.fromkeys(["<|im_end|>", tokenizer.eos_token])
    lines = [f"FROM ./{gguf_file.name}", f'TEMPLATE """{ollama_template(tokenizer, where)}"""',
             *(f'PARAMETER stop "{s}"' for s in stops if s), "PARAMETER temperature 0",
             f"PARAMETER num_predict {max_new_tokens}"]
    path = out_dir / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- fidelity ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """The test prompts a fidelity check asks, and the PyTorch specialist's answers to them."""

    prompts: list[str]
    refs: list[dict[str, Any]]
    tools: list[list[dict[str, Any]]]
    budget: int
    answers: list[str]
    score: float
    constraints: list[Any] | None = None  # each prompt's grammar, as the router decodes (`constrain.for_routing`)


def probe(model, tokenizer, routing: dict[str, Any], rows: list[dict[str, Any]],
          train_rows: list[dict[str, Any]]) -> Probe:
    """Render `rows` as evaluation does (answer and prompt budgets from the training split and the
    routing metadata) and record the specialist `model`'s greedy answers. Raises ExportError when no
    row can be rendered."""
    from factory.constrain import for_routing
    from factory.evaluate.generate import generate
    from factory.evaluate.run import max_new_tokens, prompt_budget, prompts_within

    budget = max_new_tokens(train_rows, tokenizer, routing["max_new_tokens"])
    limit = prompt_budget(model.config, routing.get("seq_budget") or model.config.max_position_embeddings, budget)
    prompts, kept, _ = prompts_within(tokenizer, rows, limit, routing.get("policy"))
    if not prompts:
        raise ExportError(f"task {routing['task']!r}: no test prompt could be rendered for the fidelity check")
    refs, tools = [rows[i]["output"] for i in kept], [rows[i].get("tools") or [] for i in kept]
    constraints = for_routing(routing, tools)
    answers = [g.text for g in generate(model, tokenizer, prompts, budget, desc="specialist", constraints=constraints)]
    return Probe(prompts, refs, tools, budget, answers, _score(answers, refs, tools, routing), constraints)


def _score(answers: list[str], refs, tools, routing: dict[str, Any]) -> float:
    from factory import kinds
    from factory.chat import parse_output

    kind = kinds.get(routing["kind"])
    return float(np.mean([kind.score(parse_output(a), r, routing["output_schema"], t)
                          for a, r, t in zip(answers, refs, tools)]))


def fidelity(model, tokenizer, check: Probe, routing: dict[str, Any], min_agreement: float | None) -> dict[str, Any]:
    """The exported `model`'s greedy answers to the probe against the specialist's: agreement (share of
    identical answers), its task score and the specialist's, and whether the agreement passes."""
    from factory.evaluate.generate import generate

    answers = [g.text for g in generate(model, tokenizer, check.prompts, check.budget, desc="export",
                                        constraints=check.constraints)]
    agreement = float(np.mean([a.strip() == r.strip() for a, r in zip(answers, check.answers)]))
    return {"n": len(answers), "agreement": agreement,
            "task_score": _score(answers, check.refs, check.tools, routing),
            "specialist_score": check.score, "min_agreement": min_agreement,
            "passed": min_agreement is None or agreement >= min_agreement}


def load_gguf(path: Path):
    """(model, tokenizer) of a GGUF file through transformers' GGUF loader (dequantized to float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factory.base_model import _quiet_transformers

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


# --- one export, end to end -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    """One written export: its key (`<format>[.<quant>]`), files, fidelity and status."""

    key: str
    files: list[Path]
    fidelity: dict[str, Any]
    seconds: float

    @property
    def failed(self) -> bool:
        return not self.fidelity["passed"]


def check_quants(fmt: str, quants: list[str] | None) -> list[str]:
    """The quantizations to write for `fmt` (its defaults when none are given); ExportError for an unknown
    format or a quantization the format does not take."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    allowed = {"merged": (), "gguf": MODEL_QUANTS, "gguf-adapter": ADAPTER_QUANTS, "ollama": MODEL_QUANTS}[fmt]
    quants = list(dict.fromkeys(quants or DEFAULT_QUANTS[fmt]))
    bad = [q for q in quants if q not in allowed]
    if bad:
        raise ExportError(f"--quant {','.join(bad)} does not apply to --format {fmt}; "
                          f"it takes: {', '.join(allowed) or 'none (float32 safetensors)'}")
    return quants


def export(task: str, version: str, fmt: str, quants: list[str] | None, out_dir: Path, data_dir: Path, *,
           n_prompts: int = DEFAULT_PROMPTS, min_agreement: float | None = None, record: bool = True) -> list[Exported]:
    """Export version `version` of `task` as `fmt` (one export per quantization) into `out_dir`, check each
    against the PyTorch specialist on up to `n_prompts` test prompts, and (with `record`) log it to the
    version's run and tags. `min_agreement` overrides `MIN_AGREEMENT` for every quantization.

    Returns the exports, failed ones included (`Exported.failed`). Raises ExportError for a bad format,
    quantization or model (see the writers), ValueError when the version has no routing metadata, and
    FileNotFoundError when the task's test split (dataset in the routing metadata) is not under `data_dir`.
    """
    from factory.base_model import resolve_base
    from factory.io import load_split
    from factory.models import load_specialist
    from factory.registry import download_adapter, record_export, version_routing

    quants = check_quants(fmt, quants)
    routing = version_routing(task, version)
    where = f"{task} v{version}"
    rows = load_split(data_dir, task, routing["dataset_version"], "test")[:n_prompts]
    train_rows = load_split(data_dir, task, routing["dataset_version"], "train")
    base = Path(resolve_base(routing["base_model"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir) as tmp:
        adapter = download_adapter(task, version, Path(tmp) / "adapter")
        specialist, tokenizer = load_specialist(str(base), str(adapter))
        check = probe(specialist, tokenizer, routing, rows, train_rows)
        del specialist
        jobs = _jobs(fmt, quants, where, base, adapter, tokenizer, routing, out_dir, Path(tmp))
        results = []
        for key, write, load in jobs:
            start = time.perf_counter()
            files = write()
            seconds = time.perf_counter() - start
            model, model_tokenizer = load(files)
            quant = key.split(".", 1)[-1]
            threshold = min_agreement if min_agreement is not None else MIN_AGREEMENT.get(quant)
            done = Exported(key, files, fidelity(model, model_tokenizer, check, routing, threshold), seconds)
            del model
            if record:
                record_export(task, version, key, files, {"status": "failed" if done.failed else "ok",
                                                          "seconds": round(seconds, 2), **done.fidelity})
            results.append(done)
    return results


def _jobs(fmt, quants, where, base, adapter, tokenizer, routing, out_dir: Path, tmp: Path):
    """(key, write() -> files, load(files) -> (model, tokenizer)) per export of the format."""
    from factory.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    if fmt == "merged":
        def load_merged(files):
            return AutoModelForCausalLM.from_pretrained(out_dir).eval(), load_tokenizer(str(out_dir))
        return [("merged", lambda: sorted(p for p in merge(base, adapter, out_dir).iterdir() if p.is_file()),
                 load_merged)]
    if fmt == "gguf-adapter":
        def load_adapted(files):
            model = AutoModelForCausalLM.from_pretrained(base).eval()
            apply_gguf_adapter(model, files[0])
            return model, tokenizer
        return [(f"gguf-adapter.{q}", lambda q=q: [write_gguf_adapter(adapter, base, out_dir / f"adapter-{q}.gguf",
                                                                      q, where)], load_adapted) for q in quants]
    merged = tmp / "merged"
    name = routing["task"]
    if fmt == "ollama":
        ollama_template(tokenizer, where)  # refuse a non-ChatML template before writing any GGUF

    def write(quant: str) -> list[Path]:
        if not merged.exists():
            merge(base, adapter, merged)
        if fmt == "gguf":
            return [write_gguf(merged, out_dir / f"{name}-{quant}.gguf", quant, where)]
        folder = out_dir / f"ollama-{quant}"
        model_file = write_gguf(merged, folder / f"{name}-{quant}.gguf", quant, where)
        return [model_file, write_ollama(model_file, tokenizer, folder, routing["max_new_tokens"], where)]

    return [(f"{fmt}.{q}", lambda q=q: write(q), lambda files: load_gguf(files[0])) for q in quants]


def version_of(task: str, version: str | None, alias: str | None) -> str:
    """The version number `--version` or `--alias` (default: champion) names; ExportError when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from factory.registry import alias_version

    client = MlflowClient()
    if version is not None and alias is not None:
        raise ExportError("give --version or --alias, not both")
    if version is None:
        found = alias_version(client, task, alias or "champion")
        if found is None:
            raise ExportError(f"task {task!r} has no {alias or 'champion'!r} version")
        return str(found.version)
    try:
        return str(client.get_model_version(task, version).version)
    except MlflowException:
        raise ExportError(f"task {task!r} has no version {version}") from None


def export_dir(registry_dir: Path, task: str, version: str, fmt: str) -> Path:
    """Where `factory export` writes by default: registry/exports/<task>/v<version>/<format>/."""
    return registry_dir / "exports" / task / f"v{version}" / fmt


# keep the gguf package's own INFO logs (one line per tensor) out of the CLI's output
logging.getLogger("gguf").setLevel(logging.WARNING)
