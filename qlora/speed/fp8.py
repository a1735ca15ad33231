"""FP8 GEMMs for the frozen 4-bit base path (config key `base_fp8`; opt-in, Ada and Hopper GPUs).

In the fused NF4+LoRA node (qlora/speed/lora_fused.py) two GEMMs per linear touch the frozen weight W:
y = x W^T in forward and dx = g W in backward, two thirds of a LoRA step's FLOPs. With `base_fp8` both
run as float8 e4m3 GEMMs (`torch._scaled_mm`: twice bf16's tensor-core rate on Hopper) with one scale
per row of each operand, the output in bf16:

  forward   y  = (x / sx) (W / sw)^T  * sx sw^T       sx: one per token, sw: one per output feature
  backward  dx = (g / sg) (W^T / sv)^T * sg sv^T      sg: one per token, sv: one per input feature

The weight goes from its 4-bit codes straight to e4m3 in one kernel (one byte written per weight, not
bf16's two), for backward written transposed: Hopper's fp8 GEMM wants both operands contiguous along the
summed dimension. Its scales cost nothing: an NF4 (or FP4) block holds its absmax exactly (the codebook
spans [-1, 1]), so a row's largest |w| is the largest absmax of its blocks, and a column's is at most the
largest absmax of the blocks that cover it. Activations and gradients are scaled per token (one kernel:
amax, divide, cast). The LoRA path and everything outside the node stay in the compute dtype.

The cost is precision: e4m3 keeps 3 mantissa bits (<= 6.25% relative rounding per operand element, ~2%
RMS), added to the NF4 weight's own quantisation error. RESULTS.md reports the loss deviation next to
the speed. On CPU the same arithmetic runs as torch ops (torch's CPU `_scaled_mm`), which the tests
check; on CUDA Triton kernels quantise, and benchmarks/check_fast_path_cuda.py compares them with the
torch ops bit for bit.
"""

from __future__ import annotations

import weakref

import torch

from . import nf4_kernel

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
INV_MAX = 1.0 / E4M3_MAX  # scales are amax * this, in torch and in Triton alike (bit-identical)
TINY = 1e-12  # an all-zero row gets this amax, so its scale is not 0 (its values stay 0)
SCALES_ATTR = "_qlora_fp8_scales"


def unsupported_reason(device: torch.device) -> str | None:
    """None if this GPU and torch build run what `base_fp8` needs (a per-row scaled e4m3 GEMM, and the
    Triton quantiser where Triton is present), else why not: measured on Hopper only, refused early."""
    try:
        t = torch.ones(16, 32, device=device, dtype=torch.bfloat16)
        t8, s = quantize_rows(t)
        scaled_mm(t8, s, t8[:16], s[:16])
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - any failure means: not on this GPU/build
        return f"per-row scaled FP8 GEMMs, which fail here ({type(e).__name__}: {str(e)[:160]})"
    return None


def usable(weight) -> bool:
    """Whether this 4-bit weight's GEMMs can run in FP8 (`_scaled_mm` wants both sizes divisible by 16)."""
    n, k = weight.quant_state.shape
    return n % 16 == 0 and k % 16 == 0


def weight_scales(weight, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per output feature, per input feature) dequantisation scales of a frozen 4-bit weight, from its
    block absmax (fp32); kept on the weight after the first call (the weight never changes)."""
    cached = getattr(weight, SCALES_ATTR, None)
    if cached is not None:
        return cached
    qs = weight.quant_state
    n, k = qs.shape
    bs = qs.blocksize
    if k % bs == 0:  # blocks never straddle rows: the bounds come from absmax alone
        blocks = absmax.float().view(n, k // bs)
        rows, cols = blocks.amax(1), blocks.amax(0).repeat_interleave(bs)
    else:
        w = _dequantize_f32(weight, absmax).abs()
        rows, cols = w.amax(1), w.amax(0)
    scales = (rows.clamp(min=TINY) * INV_MAX, cols.clamp(min=TINY) * INV_MAX)
    setattr(weight, SCALES_ATTR, scales)
    return scales


def _dequantize_f32(weight, absmax: torch.Tensor) -> torch.Tensor:
    qs = weight.quant_state
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight.data, absmax, qs.blocksize, qs.quant_type,
                                                          qs.shape, torch.float32)


def quantize_weight(weight, absmax: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-bit weight as e4m3 with one scale per row: (W / sw, sw) of shape (out, in), or with
    `transpose` (W^T / sv, sv) of shape (in, out), each contiguous."""
    rows, cols = weight_scales(weight, absmax)
    scale = cols if transpose else rows
    if weight.is_cuda and _kernels_ok():
        return _weight_triton(weight, absmax, scale, transpose), scale
    return quantize_weight_torch(weight, absmax, scale, transpose), scale


def quantize_weight_torch(weight, absmax: torch.Tensor, scale: torch.Tensor, transpose: bool) -> torch.Tensor:
    """`quantize_weight`'s e4m3 tensor as torch ops (the CPU path, and the reference for the kernel)."""
    w = _dequantize_f32(weight, absmax)
    return _to_e4m3((w.t() if transpose else w) * scale.reciprocal()[:, None]).contiguous()


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / s, s) for a 2-D tensor, s = max |row| / 448 per row (fp32), the quotient in e4m3."""
    if t.is_cuda and _kernels_ok() and t.stride(-1) == 1:
        return _rows_triton(t)
    return quantize_rows_torch(t)


def quantize_rows_torch(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` as torch ops (the CPU path, and the reference for the kernel)."""
    scale = t.abs().amax(dim=1).float().clamp(min=TINY) * INV_MAX
    return _to_e4m3(t.float() * scale.reciprocal()[:, None]).contiguous(), scale


def _to_e4m3(t: torch.Tensor) -> torch.Tensor:
    # the quotients are <= 448 up to rounding; a cast above 448 would give NaN (e4m3fn has no inf).
    # Both paths multiply by the fp32 reciprocal of the scale (one division per row, not per element)
    return t.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def scaled_mm(a8: torch.Tensor, sa: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """(a8 * sa) @ (b8 * sb)^T in bf16, for e4m3 a8 (M, K) and b8 (N, K) with per-row scales."""
    return torch._scaled_mm(a8, b8.t(), scale_a=sa.view(-1, 1), scale_b=sb.view(1, -1), out_dtype=torch.bfloat16)


_last_input: list = [None]  # (weakref to the input, its version and shape, its e4m3 form)


def quantize_input(x2: torch.Tensor, owner: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` of a linear's input `x2` (a 2-D view of `owner`, the tensor the linear was called
    with), reused while the next linear reads the very same tensor: q, k and v read one, gate and up
    another. Only a weak reference to `owner` is kept (it lives no longer for this), so a live reference
    means the same memory; an in-place change bumps its version and misses. At most one quantised input
    outlives its tensor, until the next call replaces it."""
    owner = x2 if owner is None else owner
    if owner.is_inference():  # inference tensors have no version counter
        return quantize_rows(x2)
    last = _last_input[0]
    key = (owner._version, x2.shape, x2.stride(), x2.storage_offset())
    if last is not None and last[0]() is owner and last[1] == key:
        return last[2]
    out = quantize_rows(x2)
    _last_input[0] = (weakref.ref(owner), key, out)
    return out


def linear(x2: torch.Tensor, weight, absmax: torch.Tensor, owner: torch.Tensor | None = None) -> torch.Tensor:
    """x2 W^T for a (tokens, in) input and a frozen 4-bit weight, as one FP8 GEMM (bf16 out); `owner`: the
    tensor x2 is a view of (see `quantize_input`)."""
    x8, sx = quantize_input(x2, owner)
    w8, sw = quantize_weight(weight, absmax, transpose=False)
    return scaled_mm(x8, sx, w8, sw)


def grad_input(g: torch.Tensor, weight, absmax: torch.Tensor) -> torch.Tensor:
    """g W for a (tokens, out) output gradient: the input gradient of `linear`, as one FP8 GEMM."""
    g8, sg = quantize_rows(g)
    wt8, sv = quantize_weight(weight, absmax, transpose=True)
    return scaled_mm(g8, sg, wt8, sv)


# --------------------------------------------------------------------------- the CUDA kernels

try:  # Triton resolves a kernel's helpers from module globals, so the kernels sit at module level
    import triton
    import triton.language as tl
except Exception:  # ImportError, or Triton without a usable GPU driver
    triton = None

if triton is not None:
    @triton.jit
    def _rows_kernel(x_ptr, out_ptr, scale_ptr, K: tl.constexpr, stride, INV: tl.constexpr, BLOCK: tl.constexpr):
        # one row per program, in chunks: the max first, then the quotients (the second read hits L2)
        row = tl.program_id(0).to(tl.int64)
        amax = tl.zeros((BLOCK,), tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) * INV
        rcp = tl.div_rn(1.0, scale)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride + offs, mask=offs < K, other=0.0).to(tl.float32)
            # a NaN stays NaN (the loop's non-finite check must see it), as in the torch path
            y = tl.minimum(tl.maximum(x * rcp, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                           propagate_nan=tl.PropagateNan.ALL)
            tl.store(out_ptr + row * K + offs, y.to(tl.float8e4nv), mask=offs < K)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _weight_kernel(q_ptr, absmax_ptr, code_ptr, scale_ptr, out_ptr, N, K, BS: tl.constexpr,
                       TRANSPOSE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCKED: tl.constexpr,
                       WIDE: tl.constexpr):
        # a BN x BK tile of W from BN x BK/2 packed bytes (two codes per byte, the first in the high half).
        # BLOCKED: the tile spans whole scale blocks, so their absmax is loaded once per block, not per byte;
        # WIDE: offsets need 64 bits (N * K >= 2**31)
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        kb = tl.program_id(1) * (BK // 2) + tl.arange(0, BK // 2)  # byte column within a row
        if WIDE:
            n = n.to(tl.int64)
        inside = (n[:, None] < N) & (kb[None, :] < K // 2)
        row = n[:, None] * (K // 2)
        byte = tl.load(q_ptr + row + kb[None, :], mask=inside, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4))
        lo = tl.load(code_ptr + (byte & 15))
        if BLOCKED:
            blk = tl.program_id(1) * (BK // BS) + tl.arange(0, BK // BS)
            am = tl.load(absmax_ptr + n[:, None] * (K // BS) + blk[None, :],
                         mask=(n[:, None] < N) & (blk[None, :] < K // BS), other=0.0)[:, :, None]
            hi = tl.reshape(tl.reshape(hi, (BN, BK // BS, BS // 2)) * am, (BN, BK // 2))
            lo = tl.reshape(tl.reshape(lo, (BN, BK // BS, BS // 2)) * am, (BN, BK // 2))
        else:
            absmax = tl.load(absmax_ptr + (row * 2 + kb[None, :] * 2) // BS, mask=inside, other=0.0)
            hi, lo = hi * absmax, lo * absmax
        if TRANSPOSE:  # W^T: one scale per input feature (column of W), stored (K, N)
            r_hi = tl.div_rn(1.0, tl.load(scale_ptr + kb * 2, mask=kb < K // 2, other=1.0))
            r_lo = tl.div_rn(1.0, tl.load(scale_ptr + kb * 2 + 1, mask=kb < K // 2, other=1.0))
            hi, lo = hi * r_hi[None, :], lo * r_lo[None, :]
        else:  # W: one scale per output feature (row), stored (N, K)
            r = tl.div_rn(1.0, tl.load(scale_ptr + n, mask=n < N, other=1.0))
            hi, lo = hi * r[:, None], lo * r[:, None]
        hi = tl.minimum(tl.maximum(hi, -448.0), 448.0).to(tl.float8e4nv)
        lo = tl.minimum(tl.maximum(lo, -448.0), 448.0).to(tl.float8e4nv)
        w = tl.reshape(tl.join(hi, lo), (BN, BK))  # codes back in element order
        k = tl.program_id(1) * BK + tl.arange(0, BK)
        ok = (n[:, None] < N) & (k[None, :] < K)
        if WIDE:
            k = k.to(tl.int64)
        if TRANSPOSE:
            tl.store(out_ptr + k[:, None] * N + n[None, :], tl.trans(w), mask=tl.trans(ok))
        else:
            tl.store(out_ptr + n[:, None] * K + k[None, :], w, mask=ok)


def _kernels_ok() -> bool:
    return triton is not None


def _rows_triton(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = t.shape
    out = torch.empty((m, k), dtype=E4M3, device=t.device)
    scale = torch.empty(m, dtype=torch.float32, device=t.device)
    block = min(4096, triton.next_power_of_2(k))
    _rows_kernel[(m,)](t, out, scale, k, t.stride(0), INV=INV_MAX, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return out, scale


# rows, columns, warps of the weight kernel's tile, as W and as W^T: of seven tiles timed on an H200
# (benchmarks/fp8_probe.py, results/2026-11-28-fp8/blocked/fp8_probe.json), (32, 256) is the fastest
# transposed tile on all three Llama shapes; for W most tiles are within 10% of each other
TILE, TILE_T = (64, 64, 4), (32, 256, 4)


def _weight_triton(weight, absmax: torch.Tensor, scale: torch.Tensor, transpose: bool, tile=None) -> torch.Tensor:
    qs = weight.quant_state
    n, k = qs.shape
    code = nf4_kernel.code_f32(weight)
    q = weight.data.view(torch.uint8).reshape(-1)  # FSDP keeps the packed bytes in a float dtype
    out = torch.empty((k, n) if transpose else (n, k), dtype=E4M3, device=weight.device)
    bn, bk, warps = tile or (TILE_T if transpose else TILE)
    bs = qs.blocksize
    _weight_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](q, absmax, code, scale, out, n, k, BS=bs,
                                                            TRANSPOSE=transpose, BN=bn, BK=bk,
                                                            BLOCKED=k % bs == 0 and bk % bs == 0,
                                                            WIDE=n * k >= 2 ** 31, num_warps=warps)
    return out
