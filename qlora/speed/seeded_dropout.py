"""LoRA dropout whose mask is a pure function of (seed, salt, element index): nothing is stored.

torch's dropout draws its mask from the global RNG and keeps it for backward (one byte per element:
36 KB per token per Llama-7B layer over the seven LoRA inputs). Here the mask is recomputed from a
counter-based hash wherever it is needed - forward, backward, and the recompute of a checkpointed
layer - so no mask is saved and no RNG state has to be stashed and restored. That also makes the
LoRA node safe inside a CUDA graph (qlora/speed/cuda_graphs.py), where reading the RNG state is not allowed.

    keep[i] = fmix32(i * 0x9E3779B1 + fmix32(seed ^ mix(salt))) >= p * 2**32

`seed` is a one-element int64 tensor on the device, advanced once per training micro-batch by
`qlora.training.loss.TokenLoss` (a device-side add, so a captured graph advances it too); `salt` tells the
LoRA modules apart. On CUDA with Triton the mask and the scaling run as one kernel; elsewhere the
same integer arithmetic runs as torch ops, bit for bit the same mask (benchmarks/check_fast_path_cuda.py
compares the two on a GPU; tests/test_seeded_dropout.py checks the torch path).
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B1
SALT_MUL = 0x85EBCA77


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding uint32 values (products wrap mod 2**64;
    only their low 32 bits are kept, which wrapping leaves exact)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def threshold(p: float) -> int:
    """Hash values below this are dropped: a fraction p of all uint32 values."""
    return min(int(round(p * 2 ** 32)), 2 ** 32 - 1)


def keep_mask(shape, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """The bool keep-mask for a tensor of `shape` (torch ops; the reference for the Triton kernel)."""
    base = _fmix32((seed.reshape(()).to(torch.int64) & M32) ^ ((salt * SALT_MUL) & M32))
    n = 1
    for s in shape:
        n *= s
    idx = torch.arange(n, device=seed.device, dtype=torch.int64)
    return (_fmix32((idx * GOLDEN + base) & M32) >= threshold(p)).reshape(shape)


def apply(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """x * keep / (1 - p) with the mask of (seed, salt) over x's flat indices. Used for the dropped
    input in forward and, with the same arguments, for its gradient in backward."""
    if p <= 0:
        return x
    if x.is_cuda and _triton_kernel() is not None and x.is_contiguous():
        return _apply_triton(x, seed, salt, p)
    keep = keep_mask(x.shape, seed, salt, p)
    return (x.float() * (1.0 / (1.0 - p))).where(keep, 0.0).to(x.dtype)


# --------------------------------------------------------------------------- the CUDA kernel

try:  # Triton resolves a kernel's helpers from module globals, so both are defined at module level
    import triton
    import triton.language as tl
except Exception:  # ImportError, or Triton without a usable GPU driver
    triton = None

if triton is not None:
    @triton.jit
    def _fmix_tl(h):
        h = h ^ (h >> 16)
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h = h ^ (h >> 13)
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    @triton.jit
    def _dropout_kernel(x_ptr, out_ptr, seed_ptr, salt_mix, thr, scale, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        inside = offs < n
        x = tl.load(x_ptr + offs, mask=inside, other=0.0)
        seed = tl.load(seed_ptr).to(tl.int64)
        base = _fmix_tl((seed & 0xFFFFFFFF) ^ salt_mix)
        h = _fmix_tl((offs * 0x9E3779B1 + base) & 0xFFFFFFFF)
        y = tl.where(h >= thr, x.to(tl.float32) * scale, 0.0)
        tl.store(out_ptr + offs, y.to(x.dtype), mask=inside)


def _triton_kernel():
    return None if triton is None else _dropout_kernel


def _apply_triton(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    out = torch.empty_like(x)
    n, block = x.numel(), 2048
    _dropout_kernel[(triton.cdiv(n, block),)](x, out, seed, (salt * SALT_MUL) & M32, threshold(p),
                                              1.0 / (1.0 - p), n, BLOCK=block)
    return out


def new_seed(seed: int, device) -> torch.Tensor:
    """The shared per-model seed counter (int64, one element) on `device`."""
    return torch.tensor([seed * 1_000_003], dtype=torch.int64, device=device)
