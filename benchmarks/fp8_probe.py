"""Where the time of one NF4 linear goes, bf16 against FP8 (qlora/speed/fp8.py), one CUDA card, by kernel.

    python3 benchmarks/fp8_probe.py --out DIR            # DIR/fp8_probe.json, table on stdout

Llama-2-7B's three projection shapes (out x in: 4096 x 4096, 11008 x 4096, 4096 x 11008), NF4 double
quant with the dequantised block scales cached (as `absmax_cache`), `--tokens` rows of input. Timed
alone: bitsandbytes' dequantisation to bf16, the bf16 GEMMs
of forward (x W^T) and backward (g W), the FP8 weight kernel (rows, and transposed for backward) at a
few tile shapes (rows, columns, warps), the per-token quantiser, `_scaled_mm` with per-row and with per-tensor scales; then the
whole forward and backward of the base path each way as the fused node runs it. GPU time only: each
timing replays a CUDA graph of 10 calls (the training step runs under graphs too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import nf4_weight  # noqa: E402  (tests/helpers.py)
from qlora.speed import fp8, fp8_kernels  # noqa: E402
from qlora.speed.lora_fused import block_absmax, dequantize  # noqa: E402


def timed(fn, reps: int = 20, warm: int = 3, per_graph: int = 10) -> float:
    """GPU milliseconds per call: `per_graph` calls captured in one CUDA graph (so host time, which the
    training step's graphs also remove, is not counted), median over `reps` replays."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / per_graph)
    del graph
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="")
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    m = args.tokens
    rows = []
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        weight = nf4_weight(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
        absmax = block_absmax(weight, True)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        w16 = dequantize(weight, True)
        x8, sx = fp8.quantize_rows(x)
        g8, sg = fp8.quantize_rows(g)
        w8, sw = fp8.quantize_weight(weight, absmax, False)
        wt8, sv = fp8.quantize_weight(weight, absmax, True)
        one = torch.ones((), device="cuda")
        r = {"shape": f"{n}x{k}", "tokens": m, "ms": {}}
        t = r["ms"]
        t["dequant bf16 (bnb)"] = timed(lambda: dequantize(weight, True))
        t["mm bf16 fwd"] = timed(lambda: x @ w16.t())
        t["mm bf16 bwd"] = timed(lambda: g @ w16)
        for tile in ((64, 128, 4), (32, 128, 4), (64, 64, 4), (128, 128, 8), (32, 256, 4), (64, 256, 8), (128, 64, 4)):
            t[f"weight->fp8 {tile}"] = timed(lambda: fp8_kernels.weight(weight, absmax, sw, False, tile=tile))
            t[f"weight->fp8 T {tile}"] = timed(lambda: fp8_kernels.weight(weight, absmax, sv, True, tile=tile))
        t["weight->fp8 then .t().contiguous()"] = timed(lambda: fp8_kernels.weight(weight, absmax, sw, False).t().contiguous())
        t["rows->fp8 x"] = timed(lambda: fp8.quantize_rows(x))
        t["rows->fp8 g"] = timed(lambda: fp8.quantize_rows(g))
        t["scaled_mm rowwise fwd"] = timed(lambda: fp8.scaled_mm(x8, sx, w8, sw))
        t["scaled_mm rowwise bwd"] = timed(lambda: fp8.scaled_mm(g8, sg, wt8, sv))
        t["scaled_mm tensorwise fwd"] = timed(lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,
                                                                       out_dtype=torch.bfloat16))
        t["base fwd bf16 (dequant + mm)"] = timed(lambda: x @ dequantize(weight, True).t())
        t["base fwd fp8"] = timed(lambda: (fp8._last_input.__setitem__(0, None), fp8.linear(x, weight, absmax)))
        t["base bwd bf16 (dequant + mm)"] = timed(lambda: g @ dequantize(weight, True))
        t["base bwd fp8"] = timed(lambda: fp8.grad_input(g, weight, absmax))
        flops = 2 * m * n * k
        r["tflops"] = {name: flops / (ms * 1e9) for name, ms in t.items() if "mm" in name}
        rows.append(r)
        print(f"--- {n} x {k}, {m} tokens", flush=True)
        for name, ms in t.items():
            extra = f"  ({flops / (ms * 1e9):.0f} TFLOP/s)" if "mm" in name else ""
            print(f"  {name:<40} {ms:8.3f} ms{extra}", flush=True)
        del weight, w16, x, g, x8, g8, w8, wt8
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fp8_probe.json").write_text(json.dumps(
            {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
