"""The LoRA B product inside the base GEMM, alone, on the GPU: is [x | x A^T] [W | s B]^T faster than
x W^T followed by y += s (x A^T) B^T?

Why: in the fused NF4+LoRA forward each projection's output y (tokens x out) is written by the base GEMM and then
read and written again by the rank-r update (`y.addmm_`): 31 ms per Llama-3-8B step for gate/up alone
(benchmarks/NOTES.md, 18). Appending r columns to the GEMM's inner dimension does the same sum inside the GEMM's
accumulator, at the price of copying the input into a [tokens, K + r] buffer (once per group: gate and up read the
same input) and writing the dequantised weight with a row stride of K + r (benchmarks/nf4_dequant_probe.py's
kernel). This times both forms for a group of projections that share one input, with the dequantisation included,
and reports how far apart their outputs are (another order of additions: bf16 rounding, not a bit-for-bit match).

    python benchmarks/lora_concat_probe.py          # one GPU; prints one JSON line per shape
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
sys.path.insert(2, str(HERE.parent / "tests"))

from qlora.speed import lora_fused  # noqa: E402
from nf4_dequant_probe import dequant_triton, time_us  # noqa: E402

# (name, tokens, in, outs of the projections that read one input): Llama-3-8B's gate/up and q/k/v, Qwen2.5-7B's gate/up
SHAPES = (("llama3 gate/up", 4096, 4096, (14336, 14336)), ("llama3 q/k/v", 4096, 4096, (4096, 1024, 1024)),
          ("qwen2.5 gate/up", 4096, 3584, (18944, 18944)))


def main(argv=None) -> int:
    import helpers  # tests/helpers.py: an NF4 Params4bit from a dense weight

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=8.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="small shapes, outputs compared, no timings (CPU: with "
                   "TRITON_INTERPRET=1)")
    a = p.parse_args(argv)
    dev, r, s = torch.device(a.device), a.rank, a.scale
    shapes = (("small gate/up", 64, 256, (512, 512)), ("small q/k/v", 64, 256, (256, 128, 128))) if a.small else SHAPES
    worst = 0.0
    for name, m, k, outs in shapes:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        lora_a = torch.randn(r * len(outs), k, device=dev, dtype=torch.bfloat16) * 0.02
        members = []
        for n in outs:
            w = helpers.nf4_weight((torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16))
            members.append((w, lora_fused.block_absmax(w, True), torch.randn(n, r, device=dev, dtype=torch.bfloat16)))

        def separate():  # today's node: dequantise, base GEMM, then the rank-r update over each output
            h = x @ lora_a.t()
            ys = []
            for i, (w, absmax, b) in enumerate(members):
                y = x @ lora_fused.dequantize(w, True).t()
                ys.append(y.addmm_(h[:, i * r:(i + 1) * r], b.t(), alpha=s))
            return ys

        xc = torch.empty(m, k + r * len(outs), device=dev, dtype=torch.bfloat16)
        bufs = [torch.empty(n, k + r * len(outs), device=dev, dtype=torch.bfloat16) for n in outs]

        def concatenated():  # [x | x A^T] [W | s B (in this member's r columns, 0 elsewhere)]^T
            xc[:, :k].copy_(x)
            xc[:, k:].copy_(x @ lora_a.t())
            ys = []
            for i, ((w, absmax, b), buf) in enumerate(zip(members, bufs)):
                dequant_triton(w, absmax, r * len(outs), out=buf)
                buf[:, k:].zero_()
                buf[:, k + i * r:k + (i + 1) * r].copy_(b * s)
                ys.append(xc @ buf.t())
            return ys

        want, got = separate(), concatenated()
        err = max(((g.float() - w_.float()).abs().max() / w_.float().abs().max()).item() for g, w_ in zip(got, want))
        worst = max(worst, err)
        rec = {"case": name, "tokens": m, "in": k, "outs": outs, "rank": r, "largest_rel_diff": err}
        if not a.small:
            t_sep, t_cat = time_us(separate), time_us(concatenated)
            rec.update(separate_us=round(t_sep, 1), concatenated_us=round(t_cat, 1), saved_us=round(t_sep - t_cat, 1))
        print(json.dumps(rec), flush=True)
    # the same sums in another order, rounded to bf16: measured 3.4e-3 (one bf16 step, 2^-8) on the CPU; allow four
    print("all PASS" if worst <= 2 ** -6 else f"FAIL: outputs {worst:.1e} apart")
    return 0 if worst <= 2 ** -6 else 1


if __name__ == "__main__":
    sys.exit(main())
