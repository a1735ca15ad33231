"""Causal attention forward+backward, one CUDA card, by kernel: is a faster one than torch's flash
(varlen) kernel in this torch build? Llama-2-7B heads (32 x 128), bf16.

    python3 benchmarks/attn_probe.py --out DIR            # DIR/attn_probe.json, table on stdout

Cases: one row of 32,768 and 16,384 tokens (the long-row target: >= 7,000 tok/s for one 32,768-token row), 8 rows of 2,048 with one
example each, the same packed with examples of 64-1,500 tokens, and GQA (8 K/V heads).
Kernels: `varlen` (torch.nn.attention.varlen, train.py's default on CUDA), for unpacked rows SDPA
restricted to one backend each (FLASH_ATTENTION, CUDNN_ATTENTION, EFFICIENT_ATTENTION), and last
`cudnn_ragged` (cuDNN's ragged path through aten::_cudnn_attention_forward; under torch 2.11 it faults on
a 32,768-token row and poisons the CUDA context, so that case runs last). Each is checked against
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
from qlora.speed.attention import _varlen_call  # noqa: E402

H, D = 32, 128


def ragged(kernel):
    """q, k, v [B, H, T, D] -> [B, H, T, D] through a ragged kernel (torch's varlen or cuDNN's ragged
    path), each row split into the examples `lens` (one per row if None)."""
    def run(q, k, v, lens=None):
        B, Hq, T, _ = q.shape
        lens = lens or [[T]] * B
        starts = [0]
        for row in lens:
            for n in row:
                starts.append(starts[-1] + n)
        cu = torch.tensor(starts, device=q.device, dtype=torch.int32)
        flat = [x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (q, k, v)]
        return kernel()(*flat, cu, cu, max(max(r) for r in lens), max(max(r) for r in lens)).view(
            B, T, Hq, D).transpose(1, 2)
    return run


def _cudnn_ragged_call():
    """aten::_cudnn_attention_forward given cumulative sequence lengths: cuDNN's ragged (THD) path, the one
    torch takes for nested tensors; torch's autograd formula gives the backward. Under torch 2.11 its
    gradients are wrong (benchmarks/NOTES.md, "cuDNN attention"), so train.py does not offer it."""
    def call(q, k, v, cu_q, cu_k, max_q, max_k):
        if q.shape[1] != k.shape[1]:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
        return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu_q, cu_k, max_q, max_k, True, 0.0, True,
                                                       False)[0]
    return call


def cudnn_native_gqa(q, k, v, lens=None):
    """The ragged cuDNN op handed fewer K/V heads (no repeat): does it do GQA itself?"""
    B, Hq, T, _ = q.shape
    cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32)
    flat = [x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (q, k, v)]
    out = torch.ops.aten._cudnn_attention_forward(*flat, None, cu, cu, T, T, True, 0.0, True, False)[0]
    return out.view(B, T, Hq, D).transpose(1, 2)


def sdpa(backend):
    def run(q, k, v, lens=None):
        assert lens is None
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return run


KERNELS = {"varlen": ragged(_varlen_call), "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
           "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
           "cudnn_ragged": ragged(_cudnn_ragged_call)}


def guanaco_like(B: int, T: int, seed: int = 0) -> list[list[int]]:
    """Rows of T tokens filled with examples of 64..1500 tokens, the last one cut to fit."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        row, left = [], T
        while left:
            n = min(left, int(torch.randint(64, 1500, (1,), generator=g)))
            row.append(n)
            left -= n
        rows.append(row)
    return rows


def fwd_bwd(fn, q, k, v, g, lens=None):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v, lens)
    out.backward(g)
    return out


def time_ms(fn, q, k, v, g, lens=None, warmup=3, reps=10) -> float:
    for _ in range(warmup):
        fwd_bwd(fn, q, k, v, g, lens)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fwd_bwd(fn, q, k, v, g, lens)
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
    cases = [("one row", 1, 16384, H, None), ("one example per row", 8, 2048, H, None),
             ("packed", 8, 2048, H, guanaco_like(8, 2048)), ("GQA 32/8, one example per row", 8, 2048, 8, None),
             ("one row", 1, 32768, H, None)]
    for case, B, T, Hkv, lens in cases:
        q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        g = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        ref = fwd_bwd(KERNELS["varlen"], q, k, v, g, lens).detach()
        ref_grads = [x.grad.detach().clone() for x in (q, k, v)]
        pairs = sum(n * (n + 1) // 2 for row in (lens or [[T]] * B) for n in row)  # causal (q, k) pairs
        flops = 4 * pairs * H * D * 3.5  # fwd 2 matmuls (x2 flops), bwd 2.5x fwd
        kernels = dict(KERNELS, **({"cudnn_native_gqa": cudnn_native_gqa} if Hkv != H else {}))
        for name, fn in kernels.items():
            if lens is not None and name.startswith("sdpa"):
                continue  # no packing mask in these
            row = {"case": case, "kernel": name, "rows": B, "tokens_per_row": T, "kv_heads": Hkv}
            try:
                out = fwd_bwd(fn, q, k, v, g, lens).detach()
                errs = [(out - ref).abs().max().item() / ref.abs().max().item()]
                errs += [(x.grad - r).abs().max().item() / r.abs().max().item() for x, r in zip((q, k, v), ref_grads)]
                ms = time_ms(fn, q, k, v, g, lens)
                row.update(ms=round(ms, 2), tflops=round(flops / ms / 1e9, 1),
                           rel_err_out_dq_dk_dv=[f"{e:.1e}" for e in errs])
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
