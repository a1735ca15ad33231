"""cuDNN frontend's torch attention op (PyPI `nvidia-cudnn-frontend`, `cudnn.sdpa_torch`) against torch's
flash kernels, on one GPU: errors of the output and of dq/dk/dv against flash, fwd+bwd time, and whether a
CUDA graph can capture the op's forward and backward (torch 2.11's own cuDNN SDPA cannot). First, qlora's
`cudnn` attention function (the frontend behind it) against its `sdpa` one with the same block-diagonal
causal mask: packed and whole rows, GQA, sliding windows of 4 and 1,024 keys.

Cases: dense causal rows [B, H, T, D] (one example per row) and packed rows in THD layout with cumulative
sequence lengths padded by empty sequences, as the captured step pads them.

    python benchmarks/cudnn_fe_probe.py --out probe.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qlora.speed import attention  # noqa: E402
from common import gpu_time_ms  # noqa: E402  (benchmarks/, the script's own folder)


def err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def lengths(total, n_docs, gen):
    cuts = torch.randperm(total - 1, generator=gen)[: n_docs - 1].sort().values + 1
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).to(torch.int32)


def case(B, T, H, HKV, D, packed, docs, cap, graph):
    import cudnn

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    N = B * T
    # HF layout: projections [B, T, H, D] viewed as [B, H, T, D] (strided), as the attention function gets them
    q0 = torch.randn(B, T, H, D, generator=gen).to(dev, torch.bfloat16)
    k0 = torch.randn(B, T, HKV, D, generator=gen).to(dev, torch.bfloat16)
    v0 = torch.randn(B, T, HKV, D, generator=gen).to(dev, torch.bfloat16)
    go = torch.randn(B, T, H, D, generator=gen).to(dev, torch.bfloat16)
    scale = D ** -0.5
    rec = {"B": B, "T": T, "H": H, "HKV": HKV, "D": D, "packed": packed, "graph": graph}
    if packed:
        parts = [lengths(T, docs, gen) + r * T for r in range(B)]
        cu = torch.cat([parts[0]] + [p[1:] for p in parts[1:]])
        n = cu.numel() - 1
        rec["seqs"] = n
        cu_pad = torch.full((max(cap, n) + 1,), N, dtype=torch.int32)
        cu_pad[: n + 1] = cu
        cu_d, cu_pad_d = cu.to(dev), cu_pad.to(dev)
        max_len = int((cu[1:] - cu[:-1]).max())
        flash = attention._varlen_call()

        def ref(q, k, v):
            return flash(q.reshape(N, H, D), k.reshape(N, HKV, D), v.reshape(N, HKV, D), cu_d, cu_d, max_len, max_len,
                         scale=scale).view(B, T, H, D)

        def ours(q, k, v):
            o, _ = cudnn.sdpa_torch(q.reshape(N, H, D), k.reshape(N, HKV, D), v.reshape(N, HKV, D), scale=scale,
                                    is_causal=True, cu_seqlens_q=cu_pad_d, cu_seqlens_kv=cu_pad_d,
                                    max_seqlen_q=T, max_seqlen_kv=T, return_lse=True)
            return o.view(B, T, H, D)
    else:
        def ref(q, k, v):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, scale=scale, enable_gqa=H != HKV).transpose(1, 2)

        def ours(q, k, v):
            o, _ = cudnn.sdpa_torch(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                                    is_causal=True, return_lse=True)
            return o.transpose(1, 2)

    def run(fn):
        q, k, v = (x.detach().clone().requires_grad_() for x in (q0, k0, v0))
        o = fn(q, k, v)
        o.backward(go)
        return o.detach(), q.grad, k.grad, v.grad

    r = run(ref)
    try:
        c = run(ours)
    except Exception as e:  # noqa: BLE001 -- recorded
        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return rec
    rec["err"] = ["%.1e" % err(a, b) for a, b in zip(c, r)]
    rec["flash_ms"] = round(gpu_time_ms(lambda: run(ref)), 3)
    rec["cudnn_fe_ms"] = round(gpu_time_ms(lambda: run(ours)), 3)
    if graph:
        q, k, v = (x.detach().clone().requires_grad_() for x in (q0, k0, v0))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                q.grad = k.grad = v.grad = None
                ours(q, k, v).backward(go)
        torch.cuda.current_stream().wait_stream(side)
        q.grad = k.grad = v.grad = None
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                o = ours(q, k, v)
                o.backward(go)
            q.grad.zero_(), k.grad.zero_(), v.grad.zero_()
            g.replay()
            torch.cuda.synchronize()
            rec["graph_err"] = ["%.1e" % err(a, b) for a, b in zip((o, q.grad, k.grad, v.grad), c)]
            rec["graph_ms"] = round(gpu_time_ms(g.replay), 3)
        except Exception as e:  # noqa: BLE001 -- recorded
            rec["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return rec


def glue(H, HKV, window, whole, D=128):
    """qlora's cudnn attention function (the frontend behind it) against its sdpa function with the same
    block-diagonal causal mask (and sliding window): output and input gradients."""
    from qlora.speed import attention as att

    dev, B, T = torch.device("cuda"), 2, 2048
    gen = torch.Generator().manual_seed(1)
    if whole:
        pos = torch.arange(T).repeat(B, 1)
    else:
        pos = torch.cat([torch.cat([torch.arange(n) for n in (300, 1000, T - 1300)]),
                         torch.cat([torch.arange(n) for n in (T - 5, 5)])]).view(B, T)
    q0, k0, v0, go = (torch.randn(B, h, T, D, generator=gen).to(dev, torch.bfloat16) for h in (H, HKV, HKV, H))
    go = go.transpose(1, 2)
    outs = {}
    for name in ("sdpa", "cudnn"):
        kw = att.packing_kwargs(pos, name, device=dev)
        kw.pop("use_cache")
        if window:
            kw["sliding_window"] = window
        q, k, v = (x.detach().clone().requires_grad_() for x in (q0, k0, v0))
        o, _ = att._FUNCTIONS[name](None, q, k, v, kw.pop("attention_mask", None), scaling=D ** -0.5, **kw)
        o.backward(go)
        outs[name] = (o.detach(), q.grad, k.grad, v.grad)
    return {"glue": {"H": H, "HKV": HKV, "D": D, "window": window, "whole_rows": whole},
            "err": ["%.1e" % err(a, b) for a, b in zip(outs["cudnn"], outs["sdpa"])]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="cudnn_fe_probe.jsonl")
    p.add_argument("--glue_only", action="store_true", help="only qlora's attention function against sdpa")
    a = p.parse_args()
    import cudnn

    head = {"cudnn_frontend": cudnn.__version__, "cudnn_backend": cudnn.backend_version(),
            "torch_cudnn": torch.backends.cudnn.version(), "torch": torch.__version__,
            "card": torch.cuda.get_device_name()}
    print(json.dumps(head), flush=True)
    cases = [  # B, T, H, HKV, D, packed, docs per row, cu capacity, graph
        (2, 2048, 32, 8, 128, False, 1, 0, True),
        (2, 2048, 32, 32, 128, False, 1, 0, True),
        (2, 2048, 32, 8, 128, True, 1, 16, True),
        (2, 2048, 32, 8, 128, True, 7, 16, True),
        (2, 2048, 32, 32, 128, True, 7, 32, True),
        (1, 32768, 32, 32, 128, False, 1, 0, False),
        (1, 32768, 32, 8, 128, True, 3, 16, True),
    ]
    with open(a.out, "w") as f:
        f.write(json.dumps(head) + "\n")

        def record(fn, args, key):  # one JSON line per case, its error recorded instead of stopping the probe
            try:
                rec = fn(*args)
            except Exception as e:  # noqa: BLE001
                rec = {key: args, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(json.dumps(rec), flush=True)
            f.write(json.dumps(rec) + "\n")
            torch.cuda.empty_cache()

        # heads of 128 (Llama, Mistral, Qwen 7-8B), 256 (Gemma 3, sliding window 1,024) and 64 (SmolLM2: 9 / 3)
        for g in [(32, 8, None, False), (32, 8, 4, False), (32, 8, 4, True), (32, 8, None, True), (8, 4, 1024, False),
                  (8, 4, 1024, False, 256), (8, 4, None, True, 256), (9, 3, None, False, 64)]:
            record(glue, g, "glue")
        for c in [] if a.glue_only else cases:
            record(case, c, "case")

if __name__ == "__main__":
    main()
