"""Shared pieces of benchmarks/bench.py (our loop) and benchmarks/baseline_trainer.py (the seed recipe):
synthetic data, the FLOPs model, memory probes, timing, environment info and result I/O.

Nothing here imports `datasets`, `qlora.data.examples`'s loaders or a tokenizer: the GPU image has no `datasets`,
and the guanaco length distribution ships precomputed in benchmarks/guanaco_lengths.json.

FLOPs model (the one MFU is computed with; stated again in benchmarks/RESULTS.md)
------------------------------------------------------------------------------------
QLoRA trains only the adapters, so the frozen 4-bit base needs no weight gradients. Per optimizer step:

    model_flops = T * (4*N + 6*N_lora) + 12 * L * d * P + S * 4 * d * V

    T      real (non-padding) tokens in the step
    N      weights of the decoder's matmuls (q,k,v,o,gate,up,down of every layer); embeddings and lm_head
           are excluded from N (lm_head is its own term below)
           4*N = forward 2N + backward input-gradient 2N (no weight gradient: the base is frozen)
    N_lora LoRA adapter weights: forward 2, input-gradient 2, weight-gradient 2 -> 6*N_lora
    P      causal attention (query, key) pairs, summed over documents: sum_doc n*(n+1)/2
           (packed rows use the real document lengths; padded rows the real row length)
           per pair and layer: forward QK^T 2d + AV 2d = 4d, backward 8d -> 12*L*d*P
           (per token that is 12*L*d*(n+1)/2 ~ 6*L*d*n, i.e. PaLM's 12*L*d*n halved for the causal mask)
    S      positions that enter the loss (ours: supervised response tokens; the seed recipe: every
           position, it trains on the full sequence); lm_head forward 2dV + input-gradient 2dV

Gradient-checkpoint recompute (a second forward: T*(2N + 2N_lora) + 4*L*d*P) is overhead, not useful
work: it is left out of model_flops (MFU) and counted in hardware_flops (HFU). Dequantising the NF4
weights, the padding the seed recipe computes and the logits it computes at non-loss positions are not
counted anywhere. MFU = model_flops / step time / peak, with peak = 989 TFLOP/s (H100 SXM dense bf16,
the datasheet) and, as `mfu_measured`, 790 TFLOP/s (an 8192^3 bf16 matmul measured on these H100s).
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LENGTHS_FILE = HERE / "guanaco_lengths.json"
PEAK_TFLOPS = 989.0  # H100 SXM dense bf16 datasheet peak
MEASURED_TFLOPS = 790.0  # 8192^3 bf16 matmul measured on this workplace's H100/H200
PAD_ID = 0  # pad for the random models (their config's pad_token_id); random tokens are drawn from >= 3
GIB = 2**30

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
               ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)


# --------------------------------------------------------------------------- settings

DEFAULTS = dict(model="random:llama2-7b", data="random", max_seq_len=512, micro_batch_size=2, grad_accum=2, packing=True,
                attn_backend="auto", recompute=True, recompute_layers=-1, fused_lora=True, kernels="auto", seeded_dropout=False, cuda_graphs=False,
                offload_recompute=False, rebuild_inputs=False, group_projections=False, mlp_tile_tokens=0, base_fp8=False, deterministic=False, ce_kernel=True, nf4_kernel=True, fp8_exclude=["down_proj"], lora_r=8, lora_alpha=64.0, lora_dropout=0.05, warmup=3, steps=5, profile=False, profile_sites=False,
                quant="nf4", compute_dtype="auto", optimizer="paged_adamw_8bit", lr=1e-4, seed=0)


def setting_label(s: dict) -> str:
    """Short human label of a setting (plot x-axis, log lines)."""
    parts = [s["data"], str(s["max_seq_len"]), f"{s['micro_batch_size']}x{s['grad_accum']}"]
    if not s["packing"]:
        parts.append("nopack")
    if s["attn_backend"] != "auto":
        parts.append(s["attn_backend"])
    if not s["recompute"]:
        parts.append("nockpt")
    elif s.get("recompute_layers", -1) >= 0:
        parts.append(f"ckpt{s['recompute_layers']}")
    if not s.get("fused_lora", True):
        parts.append("unfused")
    if s.get("kernels", "auto") != "auto":
        parts.append(f"k-{s['kernels']}")
    parts += [short for key, short in (("seeded_dropout", "seeded_dropout"), ("cuda_graphs", "cuda_graphs"),
                                       ("offload_recompute", "offload_recompute"), ("rebuild_inputs", "rebuild_inputs"), ("group_projections", "grouped"),
                                       ("deterministic", "deterministic")) if s.get(key)]
    if not s.get("recompute_attention", True):
        parts.append("attn_kept")
    if not s.get("ce_kernel", True):
        parts.append("ce_torch")
    if not s.get("nf4_kernel", True):
        parts.append("nf4_bnb")
    if s.get("mlp_tile_tokens"):
        parts.append(f"mlp_tiles{s['mlp_tile_tokens']}")
    if s.get("base_fp8"):
        parts.append("base_fp8" + "".join(f"-no-{m}" for m in s.get("fp8_exclude", [])))
    if s["lora_r"] != 8:
        parts.append(f"r{s['lora_r']}")
    if s["lora_dropout"] != 0.05:
        parts.append(f"do{s['lora_dropout']:g}")
    if s.get("optimizer", "paged_adamw_8bit") != "paged_adamw_8bit":
        parts.append(s["optimizer"])
    return " ".join(parts)


# --------------------------------------------------------------------------- synthetic data

def guanaco_lengths() -> list[tuple[int, int]]:
    """[(total tokens, supervised tokens)] per example of guanaco-llama2-1k (see the JSON's header)."""
    data = json.loads(LENGTHS_FILE.read_text())
    return [(int(t), int(s)) for t, s in data["lengths"]]


def synth_examples(data: str, max_seq_len: int, n_min: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """Examples as (token ids, number of prompt tokens).

    Prompt tokens are drawn from [3, vocab/2), response tokens from [vocab/2, vocab), so a response token
    count can be read off the ids alone (`ids >= vocab // 2`), also inside HF's collator.
    `random`: n_min full rows of max_seq_len tokens; a 1-token prompt (position 0 is never predicted
    anyway), all the rest supervised.
    `guanaco`: the real guanaco-llama2-1k (total, supervised) lengths, examples longer than
    max_seq_len dropped (as the project's `overlong: drop`), the prompt first, then the response; the
    whole set repeated (shuffled) until there are at least n_min examples.
    """
    rng = random.Random(seed)
    if data == "random":
        shapes = [(max_seq_len, 1)] * n_min
    elif data == "guanaco":
        kept = [(t, t - s) for t, s in guanaco_lengths() if t <= max_seq_len and 0 < s < t]
        if not kept:
            raise ValueError(f"no guanaco example fits in {max_seq_len} tokens")
        shapes = []
        while len(shapes) < n_min or not shapes:
            block = list(kept)
            rng.shuffle(block)
            shapes += block
    else:
        raise ValueError(f"unknown --data {data!r}: random or guanaco")
    half = vocab // 2
    return [([rng.randrange(3, half) for _ in range(p)] + [rng.randrange(half, vocab) for _ in range(t - p)], p)
            for t, p in shapes]


def make_guanaco_lengths(parquet: str | Path, out: Path = LENGTHS_FILE) -> dict:
    """Recompute benchmarks/guanaco_lengths.json (needs `datasets` and the embedded SmolLM2 tokenizer).

    The project's own path: `qlora.data.examples.load_datasets` (guanaco formatter -> chat template -> `encode`,
    response-only labels) with the project's tokenizer, all 1000 rows (no eval hold-out, nothing dropped).
    """
    import hashlib

    from qlora.config import load_config
    from qlora.data.examples import load_datasets
    from qlora.model.base import load_tokenizer

    parquet = Path(parquet)
    cfg = load_config([])
    tok = load_tokenizer(cfg)
    train, _, stats = load_datasets([str(parquet)], tok, 10**9, "drop", 0.0, 0)
    data = {
        "source": f"{parquet.name} (mlabonne/guanaco-llama2-1k), sha256 "
                  f"{hashlib.sha256(parquet.read_bytes()).hexdigest()}",
        "tokenizer": "embedded SmolLM2-135M-Instruct (qlora.model.base.load_tokenizer(load_config([]))) with its chat "
                     "template and default system prompt; the Llama-2 tokenizer is not available offline",
        "how": "qlora.data.examples.load_datasets(guanaco formatter, max_len unlimited, eval_fraction 0): per example "
               "[total tokens, supervised tokens] (supervised = assistant response + its EOS)",
        "rows": stats.rows,
        "lengths": [[len(e.input_ids), e.n_supervised] for e in train],
    }
    out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    return data


# --------------------------------------------------------------------------- FLOPs

def matmul_params(config) -> dict:
    """Shape numbers of a Llama config for the FLOPs model."""
    d, L, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    N = L * (d * q + 2 * d * kv + q * d + 3 * d * ff)
    return {"N": N, "L": L, "d_attn": q, "d": d, "V": config.vocab_size}


def step_flops(shape: dict, n_lora: int, tokens: float, pairs: float, loss_positions: float, recompute: float) -> tuple:
    """(model_flops, hardware_flops) of work for the given counts (see the module docstring); `recompute` is
    the fraction of layers that recompute (True = all)."""
    N, L, da, d, V = shape["N"], shape["L"], shape["d_attn"], shape["d"], shape["V"]
    model = tokens * (4 * N + 6 * n_lora) + 12 * L * da * pairs + loss_positions * 4 * d * V
    redo = float(recompute) * (tokens * (2 * N + 2 * n_lora) + 4 * L * da * pairs)
    return float(model), float(model + redo)


def causal_pairs(lengths) -> int:
    return int(sum(n * (n + 1) // 2 for n in lengths))


# --------------------------------------------------------------------------- memory and timing

class Probe:
    """Memory readings: the CUDA caching allocator on GPU; on CPU the process's max RSS (coarse)."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def allocated(self) -> float:
        self.sync()
        if self.cuda:
            return self.torch.cuda.memory_allocated(self.device) / GIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def reset_peak(self):
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> tuple[float, float]:
        self.sync()
        if self.cuda:
            return (self.torch.cuda.max_memory_allocated(self.device) / GIB,
                    self.torch.cuda.max_memory_reserved(self.device) / GIB)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return rss, rss

    def device_used(self) -> float:
        """Whole-device memory in use (all processes, CUDA context, bitsandbytes' paged/managed memory)."""
        if not self.cuda:
            return 0.0
        free, total = self.torch.cuda.mem_get_info(self.device)
        return (total - free) / GIB


def gpu_time_ms(fn, iters: int = 20, warm: int = 3) -> float:
    """Mean milliseconds of `fn()` on the current CUDA stream over `iters` calls after `warm` untimed ones
    (CUDA events; for the kernel probes)."""
    import torch

    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def tensor_gib(tensors) -> float:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total / GIB


def optimizer_state_gib(optimizer) -> float:
    """Bytes of the optimizer's state tensors (bitsandbytes' paged state lives in CUDA managed memory,
    outside torch's allocator, so it is in this number but not in memory_allocated)."""
    try:
        return tensor_gib(v for st in optimizer.state.values() for v in st.values() if hasattr(v, "untyped_storage"))
    except Exception:  # noqa: BLE001 -- exotic storages: the number is informational
        return -1.0


def describe_optimizer(opt) -> str:
    opt = getattr(opt, "optimizer", opt)  # accelerate's wrapper
    args = getattr(opt, "args", None)
    bits = getattr(args, "optim_bits", None) if args is not None else None
    extra = f" optim_bits={bits} is_paged={getattr(opt, 'is_paged', None)}" if bits is not None else ""
    return f"{type(opt).__module__}.{type(opt).__name__}{extra}"


def summarise(rec: dict, step_ends: list[float], per_step: list[dict], warmup: int, ckpt: float,
              shape: dict, n_lora: int) -> dict:
    """Fill throughput, step time, FLOPs and MFU fields of `rec` from per-step end times and counts.

    step_ends[0] is the time just before step 1 (after model load), step_ends[k] the synced end of step k;
    timing covers steps warmup+1 .. end (data collation, host syncs and all)."""
    timed = per_step[warmup:]
    dt = step_ends[-1] - step_ends[warmup]
    step_times = [b - a for a, b in zip(step_ends[warmup:-1], step_ends[warmup + 1:])]
    tot = {k: sum(s[k] for s in timed) for k in ("tokens", "supervised", "response", "pairs", "loss_positions",
                                                 "capacity")}
    model, hw = step_flops(shape, n_lora, tot["tokens"], tot["pairs"], tot["loss_positions"], ckpt)
    rec.update(
        timed_steps=len(timed), timed_s=dt, step_time_s=dt / max(1, len(timed)),
        step_time_min_s=min(step_times) if step_times else 0.0, step_time_max_s=max(step_times) if step_times else 0.0,
        tokens_per_step=tot["tokens"] / max(1, len(timed)), padding_fraction=1 - tot["tokens"] / max(1, tot["capacity"]),
        tokens_per_s=tot["tokens"] / dt, supervised_tokens_per_s=tot["supervised"] / dt,
        response_tokens_per_s=tot["response"] / dt,
        model_tflops_per_step=model / max(1, len(timed)) / 1e12, achieved_tflops=model / dt / 1e12,
        mfu=model / dt / (PEAK_TFLOPS * 1e12), mfu_measured=model / dt / (MEASURED_TFLOPS * 1e12),
        hfu=hw / dt / (PEAK_TFLOPS * 1e12), n_matmul_params=shape["N"], n_lora_params=n_lora,
    )
    return rec


def memory_fields(rec: dict, base: float, after_setup: float, after_first_step: float, peak: float,
                  reserved: float) -> dict:
    rec.update(base_weights_gib=base, after_setup_gib=after_setup, after_first_step_gib=after_first_step,
               lora_optimizer_gib=after_first_step - base, activations_gib=peak - after_first_step,
               peak_allocated_gib=peak, peak_reserved_gib=reserved)
    return rec


# --------------------------------------------------------------------------- environment

def env_info(device) -> dict:
    import importlib.metadata as md

    import torch

    info = {"python": platform.python_version(), "host_cpu": platform.machine()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "triton"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(card=torch.cuda.get_device_name(device), card_memory_gib=round(p.total_memory / GIB, 1),
                    cuda=torch.version.cuda, sms=p.multi_processor_count)
    else:
        info.update(card="cpu", card_memory_gib=0.0, cuda=None)
    info["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    return info


def pick_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and os.environ.get("BENCH_CPU", "") != "1" else "cpu")


# --------------------------------------------------------------------------- profile

# GPU kernel name -> op class (first match wins); names from cuBLAS/CUTLASS, bitsandbytes, flash
# attention, liger/triton and torch's own kernels
OP_CLASSES = (
    ("nf4_dequant", ("dequantize", "kdequant")),
    ("attention", ("flash", "fmha", "attention", "varlen")),
    ("optimizer", ("optimizer", "adam", "kpercentile")),
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90_", "sm80_", "cublas", "matmul", "splitk")),
    ("norm_rope_swiglu", ("rms_norm", "rope", "swiglu", "silu", "rsqrt")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "softmax")),
    ("reduce", ("reduce", "norm_kernel", "sum_kernel")),
    ("copy_cast", ("copy", "cast", "fill", "memcpy", "memset", "cat", "index")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "triton")),
)


def op_class(name: str) -> str:
    low = name.lower()
    return next((cls for cls, keys in OP_CLASSES if any(k in low for k in keys)), "other")


class profiler:
    """Context manager: torch.profiler over the block when `on` (CPU + CUDA activity), else nothing."""

    def __init__(self, on: bool, device, sites: bool = False):
        self.on, self.prof, self.sites = on, None, sites
        self.cuda = getattr(device, "type", str(device)) == "cuda"

    def __enter__(self):
        if not self.on:
            return None
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # `sites`: shapes and Python stacks too, for `op_sites` (slower on the host: busy share is then lower)
        self.prof = profile(activities=acts, record_shapes=self.sites, with_stack=self.sites)
        return self.prof.__enter__()

    def __exit__(self, *exc):
        return self.prof.__exit__(*exc) if self.prof is not None else False


def profile_summary(prof, wall_s: float) -> dict:
    """GPU kernel time per op class (ms and share), kernel count, and GPU busy time (union of kernel
    intervals) against the step's wall time: busy << wall means the step waits on the host."""
    per, count, spans, names = {}, 0, [], {}
    for ev in prof.events():
        if getattr(ev, "device_type", None) is None or str(ev.device_type).split(".")[-1] != "CUDA":
            continue
        dur = ev.time_range.elapsed_us()
        per[op_class(ev.name)] = per.get(op_class(ev.name), 0.0) + dur
        count += 1
        n = names.setdefault(ev.name[:90], [0, 0.0])
        n[0], n[1] = n[0] + 1, n[1] + dur
        spans.append((ev.time_range.start, ev.time_range.end))
    busy, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            busy += b - max(a, end)
            end = b
    total = sum(per.values()) or 1.0
    return {"wall_ms": wall_s * 1e3, "gpu_busy_ms": busy / 1e3, "gpu_busy_share": busy / 1e3 / max(wall_s * 1e3, 1e-9),
            "kernels": count, "kernel_ms": {k: round(v / 1e3, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1])},
            "kernel_share": {k: round(v / total, 4) for k, v in sorted(per.items(), key=lambda kv: -kv[1])},
            "top_kernels": [[k, c, round(us / 1e3, 2), op_class(k)]  # name, launches, ms, class
                            for k, (c, us) in sorted(names.items(), key=lambda kv: -kv[1][1])[:25]]}


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::_scaled_mm", "aten::bmm", "aten::matmul", "aten::linear")
OWN_CODE = ("qlora/", "transformers/", "liger_kernel/", "peft/", "train.py", "bench.py", "cudnn/")


def op_sites(prof, top: int = 30) -> list:
    """The non-GEMM ops by GPU time of the kernels they launch themselves, grouped by op, input shapes and the
    nearest frames of model or project code (from the profiler's event tree): [op, calls, ms, shapes, frames].
    Ops of autograd's own backward have no Python frames; their shapes say which tensors they touch."""
    sites = {}
    for e in prof.events():
        if not str(getattr(e, "device_type", "CPU")).endswith("CPU") or e.name in GEMM_OPS:
            continue
        us = getattr(e, "self_device_time_total", 0)
        if us <= 0:
            continue
        frames, q = [], e.cpu_parent
        while q is not None and len(frames) < 3:
            if any(k in q.name for k in OWN_CODE):
                frames.append(q.name.split("site-packages/")[-1])
            q = q.cpu_parent
        key = (e.name.split("site-packages/")[-1], str(e.input_shapes)[:140], tuple(frames))
        n = sites.setdefault(key, [0, 0.0])
        n[0], n[1] = n[0] + 1, n[1] + us
    rows = [[k[0], c, round(us / 1e3, 2), k[1], list(k[2])] for k, (c, us) in sites.items()]
    return sorted(rows, key=lambda r: -r[2])[:top]


# --------------------------------------------------------------------------- worker protocol

def worker_main(run, argv=None) -> int:
    """`--spec JSON --result FILE`: run one setting, write its record as JSON (also on OOM/errors)."""
    import argparse
    import traceback

    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True, help="JSON setting (see common.DEFAULTS)")
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    spec = {**DEFAULTS, **json.loads(a.spec)}
    rec = {"status": "ok", **spec}
    t0 = time.time()
    try:
        if spec["data"] not in ("random", "guanaco"):  # fail before the slow imports
            raise ValueError(f"unknown data {spec['data']!r}: random or guanaco")
        run(spec, rec)
    except BaseException as e:  # noqa: BLE001 -- recorded, then re-raised as an exit status
        oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
        rec["status"] = "oom" if oom else "error"
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        traceback.print_exc()
        try:
            import torch

            if torch.cuda.is_available():
                rec["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
                rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        except Exception:  # noqa: BLE001
            pass
    rec["wall_s"] = time.time() - t0
    Path(a.result).write_text(json.dumps(rec))
    return 0 if rec["status"] == "ok" else 3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
