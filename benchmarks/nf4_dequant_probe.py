"""NF4 -> bf16 dequantisation: bitsandbytes' kernel against a tiled Triton kernel, alone, on the GPU.

Why: the exact-bf16 step dequantises every 4-bit weight twice per micro-batch (forward, and backward's input
gradient); on Llama-3-8B that is 68 ms of a ~1,130 ms step, bitsandbytes' kernel running at ~2.1 TB/s
(benchmarks/NOTES.md, 18). The tiled kernel is `nf4_kernel`'s (qlora/speed/nf4_kernel.py: a tile of packed bytes loaded
at once, each scale block's absmax loaded once); this times its tiles. It can also write
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

from qlora.speed import lora_fused, nf4_kernel  # noqa: E402
from common import gpu_time_ms  # noqa: E402


def dequant_triton(weight, absmax: torch.Tensor, ld_extra: int = 0, tile=None, out=None) -> torch.Tensor:
    """The 4-bit weight in bf16 by qlora/speed/nf4_kernel.py's kernel, [N, K + ld_extra] with the first K columns
    filled."""
    n, k = weight.quant_state.shape
    out = torch.empty((n, k + ld_extra), dtype=torch.bfloat16, device=weight.device) if out is None else out
    return nf4_kernel.dequantize(weight, absmax, out, tile=tile)


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
