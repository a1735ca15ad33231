"""The 4-bit base weights: which dtype they compute in, quantising a model's linears, and keeping
bitsandbytes' CPU inference repack away from them.

bitsandbytes' `Linear4bit.forward`, on a CPU with AVX512-BF16, the first time it runs in eval mode
on an input that does not require grad, rewrites its packed weight in place into a layout for its
bf16 CPU kernel (`_convert_weight_packed_for_cpu`) and from then on computes through `gemv_4bit`.
That op has no autograd kernel, so once a model has been evaluated no gradient flows back through
such a layer in training any more, and it computes in bf16 whatever the compute dtype. One eval
pass would silently stop the adapters upstream of every 4-bit linear without a fused LoRA node from
training (and change the losses). `guard_cpu_4bit_repack` turns that path off per layer; every model
`qlora.model.base.load_base_model` builds, for training or inference, gets it, so a training run, its eval
passes, `qlora.evaluation.evaluate`, generation and merge all compute the same thing on every CPU. Inference
keeps the guard too: the repacked kernel rounds activations and block scales to bf16 (SmolLM2 NF4,
fp32 compute: eval loss 0.5-0.6% lower than the fp32 path), and where speed matters on a CPU
`qlora.evaluation.inference`'s dequantised linears generate about as fast with the exact fp32 numbers.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from ..config import Config

# bitsandbytes' per-layer switch for the repack (set from the CPU's flags in Linear4bit.__init__)
REPACK_FLAG = "support_avx512bf16_for_cpu"


# --------------------------------------------------------------------------- compute dtype

def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype the 4-bit layers compute in. `auto`: bf16 on CUDA (fp16 where bf16 is unsupported);
    on CPU whichever of bf16 and fp32 runs `cpu_matmul_ms` faster on this CPU, timed once per process
    (CPUs with AVX512-BF16/AMX usually pick bf16, AVX2-only CPUs fp32, where bf16 matmuls are 5-60x
    slower). Cheap to call again: the timing is cached."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return fastest_cpu_dtype()


def compute_dtype_name(name: str, device: torch.device) -> str:
    """`resolve_compute_dtype` as a config value ("float32", "bfloat16", ...)."""
    return str(resolve_compute_dtype(name, device)).removeprefix("torch.")


def cpu_matmul_ms(dtype: torch.dtype, n: int = 256, k: int = 1024, m: int = 1024, reps: int = 3) -> float:
    """Milliseconds for one forward-shaped (x @ W.T) plus one backward-shaped (g @ W) matmul."""
    gen = torch.Generator().manual_seed(0)
    x, w, g = (torch.randn(s, generator=gen).to(dtype) for s in ((n, k), (m, k), (n, m)))
    x @ w.t(), g @ w  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        x @ w.t(), g @ w
    return (time.perf_counter() - t0) / reps * 1e3


@functools.cache
def fastest_cpu_dtype() -> torch.dtype:
    """bf16 or fp32, whichever `cpu_matmul_ms` finds faster (measured on the first call only)."""
    bf16, fp32 = cpu_matmul_ms(torch.bfloat16), cpu_matmul_ms(torch.float32)
    return torch.bfloat16 if bf16 < fp32 else torch.float32


# --------------------------------------------------------------------------- quantising

def quantize_linears_(model: nn.Module, cfg: Config, compute_dtype: torch.dtype, device, skip=("lm_head",)) -> None:
    """Replace every `nn.Linear` (but `skip`) by a bitsandbytes 4-bit `Linear4bit`, in place, layer by
    layer so peak memory stays near one full-precision layer above the quantised model."""
    import bitsandbytes as bnb

    storage = getattr(torch, cfg.quant_storage)  # uint8, or a float dtype so FSDP can shard the packed weights
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child_name in skip:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=cfg.double_quant,
                                  quant_type=cfg.quant, quant_storage=storage, device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu" if device.type == "cpu" else device),
                                         requires_grad=False, compress_statistics=cfg.double_quant,
                                         quant_type=cfg.quant, quant_storage=storage, module=q)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            q = q.to(device)  # quantises on the move
            setattr(module, child_name, q)
            del child
    model.is_loaded_in_4bit = True
    guard_cpu_4bit_repack(model)


# --------------------------------------------------------------------------- the repack guard

def linears_4bit(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every bitsandbytes `Linear4bit` in `model`."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]


def is_repacked(module: nn.Module) -> bool:
    """Whether a `Linear4bit`'s weight is in bitsandbytes' CPU inference layout (no gradient through it)."""
    qs = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
    return bool(getattr(qs, "packing_format_for_cpu", False))


def guard_cpu_4bit_repack(model: nn.Module) -> int:
    """Keep every `Linear4bit` of `model` on its trainable path on any CPU: no in-place repack into
    the bf16 inference layout at eval, so evaluating a model never changes how it trains or what it
    computes. Idempotent; returns how many layers it covers. Call it before the model's first eval
    forward (`qlora.model.base.load_base_model` does); a layer that has already been repacked is an error."""
    layers = linears_4bit(model)
    done = [n for n, m in layers if is_repacked(m)]
    if done:
        raise RuntimeError(f"{len(done)} 4-bit linears were already repacked for CPU inference ({done[0]}, ...): "
                           "guard the model right after loading it, before any eval forward")
    for _, m in layers:
        setattr(m, REPACK_FLAG, False)
    return len(layers)


def unguarded_4bit_linears(model: nn.Module) -> list[str]:
    """Names of the `Linear4bit` layers that could take (or took) the CPU inference repack: [] when
    `guard_cpu_4bit_repack` covers the whole model."""
    return [n for n, m in linears_4bit(model) if getattr(m, REPACK_FLAG, False) or is_repacked(m)]
