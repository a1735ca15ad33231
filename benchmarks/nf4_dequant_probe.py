"""NF4 -> bf16 dequantisation: bitsandbytes' kernel against a tiled Triton kernel, alone, on the GPU.

Why: the exact-bf16 step dequantises every 4-bit weight twice per micro-batch (forward, and backward's input
gradient); on Llama-3-8B that is 68 ms of a ~1,130 ms step, bitsandbytes' kernel running at ~2.1 TB/s
(benchmarks/NOTES.md, 18). The tiled kernel is the one `base_fp8` uses for e4m3 (qlora/speed/fp8.py: a tile of
packed bytes loaded at once, each scale block's absmax loaded once), writing bf16 instead. It can also write
with a row stride larger than K (`--ld_extra`), which a GEMM over [x | x A^T] and [W | s B] would need: the LoRA B
product then rides in the base GEMM instead of a read and a write of the output afterwards.

    python benchmarks/nf4_dequant_probe.py                 # one GPU: equality with bitsandbytes, then timings
    TRITON_INTERPRET=1 python benchmarks/nf4_dequant_probe.py --check_only --device cpu   # the kernel on the CPU

Prints one JSON line per case: bytes moved, microseconds and TB/s of each kernel, and whether the outputs are
bit-identical (on the CPU, Triton's interpreter casts fp32 to bf16 by truncation: within one bf16 step there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))

from qlora.speed import lora_fused  # noqa: E402
from common import gpu_time_ms  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _nf4_bf16_kernel(q_ptr, absmax_ptr, code_ptr, out_ptr, N, K, LD, BS: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, WIDE: tl.constexpr):
    # a BN x BK tile of W from BN x BK/2 packed bytes (two codes per byte, the first in the high half); the tile
    # spans whole scale blocks (BK % BS == 0), so each block's absmax is loaded once; rows written LD apart
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
    w = tl.reshape(tl.join(hi, lo), (BN, BK)).to(out_ptr.dtype.element_ty)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    if WIDE:
        k = k.to(tl.int64)
    tl.store(out_ptr + n[:, None] * LD + k[None, :], w, mask=(n[:, None] < N) & (k[None, :] < K))


def dequant_triton(weight, absmax: torch.Tensor, ld_extra: int = 0, tile=(64, 128, 4), out=None) -> torch.Tensor:
    """The 4-bit weight in bf16, [N, K + ld_extra] with the first K columns filled (rows whole 64-blocks)."""
    qs = weight.quant_state
    n, k = qs.shape
    if k % qs.blocksize or tile[1] % qs.blocksize:
        raise ValueError("rows must be whole scale blocks and the tile whole blocks")
    code = qs.code.to(weight.device, torch.float32)
    q = weight.data.view(torch.uint8).reshape(-1)
    ld = k + ld_extra
    out = torch.empty((n, ld), dtype=torch.bfloat16, device=weight.device) if out is None else out
    bn, bk, warps = tile
    _nf4_bf16_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](q, absmax, code, out, n, k, ld, BS=qs.blocksize,
                                                              BN=bn, BK=bk, WIDE=n * ld >= 2 ** 31, num_warps=warps)
    return out


def time_us(fn) -> float:
    return gpu_time_ms(fn, iters=50) * 1e3


def main(argv=None) -> int:
    import helpers  # tests/helpers.py: an NF4 Params4bit from a dense weight

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--check_only", action="store_true", help="equality only, no timings (the CPU interpreter)")
    p.add_argument("--ld_extra", type=int, default=16, help="extra columns per row for the strided case")
    a = p.parse_args(argv)
    shapes = ((256, 512), (192, 1024)) if a.device == "cpu" else ((4096, 4096), (1024, 4096), (14336, 4096),
                                                                  (4096, 14336), (18944, 3584))
    tiles = ((64, 128, 4),) if a.check_only else ((64, 128, 4), (32, 256, 4), (64, 256, 8), (128, 128, 8))
    failed = 0
    for n, k in shapes:
        weight = helpers.nf4_weight((torch.randn(n, k) * 0.02).to(torch.bfloat16).to(a.device))
        absmax = lora_fused.block_absmax(weight, True)
        want = lora_fused.dequantize(weight, True)  # bitsandbytes' kernel
        got = dequant_triton(weight, absmax)
        strided = dequant_triton(weight, absmax, a.ld_extra)[:, :k]
        same = torch.equal(got, want) and torch.equal(strided, want)
        step = (got.float() - want.float()).abs() <= want.float().abs() * 2.0 ** -7
        rec = {"shape": [n, k], "bit_identical": same, "within_one_bf16_step": bool(step.all())}
        failed += not (same if a.device == "cuda" else bool(step.all()))
        if not a.check_only:
            moved = n * k // 2 + n * k * 2 + absmax.numel() * 4  # codes in, bf16 out, scales in
            rec["bitsandbytes_us"] = time_us(lambda: lora_fused.dequantize(weight, True))
            per_tile = {f"{t[0]}x{t[1]} w{t[2]}": time_us(lambda t=t: dequant_triton(weight, absmax, tile=t)) for t in tiles}
            rec["triton_us"] = per_tile
            buf = torch.empty((n, k + a.ld_extra), dtype=torch.bfloat16, device=a.device)
            rec["triton_strided_us"] = time_us(lambda: dequant_triton(weight, absmax, a.ld_extra, out=buf))
            rec["bitsandbytes_tb_s"] = moved / rec["bitsandbytes_us"] / 1e6
            rec["triton_best_tb_s"] = moved / min(per_tile.values()) / 1e6
        print(json.dumps(rec), flush=True)
    print("all PASS" if not failed else f"{failed} FAIL")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
