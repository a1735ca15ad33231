"""Llama 3.1-style rotary scaling (`rope_type: llama3`, Llama 3.1 / 3.2 / 3.3) in GGUF files, both ways.

A GGUF file has no key for this scaling: llama.cpp stores it as the tensor `rope_freqs.weight`, one factor
per rotary pair that divides the pair's default frequency (base^(-2i/d)). transformers' GGUF reader ignores
that tensor, so a Llama 3.1 file read as it is would get plain rotary embeddings: every low-frequency pair
turning up to `factor` times too fast. Here:

- `rope_factors(model)` gives the factors to write: the default frequencies over the model's own (its
  rotary embedding's `inv_freq`, computed by transformers from the config), or None for plain rope.
- `llama3_parameters(factors, ...)` finds the Llama 3 parameters (factor, low/high frequency factors,
  original context) that give exactly those factors, for the config of a converted file; factors that no
  Llama 3 scaling gives are refused.

The scaling itself (Meta's definition, by wavelength 2*pi/f of each default frequency f, for a context of
`original` tokens): wavelengths below original/high keep f, above original/low become f/factor, and in
between f is blended, (1 - s) f/factor + s f with s = (original/wavelength - low) / (high - low).
"""

from __future__ import annotations

import math

import torch

GGUF_NAME = "rope_freqs.weight"
# The factors fix only original/low and original/high (halving all three gives the same model), so the
# search tries the values of the released Llama 3.x configs first (1, 4, 8,192) and returns the first match.
_LOW, _HIGH = (1.0, 0.5, 2.0), (4.0, 2.0, 8.0)
_ORIGINAL = tuple(2 ** k for k in range(10, 18))  # 1,024 .. 131,072 tokens


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
    every factor is 1 (plain rope); a ValueError with the reason when no Llama 3 scaling gives them."""
    factors = factors.double()
    factor = float(factors.max())
    if abs(factor - 1.0) < 1e-6 and float(factors.min()) > 1 - 1e-6:
        return None
    for low in _LOW:
        for high in (h for h in _HIGH if h > low):
            for original in sorted(_ORIGINAL, key=lambda n: n != 8192):
                want = llama3_factors(theta, dim, factor, low, high, original)
                if want.shape == factors.shape and torch.allclose(want, factors, rtol=1e-5, atol=0):
                    return {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": original}
    raise ValueError(f"{source}: its {GGUF_NAME} ({factors.numel()} rotary factors, largest {factor:g}) is not "
                         "a Llama 3 frequency scaling, the only one read here: pass the model's Hugging Face "
                         "folder or hub id instead")


def set_rope(config, parameters: dict) -> None:
    """Put Llama 3 rope settings into a config of either transformers generation."""
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = dict(parameters)
    else:
        config.rope_scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
        config.rope_theta = parameters["rope_theta"]
