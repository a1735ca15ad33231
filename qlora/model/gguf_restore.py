"""What transformers' GGUF reader drops from a file, put back into the config (and what the GGUF writer
must write for it): rotary scalings that llama.cpp keeps as tensors, Phi-3's sliding window and Qwen3's
head width.

Llama 3.1-style scaling (`rope_type: llama3`, Llama 3.1 / 3.2 / 3.3). A GGUF file has no key for it:
llama.cpp stores the tensor `rope_freqs.weight`, one factor per rotary pair that divides the pair's default
frequency (base^(-2i/d)). Read as it is, a Llama 3.1 file would get plain rotary embeddings: every
low-frequency pair turning up to `factor` times too fast.
- `rope_factors(model)` gives the factors to write: the default frequencies over the model's own (its
  rotary embedding's `inv_freq`, computed by transformers from the config), or None for plain rope.
- `llama3_parameters(factors, ...)` finds the Llama 3 parameters (factor, low/high frequency factors,
  original context) that give exactly those factors; factors that no Llama 3 scaling gives are refused.
The scaling itself (Meta's definition, by wavelength 2*pi/f of each default frequency f, for a context of
`original` tokens): wavelengths below original/high keep f, above original/low become f/factor, and in
between f is blended, (1 - s) f/factor + s f with s = (original/wavelength - low) / (high - low).

Phi-3's LongRoPE (Phi-3-*-128k, Phi-3.5): per-pair factors for short and for long contexts, as the tensors
`rope_factors_short.weight` / `rope_factors_long.weight`, with the original context and the attention factor
as `phi3.rope.scaling.*` keys. Phi-3's sliding window is the key `phi3.attention.sliding_window`.
`restore(reader, config, source)` puts each of these back.
"""

from __future__ import annotations

import math

import numpy as np
import torch

GGUF_NAME = "rope_freqs.weight"
LONG_NAME, SHORT_NAME = "rope_factors_long.weight", "rope_factors_short.weight"
# The factors fix only original/low and original/high (halving all three gives the same model), so the
# search tries the values of the released Llama 3.x configs first (1, 4, 8,192) and returns the first match.
_LOW, _HIGH = (1.0, 0.5, 2.0), (4.0, 2.0, 8.0)
_ORIGINAL = tuple(2 ** k for k in range(10, 18))  # 1,024 .. 131,072 tokens


class GGUFRestoreError(ValueError):
    """What a GGUF file holds cannot be put back into the config (the message names the file)."""


def default_frequencies(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def llama3_factors(theta: float, dim: int, factor: float, low: float, high: float, original: int) -> torch.Tensor:
    """The divisor of each rotary pair's default frequency under Llama 3 scaling."""
    out = []
    for f in default_frequencies(theta, dim).tolist():
        wavelength = 2 * math.pi / f
        if wavelength < original / high:
            scaled = f
        elif wavelength > original / low:
            scaled = f / factor
        else:
            s = (original / wavelength - low) / (high - low)
            scaled = (1 - s) * f / factor + s * f
        out.append(f / scaled)
    return torch.tensor(out, dtype=torch.float64)


def rope_settings(config) -> dict:
    """The config's rotary settings (transformers 5 keeps them in `rope_parameters`, older in `rope_scaling`)."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type")) or "default"
    return rope


def rope_factors(model) -> torch.Tensor | None:
    """Per-pair divisors of the default frequencies for a Llama 3-scaled `model`, None for plain rope."""
    config = model.config
    rope = rope_settings(config)
    if rope["rope_type"] == "default":
        return None
    n_head = config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    inv = next(b for n, b in model.named_buffers() if n.endswith("rotary_emb.inv_freq")).double().cpu()
    return default_frequencies(float(rope["rope_theta"]), dim) / inv


def llama3_parameters(factors: torch.Tensor, theta: float, dim: int, source: str) -> dict | None:
    """The `rope_type: llama3` settings that give `factors` (float32 as a GGUF file holds them), None when
    every factor is 1 (plain rope); a GGUFRestoreError with the reason when no Llama 3 scaling gives them."""
    factors = factors.double()
    factor = float(factors.max())
    if abs(factor - 1.0) < 1e-6 and float(factors.min()) > 1 - 1e-6:
        return None
    for low in _LOW:
        for high in (h for h in _HIGH if h > low):
            for original in sorted(_ORIGINAL, key=lambda n: n != 8192):
                want = llama3_factors(theta, dim, factor, low, high, original)
                if want.shape == factors.shape and torch.allclose(want, factors, rtol=1e-5, atol=0):
                    snapped = float(f"{factor:.6g}")  # 8.000000953674316 (float32 inv_freq noise) -> 8.0
                    if torch.allclose(llama3_factors(theta, dim, snapped, low, high, original), factors, rtol=1e-5, atol=0):
                        factor = snapped
                    return {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": original}
    raise GGUFRestoreError(f"{source}: its {GGUF_NAME} ({factors.numel()} rotary factors, largest {factor:g}) is not "
                         "a Llama 3 frequency scaling, the only one read here: pass the model's Hugging Face "
                         "folder or hub id instead")


def set_rope(config, parameters: dict) -> None:
    """Put rope settings into a config of either transformers generation."""
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = dict(parameters)
    else:
        config.rope_scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
        config.rope_theta = parameters["rope_theta"]


def _field(reader, key):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _tensor(reader, name):
    t = next((t for t in reader.tensors if t.name == name), None)
    return None if t is None else torch.from_numpy(np.asarray(t.data, dtype=np.float32).copy())


def gguf_head_dim(reader) -> int | None:
    """Per-head width of a GGUF model: `<arch>.attention.key_length`, else the first layer's query rows over
    the head count; None when neither is there."""
    arch = _field(reader, "general.architecture")
    if arch is None:
        return None
    key_length, heads = _field(reader, f"{arch}.attention.key_length"), _field(reader, f"{arch}.attention.head_count")
    if key_length:
        return int(key_length)
    q = next((t for t in reader.tensors if t.name == "blk.0.attn_q.weight"), None)
    return int(q.shape[1]) // int(heads) if heads and q is not None and len(q.shape) == 2 else None


def misread_tokenizer(reader) -> str | None:
    """Why this transformers would read the file's tokenizer wrongly, or None. Older transformers (5.17)
    convert every Phi-3 file's tokenizer as Phi-3's own SentencePiece one; a byte-level BPE tokenizer (Phi-4-mini,
    or a Phi-3 model exported with another tokenizer) would come out splitting text differently."""
    from transformers.integrations import ggml

    converter = getattr(ggml, "GGUF_TO_FAST_CONVERTERS", {}).get("phi3")
    if (_field(reader, "general.architecture") == "phi3" and _field(reader, "tokenizer.ggml.model") == "gpt2"
            and getattr(converter, "__name__", "") == "GGUFPhi3Converter"):
        import transformers
        return (f"transformers {transformers.__version__} reads a Phi-3 GGUF file's tokenizer as Phi-3's "
                "SentencePiece one, and this file's is byte-level BPE: use a newer transformers (5.25 reads it)")
    return None


def restore(reader, config, source: str) -> None:
    """Put back into `config` what transformers' GGUF reader dropped from `reader`'s file (see the module
    docstring); a GGUFRestoreError names what cannot be put back."""
    arch = _field(reader, "general.architecture")
    head_dim = gguf_head_dim(reader)
    if head_dim and getattr(config, "head_dim", None) not in (None, head_dim):
        config.head_dim = head_dim  # transformers' Qwen3 reader drops it and assumes 128
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factors = _tensor(reader, GGUF_NAME)
    if factors is not None:
        params = llama3_parameters(factors, float(rope_settings(config)["rope_theta"]), dim, source)
        if params is not None:
            set_rope(config, params)
    long_, short = _tensor(reader, LONG_NAME), _tensor(reader, SHORT_NAME)
    if (long_ is None) != (short is None):
        raise GGUFRestoreError(f"{source}: it has one of {LONG_NAME} and {SHORT_NAME} but not the other")
    if long_ is not None:
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if not original:
            raise GGUFRestoreError(f"{source}: LongRoPE factors without {arch}.rope.scaling.original_context_length")
        params = {"rope_type": "longrope", "rope_theta": float(rope_settings(config)["rope_theta"]),
                  "long_factor": long_.tolist(), "short_factor": short.tolist(),
                  "original_max_position_embeddings": int(original)}
        attn = _field(reader, f"{arch}.rope.scaling.attn_factor")
        if attn:
            params["attention_factor"] = float(attn)
        set_rope(config, params)
        config.original_max_position_embeddings = int(original)
    rotary = _field(reader, f"{arch}.rope.dimension_count")
    if arch == "phi3" and rotary and int(rotary) < dim:  # Phi-4-mini: rotary embeddings on part of each head
        params = rope_settings(config)
        params["partial_rotary_factor"] = int(rotary) / dim
        set_rope(config, params)
        config.partial_rotary_factor = int(rotary) / dim
    window = _field(reader, f"{arch}.attention.sliding_window")
    if arch == "phi3" and window and not getattr(config, "sliding_window", None):
        config.sliding_window = int(window)
