"""The Triton kernels of `base_fp8` (qlora/speed/fp8.py): rows of activations or gradients to e4m3 with one
scale per row, and a frozen 4-bit weight straight from its codes to e4m3 (as W or as W^T).

Both compute exactly what fp8.py's torch ops compute (benchmarks/check_fast_path_cuda.py checks them bit for
bit on the card; Triton's CPU interpreter casts by truncation, at times a binade low: tests/test_fp8.py):
scales are amax * (1 / 448) in fp32, each value is multiplied by the fp32 reciprocal of its scale, clamped to
+-448 (a NaN stays NaN) and cast once. The row kernel can read a row from up to three tensors side by side (the
output gradients of a grouped node's members), with one scale over all of them; the weight kernel can write
into the columns of a wider buffer (the members' weights side by side).
"""

from __future__ import annotations

import torch

from .nf4_kernel import code_f32, runs_on

E4M3 = torch.float8_e4m3fn

try:  # Triton resolves a kernel's helpers from module globals, so the kernels sit at module level
    import triton
    import triton.language as tl
except Exception:  # ImportError, or Triton without a usable GPU driver
    triton = None

# rows, columns, warps of the weight kernel's tile, as W and as W^T: of seven tiles timed on an H200
# (benchmarks/fp8_probe.py, results/2026-11-28-fp8/blocked/fp8_probe.json), (32, 256) is the fastest
# transposed tile on all three Llama shapes; for W most tiles are within 10% of each other
TILE, TILE_T = (64, 64, 4), (32, 256, 4)
MAX_PARTS = 3  # tensors one row kernel reads side by side


def available(t: torch.Tensor) -> bool:
    """Whether the kernels run for tensors like `t` (CUDA with Triton, or Triton's CPU interpreter)."""
    return runs_on(t)


if triton is not None:
    @triton.jit
    def _amax(x_ptr, K: tl.constexpr, amax, BLOCK: tl.constexpr):
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        return amax

    @triton.jit
    def _write(x_ptr, out_ptr, K: tl.constexpr, rcp, BLOCK: tl.constexpr):
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
            # a NaN stays NaN (the loop's non-finite check must see it), as in the torch path
            y = tl.minimum(tl.maximum(x * rcp, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                           propagate_nan=tl.PropagateNan.ALL)
            tl.store(out_ptr + offs, y.to(tl.float8e4nv), mask=offs < K)

    @triton.jit
    def _rows_kernel(a_ptr, b_ptr, c_ptr, out_ptr, scale_ptr, sa, sb, sc, KA: tl.constexpr, KB: tl.constexpr,
                     KC: tl.constexpr, INV: tl.constexpr, BLOCK: tl.constexpr):
        # one row per program over [a | b | c] (KB, KC may be 0): the max first, then the quotients (the second
        # read hits L2)
        row = tl.program_id(0).to(tl.int64)
        amax = tl.zeros((BLOCK,), tl.float32)
        amax = _amax(a_ptr + row * sa, KA, amax, BLOCK)
        amax = _amax(b_ptr + row * sb, KB, amax, BLOCK)
        amax = _amax(c_ptr + row * sc, KC, amax, BLOCK)
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) * INV
        rcp = tl.div_rn(1.0, scale)
        out = out_ptr + row * (KA + KB + KC)
        _write(a_ptr + row * sa, out, KA, rcp, BLOCK)
        _write(b_ptr + row * sb, out + KA, KB, rcp, BLOCK)
        _write(c_ptr + row * sc, out + KA + KB, KC, rcp, BLOCK)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _weight_kernel(q_ptr, absmax_ptr, code_ptr, scale_ptr, out_ptr, N, K, LD, BS: tl.constexpr,
                       TRANSPOSE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCKED: tl.constexpr,
                       WIDE: tl.constexpr):
        # a BN x BK tile of W from BN x BK/2 packed bytes (two codes per byte, the first in the high half), written
        # to rows LD elements apart. BLOCKED: the tile spans whole scale blocks, so their absmax is loaded once per
        # block, not per byte; WIDE: offsets need 64 bits
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
            tl.store(out_ptr + k[:, None] * LD + n[None, :], tl.trans(w), mask=tl.trans(ok))
        else:
            tl.store(out_ptr + n[:, None] * LD + k[None, :], w, mask=ok)


def rows(parts: list[torch.Tensor], inv_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([p_1 | .. | p_n] / s, s) for 2-D tensors of one row count with unit column stride (n <= MAX_PARTS):
    s = max |row| * inv_max over all parts, one fp32 per row; the quotients in e4m3, (rows, sum of widths)."""
    m = parts[0].shape[0]
    widths = [p.shape[1] for p in parts]
    out = torch.empty((m, sum(widths)), dtype=E4M3, device=parts[0].device)
    scale = torch.empty(m, dtype=torch.float32, device=parts[0].device)
    padded = list(parts) + [parts[0]] * (MAX_PARTS - len(parts))  # unused slots: width 0, never read
    ks = widths + [0] * (MAX_PARTS - len(parts))
    block = min(4096, triton.next_power_of_2(max(widths)))
    _rows_kernel[(m,)](*padded, out, scale, *(p.stride(0) for p in padded), *ks, INV=inv_max, BLOCK=block,
                       num_warps=8 if block >= 4096 else 4)
    return out, scale


def weight(weight, absmax: torch.Tensor, scale: torch.Tensor, transpose: bool, out: torch.Tensor | None = None,
           tile=None) -> torch.Tensor:
    """The 4-bit weight [N, K] as e4m3, divided by `scale` per row (W) or, `transpose`, per column and stored as
    W^T [K, N]; into `out` (rows of at least that width, unit column stride; the other columns untouched) or a
    new contiguous tensor."""
    qs = weight.quant_state
    n, k = qs.shape
    shape = (k, n) if transpose else (n, k)
    if out is None:
        out = torch.empty(shape, dtype=E4M3, device=weight.device)
    if out.shape[0] != shape[0] or out.shape[1] < shape[1] or out.stride(1) != 1:
        raise ValueError(f"fp8_kernels.weight: out {tuple(out.shape)} / {out.stride()} cannot take {shape}")
    q = weight.data.view(torch.uint8).reshape(-1)  # FSDP keeps the packed bytes in a float dtype
    bn, bk, warps = tile or (TILE_T if transpose else TILE)
    bs = qs.blocksize
    ld = out.stride(0)
    _weight_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](q, absmax, code_f32(weight), scale, out, n, k, ld,
                                                            BS=bs, TRANSPOSE=transpose, BN=bn, BK=bk,
                                                            BLOCKED=k % bs == 0 and bk % bs == 0,
                                                            WIDE=max(n * k, (k if transpose else n) * ld) >= 2 ** 31, num_warps=warps)
    return out
