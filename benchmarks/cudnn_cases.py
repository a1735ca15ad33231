"""One ragged cuDNN attention case per process (an illegal access poisons the CUDA context):
python3 cudnn_cases.py B T H HKV CU_DTYPE PACKED GRAPH"""
import sys, json, torch
sys.path.insert(0, ".")
from qlora.speed.attention import _varlen_call
B, T, H, HKV, cu_dtype, packed, graph = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6] == "1", sys.argv[7] == "1"
D = 128
torch.manual_seed(0)
lens = []
for _ in range(B):
    if packed:
        row, left = [], T
        while left:
            n = min(left, int(torch.randint(64, 1500, (1,)))); row.append(n); left -= n
        lens += row
    else:
        lens.append(T)
dense = cu_dtype == "dense"  # SDPA's dense cuDNN path on [B, H, T, D], one example per row
cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda", dtype=torch.int32 if dense else getattr(torch, cu_dtype))
N = B * T
q = torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k, v = (torch.randn(N, HKV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
g = torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16)
mx = max(lens)
def cudnn():
    if dense:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        q4, k4, v4 = (x.view(B, T, x.shape[1], D).transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=HKV != H)
        return o.transpose(1, 2).reshape(N, H, D)
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, mx, mx, True, 0.0, True, False)[0]
def flash():
    kk, vv = (x.repeat_interleave(H // HKV, 1) for x in (k, v)) if HKV != H else (k, v)
    return _varlen_call()(q, kk, vv, cu.int(), cu.int(), mx, mx)
res = {"B": B, "T": T, "H": H, "HKV": HKV, "cu": cu_dtype, "packed": packed, "graph": graph}
try:
    ref = flash(); ref.backward(g); rg = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v): x.grad = None
    out = cudnn(); out.backward(g); torch.cuda.synchronize()
    res["err"] = [f"{((a - b).abs().max() / b.abs().max()).item():.1e}" for a, b in zip([out] + [x.grad for x in (q, k, v)], [ref] + rg)]
    if graph:
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                for x in (q, k, v): x.grad = None
                cudnn().backward(g)
        torch.cuda.current_stream().wait_stream(s)
        G = torch.cuda.CUDAGraph()
        for x in (q, k, v): x.grad = None
        with torch.cuda.graph(G):
            o2 = cudnn(); o2.backward(g)
        G.replay(); torch.cuda.synchronize()
        res["graph_err"] = f"{((o2 - ref).abs().max() / ref.abs().max()).item():.1e}"
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for name, fn in (("flash", flash), ("cudnn", cudnn)):
        for _ in range(2): fn().backward(g)
        a.record()
        for _ in range(5): fn().backward(g)
        b.record(); b.synchronize(); res[name + "_ms"] = round(a.elapsed_time(b) / 5, 2)
except Exception as e:
    res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
print(json.dumps(res), flush=True)
