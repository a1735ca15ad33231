"""Causal attention forward+backward, one CUDA card, by kernel: is a faster one than torch's flash
(varlen) kernel in this torch build? Llama-2-7B heads (32 x 128), bf16.

    python3 benchmarks/attn_probe.py --out DIR            # DIR/attn_probe.json, table on stdout

Shapes: one row of 32,768 and 16,384 tokens (issue 12's long-row target: one example per row, so no
packing mask is needed) and 8 rows of 2,048 (the fast-path micro-batch, each row one example).
Kernels: `varlen` (torch.nn.attention.varlen, what train.py runs for packed rows), and SDPA restricted
to one backend each: FLASH_ATTENTION, CUDNN_ATTENTION, EFFICIENT_ATTENTION. Each is checked against
`varlen` on the same inputs (output and the three input gradients, max abs difference relative to the
reference's max abs value). Time: median of 10 timed fwd+bwd after 3 warm-ups (CUDA events).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qlora.attention import _varlen_call  # noqa: E402

H, D = 32, 128


def varlen(q, k, v):
    """q, k, v [B, H, T, D] -> [B, H, T, D], each row one causal sequence, through torch's varlen kernel."""
    B, _, T, _ = q.shape
    cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32)
    flat = [x.transpose(1, 2).reshape(B * T, H, D) for x in (q, k, v)]
    return _varlen_call()(*flat, cu, cu, T, T).view(B, T, H, D).transpose(1, 2)


def sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


KERNELS = {"varlen": varlen, "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
           "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)}


def fwd_bwd(fn, q, k, v, g):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v)
    out.backward(g)
    return out


def time_ms(fn, q, k, v, g, warmup=3, reps=10) -> float:
    for _ in range(warmup):
        fwd_bwd(fn, q, k, v, g)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fwd_bwd(fn, q, k, v, g)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for B, T in [(1, 32768), (1, 16384), (8, 2048)]:
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        ref = fwd_bwd(varlen, q, k, v, g).detach()
        ref_grads = [x.grad.detach().clone() for x in (q, k, v)]
        flops = 4 * B * H * T * T * D / 2 * 3.5  # causal: half the square; fwd 1 + bwd 2.5
        for name, fn in KERNELS.items():
            row = {"kernel": name, "rows": B, "tokens_per_row": T}
            try:
                out = fwd_bwd(fn, q, k, v, g).detach()
                errs = [(out - ref).abs().max().item() / ref.abs().max().item()]
                errs += [(x.grad - r).abs().max().item() / r.abs().max().item() for x, r in zip((q, k, v), ref_grads)]
                ms = time_ms(fn, q, k, v, g)
                row.update(ms=round(ms, 2), tflops=round(flops / ms / 1e9, 1), rel_err_out_dq_dk_dv=[f"{e:.1e}" for e in errs])
            except Exception as e:  # a kernel this build or card does not have
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        del q, k, v, g, ref, ref_grads
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    (out / "attn_probe.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(meta)


if __name__ == "__main__":
    main()
