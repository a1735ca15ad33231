"""Write a plain (merged) Hugging Face causal LM to one GGUF file, the format llama.cpp, Ollama and LM
Studio read, with the `gguf` package alone (no llama.cpp checkout).

    from qlora.evaluation.gguf_write import write_gguf
    write_gguf(model, tokenizer, "model.gguf", "f16")     # f16 | bf16 | q8_0

What is written: the architecture's hyper-parameters (`ARCHS`: the transformers model type -> the GGUF
architecture name, the tensor names come from gguf's own `TensorNameMap`), every weight (2-D weights in
the chosen type, 1-D tensors such as norms in f32, as llama.cpp's converter does), and the tokenizer:
the vocabulary with token types, the BPE merges, the bos/eos/pad/unk ids, `tokenizer.ggml.pre` (which
pre-tokenizer split llama.cpp applies) and the chat template. For the "llama" architecture the q and k
projections are permuted the way llama.cpp's convert_hf_to_gguf.py does (llama.cpp applies rotary
embeddings to interleaved pairs; transformers' GGUF reader permutes them back).

Supported: Llama, Mistral (both as GGUF "llama"), Qwen2, Qwen3 and Phi-3 models with a byte-level BPE
tokenizer (GPT-2 style: SmolLM2, Llama 3, Qwen, Phi-4-mini), with plain rotary embeddings, Llama 3.1-style
scaling on Llama models (llama.cpp's `rope_freqs.weight`) or LongRoPE on Phi-3 (`rope_factors_long/short`);
qlora/model/gguf_restore.py reads them back. SentencePiece tokenizers (Llama 2, Mistral v0.1, Gemma), other
architectures and other rope scalings are refused with a ModelLoadError that says what is supported.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from ..model.base import ModelLoadError
from ..model.gguf_restore import GGUF_NAME as ROPE_FREQS, LONG_NAME, SHORT_NAME, rope_factors, rope_settings

# transformers model_type -> (gguf architecture, q/k permuted for llama.cpp's rotary layout)
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False),
         "phi3": ("phi3", False)}
ROPE_KINDS = {"llama": ("default", "llama3"), "mistral": ("default", "llama3"), "phi3": ("default", "longrope")}
TYPES = ("f16", "bf16", "q8_0")
SUPPORTED = ("Llama, Mistral, Qwen2, Qwen3 and Phi-3 models with a byte-level BPE tokenizer (SmolLM2, Llama 3, Qwen); "
             "SentencePiece tokenizers (Llama 2, Mistral v0.1, Gemma) are not exported")

# the pre-tokenizer split of the tokenizer (tokenizer.json) -> llama.cpp's `tokenizer.ggml.pre` name
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_BY_SPLIT = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def gguf_arch(config) -> tuple[str, bool]:
    """(GGUF architecture name, whether q/k are permuted) for a transformers config, or a ModelLoadError."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ModelLoadError(f"cannot export a '{model_type}' model to GGUF: supported are {SUPPORTED}")
    kind = rope_settings(config)["rope_type"]
    if kind not in ROPE_KINDS.get(model_type, ("default",)):
        raise ModelLoadError(f"cannot export this {model_type} model to GGUF: its rope scaling '{kind}' is not "
                             "written (plain rope is, Llama 3.1-style 'llama3' on Llama models and LongRoPE on Phi-3)")
    return ARCHS[model_type]


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: each head's two rotary halves interleaved into pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_data(w: torch.Tensor, ftype: str):
    """(numpy data, raw GGML type or None) of one tensor: 1-D tensors in f32, the rest in `ftype`
    (q8_0 needs rows that are a multiple of 32; others fall back to f16, as llama.cpp does)."""
    a = w.detach().float().cpu().numpy()
    if a.ndim < 2:
        return a, None
    if ftype == "q8_0" and a.shape[-1] % 32 == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if ftype == "bf16":
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return a.astype(np.float16), None


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer split, or a ModelLoadError (not byte-level BPE)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if model.get("type") != "BPE" or "ByteLevel" not in kinds:
        kind = "SentencePiece-style" if "Metaspace" in kinds or model.get("byte_fallback") else \
            f"a {model.get('type')} tokenizer with pre-tokenizer {kinds}"
        raise ModelLoadError(f"cannot export this tokenizer to GGUF: it is {kind}; supported are {SUPPORTED}")
    byte_level = steps[kinds.index("ByteLevel")]
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"
    if kinds[0] == "Split" and (steps[0].get("pattern") or {}).get("Regex") in PRE_BY_SPLIT:
        return PRE_BY_SPLIT[steps[0]["pattern"]["Regex"]]
    raise ModelLoadError(f"cannot export this tokenizer to GGUF: its pre-tokenizer {kinds} is not one llama.cpp "
                         "knows by name here (GPT-2, SmolLM, Llama 3, Qwen2 splits are)")


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Vocabulary, token types, merges, special ids, pre-tokenizer and chat template (byte-level BPE)."""
    pre = pre_tokenizer_name(tokenizer)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    if max(by_id) >= vocab_size:
        raise ModelLoadError(f"the tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embeddings beyond the tokenizer: llama.cpp's converter names them [PADn]
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{name}_token_id")
        if tid is not None:
            getattr(writer, f"add_{name}_token_id")(tid)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model, tokenizer, path, ftype: str = "f16", name: str = "") -> None:
    """Write `model` (a plain *ForCausalLM, e.g. merged) and `tokenizer` to `path` in `ftype`."""
    if ftype not in TYPES:
        raise ValueError(f"unknown GGUF type {ftype!r}: choose one of {', '.join(TYPES)}")
    config = model.config
    arch, permute = gguf_arch(config)
    pre_tokenizer_name(tokenizer)  # refuse an unsupported tokenizer before any weight is converted
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    names = gguf.TensorNameMap(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    name = name or Path(str(path)).stem
    if arch == "llama" and name == "mistral":  # transformers reads a "llama" file named exactly that as
        name = "mistral-llama"                  # model_type mistral, which gguf-py has no tensor map for
    writer.add_name(name)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    rope_all = rope_settings(config)
    writer.add_rope_dimension_count(int(head_dim * float(rope_all.get("partial_rotary_factor") or 1.0)))
    if getattr(config, "sliding_window", None) and arch == "phi3":
        writer.add_sliding_window(int(config.sliding_window))
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope_all["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    tied = getattr(config, "tie_word_embeddings", False)
    for key, w in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelLoadError(f"cannot export tensor {key} of this {config.model_type} model: gguf has no name for it")
        if permute and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            w = permute_qk(w, n_head if "attn_q" in gguf_name else n_kv)
        data, raw = tensor_data(w, ftype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
    if rope_all["rope_type"] == "llama3":  # per-pair divisors of the default frequencies, as llama.cpp reads them
        writer.add_tensor(ROPE_FREQS, rope_factors(model).float().numpy())
    elif rope_all["rope_type"] == "longrope":  # Phi-3's short and long context factors, as llama.cpp's converter writes them
        original = rope_all.get("original_max_position_embeddings") or config.original_max_position_embeddings
        writer.add_tensor(LONG_NAME, np.asarray(rope_all["long_factor"], dtype=np.float32))
        writer.add_tensor(SHORT_NAME, np.asarray(rope_all["short_factor"], dtype=np.float32))
        writer.add_rope_scaling_orig_ctx_len(int(original))
        # always, as llama.cpp's converter does (llama.cpp takes 1.0 when it is missing): the scale the model's
        # rotary embedding puts on cos and sin, which transformers derives from the context ratio when unset
        scaling = next(m.attention_scaling for m in model.modules() if hasattr(m, "attention_scaling"))
        writer.add_rope_scaling_attn_factors(float(scaling))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
