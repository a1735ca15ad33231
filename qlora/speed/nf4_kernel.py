"""The 4-bit weight in the compute dtype by a tiled Triton kernel (config key `nf4_kernel`, default on).

The exact-bf16 step dequantises every 4-bit weight twice per micro-batch (forward, and backward's input
gradient). bitsandbytes' kernel does it one scale block at a time; this one (the tile of `base_fp8`'s NF4 ->
e4m3 kernel, qlora/speed/fp8_kernels.py, writing the compute dtype) loads a BN x BK/2 tile of packed bytes at once,
each block's absmax once, and looks both halves of each byte up in the weight's own codebook
(`quant_state.code`). It computes what bitsandbytes computes, code * absmax in fp32 rounded once to the
weight's dtype, so the two agree bit for bit on the GPU (benchmarks/check_fast_path_cuda.py, at every Llama and
Qwen weight shape); Triton's CPU interpreter casts by truncation, within one bf16 step (tests/test_nf4_kernel.py).
Measured on an H100 inside the graphed Llama step: +1.2-1.6% per step (benchmarks/RESULTS.md).

It can also write rows `ld` elements apart, into the first K columns of a wider buffer. Weights it does not
cover (rows that are not whole scale blocks) and devices where it does not run (no Triton; the CPU outside
the interpreter) take bitsandbytes' kernel, which gives the same values.
"""

from __future__ import annotations

import os

import torch

TILE = (64, 128, 4)  # rows, columns, warps of one program (benchmarks/nf4_dequant_probe.py times others)
CODE_ATTR = "_qlora_code_f32"  # on a quant_state: its codebook as fp32 on the weight's device

try:  # Triton resolves a kernel's helpers from module globals, so the kernel sits at module level
    import triton
    import triton.language as tl
except Exception:  # ImportError, or Triton without a usable GPU driver
    triton = None


def runs_on(t: torch.Tensor) -> bool:
    """Whether the kernel runs for tensors like `t` (CUDA with Triton; or Triton's CPU interpreter)."""
    return triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def covers(weight, dtype: torch.dtype, qs=None) -> bool:
    """Whether the kernel gives bitsandbytes' result for this 4-bit weight (its quant_state: `qs`, or the weight's)
    written as `dtype`: rows of whole scale blocks, and the dtype the weight was quantised from (bitsandbytes
    rounds to that one)."""
    qs = qs or weight.quant_state
    n, k = qs.shape
    return runs_on(weight.data) and k % qs.blocksize == 0 and qs.dtype == dtype and qs.quant_type in ("nf4", "fp4")


def code_f32(weight) -> torch.Tensor:
    """The weight's 16-entry codebook as fp32 on its device, kept on its quant_state after the first call (a
    copy per call would be a host-to-device copy inside a CUDA graph)."""
    qs = weight.quant_state
    code = getattr(qs, CODE_ATTR, None)
    if code is None or code.device != weight.device:
        code = qs.code.to(weight.device, torch.float32)
        setattr(qs, CODE_ATTR, code)
    return code


def dequantize(weight, absmax: torch.Tensor, out: torch.Tensor | None = None, dtype: torch.dtype | None = None,
               tile=None) -> torch.Tensor:
    """The 4-bit weight [N, K] from its codes and fp32 block `absmax`: into `out`'s first K columns (out: [N, ld]
    with rows ld >= K elements apart and unit column stride; the other columns untouched), or a new [N, K] tensor
    of `dtype` (default: the weight's own). Call only where `covers(weight, dtype)`."""
    qs = weight.quant_state
    n, k = qs.shape
    if out is None:
        out = torch.empty((n, k), dtype=dtype or qs.dtype, device=weight.device)
    if out.shape[0] != n or out.shape[1] < k or out.stride(1) != 1:
        raise ValueError(f"nf4_kernel.dequantize: out {tuple(out.shape)} / {out.stride()} cannot take rows of {k}")
    bn, bk, warps = tile or TILE
    bk = max(bk, qs.blocksize)  # a tile spans whole scale blocks
    ld = out.stride(0)
    q = weight.data.view(torch.uint8).reshape(-1)  # FSDP keeps the packed bytes in a float dtype
    if n and k:
        _nf4_tile[(triton.cdiv(n, bn), triton.cdiv(k, bk))](q, absmax, code_f32(weight), out, n, k, ld,
                                                            BS=qs.blocksize, BN=bn, BK=bk,
                                                            WIDE=n * ld >= 2 ** 31, num_warps=warps)
    return out


if triton is not None:
    @triton.jit
    def _nf4_tile(q_ptr, absmax_ptr, code_ptr, out_ptr, N, K, LD, BS: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, WIDE: tl.constexpr):
        # a BN x BK tile of W from BN x BK/2 packed bytes (two codes per byte, the first in the high half); the
        # tile spans whole scale blocks (BK % BS == 0, K % BS == 0), so each block's absmax is loaded once;
        # WIDE: offsets need 64 bits
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        kb = tl.program_id(1) * (BK // 2) + tl.arange(0, BK // 2)
        if WIDE:
            n = n.to(tl.int64)
        inside = (n[:, None] < N) & (kb[None, :] < K // 2)
        byte = tl.load(q_ptr + n[:, None] * (K // 2) + kb[None, :], mask=inside, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4))
        lo = tl.load(code_ptr + (byte & 15))
        blk = tl.program_id(1) * (BK // BS) + tl.arange(0, BK // BS)
        am = tl.load(absmax_ptr + n[:, None] * (K // BS) + blk[None, :],
                     mask=(n[:, None] < N) & (blk[None, :] < K // BS), other=0.0)[:, :, None]
        hi = tl.reshape(tl.reshape(hi, (BN, BK // BS, BS // 2)) * am, (BN, BK // 2))
        lo = tl.reshape(tl.reshape(lo, (BN, BK // BS, BS // 2)) * am, (BN, BK // 2))
        w = tl.reshape(tl.join(hi, lo), (BN, BK)).to(out_ptr.dtype.element_ty)  # codes back in element order
        k = tl.program_id(1) * BK + tl.arange(0, BK)
        if WIDE:
            k = k.to(tl.int64)
        tl.store(out_ptr + n[:, None] * LD + k[None, :], w, mask=(n[:, None] < N) & (k[None, :] < K))
