#!/usr/bin/env python
"""Throughput, memory and MFU of the project's QLoRA training step over a grid of settings, optionally
side by side with the seed recipe (HF Trainer, benchmarks/baseline_trainer.py) on the same card.

    python benchmarks/bench.py --compare                                   # seed settings: 512 rows, 2 x 2
    python benchmarks/bench.py --compare --max_seq_len 2048 --micro_batch_size 8 --grad_accum 1
    python benchmarks/bench.py --compare --data guanaco --max_seq_len 2048 --micro_batch_size 2 --grad_accum 2
    python benchmarks/bench.py --max_seq_len 512,2048 --recompute on,off --attn_backend varlen,sdpa,flex --lora_r 8,64
    python benchmarks/bench.py --max_seq_len 2048 --micro_batch_size 4 --grad_accum 2 --recompute_layers=22 --profile
                                           # recompute 22 of 32 layers; per-op-class GPU profile of one step
    python benchmarks/bench.py --fused_lora off --kernels none        # the plain peft / transformers path
    python benchmarks/bench.py --tiny --compare --out /tmp/b              # CPU smoke test, seconds

Grid flags take comma-separated values; every combination is one setting. Each setting (and each
implementation of it) runs in a fresh subprocess, so peak memory and the allocator start clean and an
OOM or crash is recorded as such (status oom/error/timeout) instead of ending the sweep.

Our step is train.py's own: `train.train_step` is imported and timed (micro-batches from
`qlora.training.packing.Batches` -> `TokenLoss` -> backward of loss_sum / supervised tokens in the window -> clip
-> paged 8-bit AdamW step), under the accelerator of `train.make_accelerator` (bf16 autocast on CUDA),
with `qlora.speed.attention` packed attention. bench.py adds only timing, memory probes and profiling. The model is
`qlora.model.trainable`'s (base, then LoRA, then checkpointing, the steps of `load_model`, taken one by one so the
base weights can be measured before LoRA). Warm-up steps are excluded from timing.

Per setting: tokens/s (all real tokens, supervised tokens, response tokens), step time, peak allocated and
reserved VRAM (torch.cuda.max_memory_*, reset after the model and optimizer are set up), a memory
breakdown (base weights = allocated after the base model is loaded, before LoRA; LoRA + optimizer
state = allocated after the first optimizer step minus that; activations = peak minus both), MFU and HFU
(FLOPs model in benchmarks/common.py and RESULTS.md), versions and card. Outputs (appended, so several
invocations can share one --out): bench.jsonl (one record per run), bench.csv, bench.png.

Data (`--data`): `random` = full rows of random tokens; `guanaco` = the real length distribution of
guanaco-llama2-1k (benchmarks/guanaco_lengths.json: per example total and supervised token counts) with
random tokens. No data file, tokenizer or `datasets` is needed at run time.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
import common  # noqa: E402
from common import DEFAULTS, PAD_ID, log, setting_label  # noqa: E402

# every grid key is a Config key, spelled as train.py takes it; so is every other key of CONFIG_KEYS
GRID_KEYS = ("max_seq_len", "micro_batch_size", "grad_accum", "packing", "attn_backend", "recompute", "recompute_layers",
             "fused_lora", "kernels", "seeded_dropout", "cuda_graphs", "offload_recompute", "rebuild_inputs", "group_projections", "base_fp8",
             "recompute_attention", "deterministic", "lora_r", "lora_dropout", "mlp_tile_tokens", "optimizer", "ce_kernel",
             "nf4_kernel")
CONFIG_KEYS = GRID_KEYS + ("model", "quant", "compute_dtype", "lora_alpha", "fp8_exclude", "lr", "seed")
# bench.py's own spellings of these keys before it took Config's: one line naming the new flag
OLD_FLAGS = {"micro_batch": "micro_batch_size", "accum": "grad_accum", "attn": "attn_backend", "ckpt": "recompute",
             "ckpt_layers": "recompute_layers", "fused": "fused_lora", "seeded": "seeded_dropout", "graphs": "cuda_graphs",
             "offload": "offload_recompute", "fp8": "base_fp8"}
# the seed recipe has none of these
OURS_ONLY = ("packing", "attn_backend", "recompute_layers", "fused_lora", "kernels", "seeded_dropout", "cuda_graphs",
             "offload_recompute", "rebuild_inputs", "group_projections", "base_fp8", "deterministic", "mlp_tile_tokens",
             "recompute_attention", "ce_kernel", "nf4_kernel")
TINY = dict(model="random:tiny", quant="nf4", compute_dtype="float32", max_seq_len=64, micro_batch_size=2, grad_accum=2,
            warmup=2, steps=1)
CSV_FIELDS = ["timestamp", "tag", "impl", "status", "label", "data", "max_seq_len", "micro_batch_size", "grad_accum", "packing",
              "attn_backend", "recompute", "recompute_layers", "fused_lora", "kernels", "seeded_dropout", "cuda_graphs", "offload_recompute", "rebuild_inputs",
              "recompute_attention", "group_projections", "mlp_tile_tokens", "base_fp8", "deterministic", "ce_kernel", "nf4_kernel", "lora_r", "lora_dropout", "warmup", "timed_steps", "tokens_per_s",
              "supervised_tokens_per_s", "response_tokens_per_s", "step_time_s", "tokens_per_step",
              "padding_fraction", "peak_allocated_gib", "peak_reserved_gib", "base_weights_gib",
              "lora_optimizer_gib", "activations_gib", "device_used_end_gib", "mfu", "mfu_measured", "hfu",
              "achieved_tflops", "loss_first", "loss_last", "card", "torch", "transformers", "peft",
              "bitsandbytes", "accelerate", "model", "quant", "speedups", "error"]


# =========================================================================== our step (worker)

def run_ours(spec: dict, rec: dict) -> None:
    import torch
    from accelerate.utils import set_seed

    from qlora.speed import attention
    from qlora.training import determinism
    from qlora.speed.switches import Where, check_switches
    from qlora.config import load_config
    from qlora.data.examples import IGNORE, Example
    from qlora.model.base import load_base_model
    from qlora.model.trainable import count_parameters, describe_speedups, prepare_for_training
    from qlora.training.optim import lr_at, make_optimizer
    from qlora.training.packing import Batches
    from train import make_accelerator, prepare_objective, train_step  # the very step train.py runs

    total_steps = spec["warmup"] + spec["steps"]
    cfg = load_config([], **{k: spec[k] for k in CONFIG_KEYS}, max_steps=total_steps, warmup_steps=0, tracker="none")
    determinism.configure(cfg, cuda=torch.cuda.is_available())  # as train.py's setup: before CUDA starts
    accelerator, cfg = make_accelerator(cfg)  # as train.py: compute dtype resolved, bf16 autocast on CUDA
    device = accelerator.device
    check_switches(cfg, Where(device))  # as train.py's setup
    set_seed(cfg.seed)
    probe = common.Probe(device)
    rec.update(impl="ours", **common.env_info(device), mixed_precision=accelerator.mixed_precision)

    # --- model: qlora.model.trainable.load_model's steps one by one (base weights measured before LoRA)
    base = load_base_model(cfg, device)
    base_gib = probe.allocated()
    model = prepare_for_training(base, cfg, device)
    rec["speedups"] = describe_speedups(model)
    log(f"  ours: {rec['speedups']}")
    backend = attention.use_packed_attention(model, cfg.attn_backend, graphs=cfg.cuda_graphs)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    loss_model, optimizer, params, fwd_bwd = prepare_objective(cfg, accelerator, model, optimizer, PAD_ID, log)
    trainable, total = count_parameters(model)
    shape = common.matmul_params(model.config)
    vocab = model.config.vocab_size
    rec.update(attn_resolved=backend, trainable_params=trainable, total_params=total,
               compute_dtype=str(next(p for p in base.parameters() if p.dtype.is_floating_point).dtype))

    # --- data: synthetic examples -> the project's packing/collation
    n_rows = total_steps * cfg.grad_accum * cfg.micro_batch_size
    raw = common.synth_examples(spec["data"], cfg.max_seq_len, n_rows, vocab, cfg.seed)
    examples = [Example(ids, [IGNORE] * p + ids[p:]) for ids, p in raw]
    batches = Batches(examples, cfg.max_seq_len, cfg.micro_batch_size, PAD_ID, cfg.seed, cfg.packing)
    rec["packing_efficiency"] = batches.efficiency()
    half = vocab // 2

    def counts(batch) -> dict:
        pairs = 0
        for row, lens in zip(batch["input_ids"], batch["seq_lens"]):
            used, real = int((row != PAD_ID).sum()), []
            for n in lens:  # drop the padding tail (a pseudo-example in seq_lens)
                if sum(real) >= used:
                    break
                real.append(n)
            pairs += common.causal_pairs(real)
        return {"tokens": batch["n_tokens"], "capacity": batch["capacity"], "supervised": batch["n_supervised"],
                "loss_positions": batch["n_supervised"], "response": int((batch["targets"] >= half).sum()),
                "pairs": pairs}

    # --- loop: train.py's step
    probe.reset_peak()
    after_setup = probe.allocated()
    loss_model.train()
    ends, per_step, losses = [time.perf_counter()], [], []
    after_first = 0.0
    for step in range(total_steps + int(spec["profile"])):
        profiling = step == total_steps  # one extra step, profiled and left out of the timing
        if profiling:
            peak, reserved = probe.peaks()  # before the profiler's own allocations
            t_prof = time.perf_counter()
        with common.profiler(profiling, device, sites=spec["profile_sites"]) as prof:
            micro = [batches.next() for _ in range(cfg.grad_accum)]
            res = train_step(accelerator, loss_model, optimizer, params, micro, lr_at(step, cfg), cfg.max_grad_norm,
                             backend, fwd_bwd)
            if not res.stepped:
                raise FloatingPointError(f"non-finite loss {res.loss} or grad norm {res.grad_norm} at step {step + 1}")
            loss = res.loss
            probe.sync()
        if profiling:
            rec["profile"] = common.profile_summary(prof, time.perf_counter() - t_prof)
            if spec["profile_sites"]:
                try:
                    rec["profile"]["op_sites"] = common.op_sites(prof)
                except Exception as e:  # noqa: BLE001 - the profile's other figures still count
                    rec["profile"]["op_sites"] = [f"failed: {type(e).__name__}: {e}"]
            log("  profile: " + json.dumps(rec["profile"]))
            break
        probe.sync()
        ends.append(time.perf_counter())
        losses.append(loss)
        c = [counts(b) for b in micro]
        per_step.append({k: sum(x[k] for x in c) for k in c[0]})
        if step == 0:
            after_first = probe.allocated()
            rec["optimizer_state_gib"] = common.optimizer_state_gib(getattr(optimizer, "optimizer", optimizer))
            rec["optimizer_class"] = common.describe_optimizer(optimizer)
        log(f"  ours step {step + 1}/{total_steps}: loss {loss:.4f}, {ends[-1] - ends[-2]:.3f} s")
    if not spec["profile"]:
        peak, reserved = probe.peaks()
    common.memory_fields(rec, base_gib, after_setup, after_first, peak, reserved)
    rec.update(device_used_end_gib=probe.device_used(), loss_first=losses[0], loss_last=losses[-1])
    n_layers = model.config.num_hidden_layers
    ckpt_frac = (n_layers if cfg.recompute_layers < 0 else min(cfg.recompute_layers, n_layers)) / n_layers \
        if cfg.recompute else 0.0
    common.summarise(rec, ends, per_step, spec["warmup"], ckpt_frac, shape,
                     sum(p.numel() for p in params))


# =========================================================================== orchestration

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULTS["model"], help="cfg.model (default random:llama2-7b)")
    p.add_argument("--data", default="random", help="random, guanaco, or both: random,guanaco")
    p.add_argument("--max_seq_len", default=str(DEFAULTS["max_seq_len"]))
    p.add_argument("--micro_batch_size", default=str(DEFAULTS["micro_batch_size"]))
    p.add_argument("--grad_accum", default=str(DEFAULTS["grad_accum"]))
    p.add_argument("--packing", default="on", help="on,off")
    p.add_argument("--attn_backend", default="auto", help="auto,varlen,sdpa,cudnn,flex (ours only; the baseline is stock sdpa)")
    p.add_argument("--recompute", default="on", help="activation recompute on,off")
    p.add_argument("--recompute_layers", default="-1", help="decoder layers that recompute (-1 all), e.g. -1,16,8")
    p.add_argument("--fused_lora", default="on", help="fused NF4+LoRA autograd node on,off (ours only)")
    p.add_argument("--kernels", default="auto", help="auto,liger,none (ours only)")
    p.add_argument("--seeded_dropout", default="off", help="seeded LoRA dropout on,off (ours only)")
    p.add_argument("--cuda_graphs", default="off", help="CUDA graph per micro-batch on,off (ours only)")
    p.add_argument("--offload_recompute", default="off", help="recomputed layers' inputs in host memory on,off (ours only)")
    p.add_argument("--mlp_tile_tokens", default="0", help="MLPs in tiles of this many tokens when a micro-batch holds "
                   "more (ours only; 0 off), e.g. 0,16384")
    p.add_argument("--recompute_attention", default="on", help="recomputed layers run attention again on,off "
                   "(off keeps its output; ours only)")
    p.add_argument("--rebuild_inputs", default="off", help="layers that do not recompute rebuild their projections' "
                   "inputs in backward on,off (ours only)")
    p.add_argument("--group_projections", default="off", help="q/k/v and gate/up as one autograd node each on,off "
                   "(ours only)")
    p.add_argument("--ce_kernel", default="on", help="the loss head's softmax and gradient in one Triton kernel per "
                   "chunk on,off (ours only)")
    p.add_argument("--nf4_kernel", default="on", help="4-bit weights dequantised by the tiled Triton kernel on,off "
                   "(ours only)")
    p.add_argument("--base_fp8", default="off", help="FP8 GEMMs for the frozen base on,off (ours only; Ada/Hopper)")
    p.add_argument("--deterministic", default="off", help="deterministic kernels on,off (ours only; "
                   "qlora/training/determinism.py)")
    p.add_argument("--fp8_exclude", default="down_proj", help="projections that stay bf16 under --base_fp8 on "
                   "(comma-separated; '' = none)")
    p.add_argument("--profile", action="store_true",
                   help="profile one extra step after the timed ones (ours): GPU time per op class, GPU busy vs wall")
    p.add_argument("--profile_sites", action="store_true",
                   help="with --profile: also the non-GEMM ops by GPU time with their shapes and call sites (slower host)")
    p.add_argument("--optimizer", default=DEFAULTS["optimizer"], help="paged_adamw_8bit,adamw_8bit,adamw_8bit_flat,adamw "
                   "(the seed recipe takes the bitsandbytes and torch names)")
    p.add_argument("--lora_r", default=str(DEFAULTS["lora_r"]))
    p.add_argument("--lora_alpha", type=float, default=DEFAULTS["lora_alpha"])
    p.add_argument("--lora_dropout", default=str(DEFAULTS["lora_dropout"]))
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"], help="untimed optimizer steps")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="timed optimizer steps")
    p.add_argument("--quant", default=DEFAULTS["quant"])
    p.add_argument("--compute_dtype", default=DEFAULTS["compute_dtype"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--compare", action="store_true", help="also run the seed recipe (HF Trainer) per setting")
    p.add_argument("--baseline_only", action="store_true", help="run only the seed recipe")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: random:tiny, short rows, 2+1 steps, fp32")
    p.add_argument("--out", default="", help="folder for bench.jsonl/csv/png (default: a new folder in /tmp, so a "
                   "run never appends to the committed records; keep one as results/<YYYY-MM-DD>-<what>/)")
    p.add_argument("--tag", default="", help="free text stored with every record")
    p.add_argument("--timeout", type=float, default=600, help="seconds per subprocess before it is recorded as timeout")
    p.add_argument("--no_plot", action="store_true")
    p.add_argument("--plot_only", action="store_true", help="rebuild bench.csv and bench.png from --out's bench.jsonl")
    p.add_argument("--make_guanaco_lengths", metavar="PARQUET", default="",
                   help="recompute benchmarks/guanaco_lengths.json from guanaco-llama2-1k.parquet and exit")
    p.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--spec", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    for a in argv:
        old = a[2:].split("=", 1)[0].replace("-", "_") if a.startswith("--") else ""
        if old in OLD_FLAGS:
            p.error(f"--{old} was renamed to --{OLD_FLAGS[old]} (bench.py takes Config's own keys)")
    return p.parse_args(argv)


def _vals(text: str, kind, key: str):
    """The comma-separated values of one sweep option, as `kind`; a bad one stops bench.py with one line."""
    out = []
    for v in str(text).split(","):
        v = v.strip()
        if kind is bool:
            if v.lower() not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
                raise SystemExit(f"error: --{key}: expected on or off (a comma list to sweep), got {v!r}")
            out.append(v.lower() in ("on", "true", "1", "yes"))
        else:
            try:
                out.append(kind(v))
            except ValueError:
                raise SystemExit(f"error: --{key}: expected {kind.__name__} values (a comma list to sweep), got {v!r}") from None
    return out


def settings(args) -> list[dict]:
    base = dict(DEFAULTS, model=args.model, warmup=args.warmup, steps=args.steps, quant=args.quant,
                compute_dtype=args.compute_dtype, seed=args.seed, lora_alpha=args.lora_alpha,
                fp8_exclude=[v for v in args.fp8_exclude.split(",") if v],
                profile=args.profile or args.profile_sites, profile_sites=args.profile_sites)
    grid = {"data": _vals(args.data, str, "data"), "max_seq_len": _vals(args.max_seq_len, int, "max_seq_len"),
            "micro_batch_size": _vals(args.micro_batch_size, int, "micro_batch_size"), "grad_accum": _vals(args.grad_accum, int, "grad_accum"),
            "packing": _vals(args.packing, bool, "packing"), "attn_backend": _vals(args.attn_backend, str, "attn_backend"), "recompute": _vals(args.recompute, bool, "recompute"),
            "recompute_layers": _vals(args.recompute_layers, int, "recompute_layers"), "fused_lora": _vals(args.fused_lora, bool, "fused_lora"),
            "kernels": _vals(args.kernels, str, "kernels"), "seeded_dropout": _vals(args.seeded_dropout, bool, "seeded_dropout"), "cuda_graphs": _vals(args.cuda_graphs, bool, "cuda_graphs"),
            "offload_recompute": _vals(args.offload_recompute, bool, "offload_recompute"),
            "recompute_attention": _vals(args.recompute_attention, bool, "recompute_attention"),
            "rebuild_inputs": _vals(args.rebuild_inputs, bool, "rebuild_inputs"),
            "group_projections": _vals(args.group_projections, bool, "group_projections"), "base_fp8": _vals(args.base_fp8, bool, "base_fp8"), "ce_kernel": _vals(args.ce_kernel, bool, "ce_kernel"),
            "nf4_kernel": _vals(args.nf4_kernel, bool, "nf4_kernel"),
            "mlp_tile_tokens": _vals(args.mlp_tile_tokens, int, "mlp_tile_tokens"),
            "deterministic": _vals(args.deterministic, bool, "deterministic"),
            "lora_r": _vals(args.lora_r, int, "lora_r"), "lora_dropout": _vals(args.lora_dropout, float, "lora_dropout"),
            "optimizer": _vals(args.optimizer, str, "optimizer")}
    if args.tiny:
        explicit = {k for k in ("max_seq_len", "micro_batch_size", "grad_accum") if getattr(args, k) != str(DEFAULTS[k])}
        base.update({k: v for k, v in TINY.items() if k not in ("max_seq_len", "micro_batch_size", "grad_accum")
                     and not (k == "model" and args.model != DEFAULTS["model"])})
        for k in ("max_seq_len", "micro_batch_size", "grad_accum"):
            if k not in explicit:
                grid[k] = [TINY[k]]
        if args.warmup != DEFAULTS["warmup"] or args.steps != DEFAULTS["steps"]:
            base.update(warmup=args.warmup, steps=args.steps)
    keys = list(grid)
    return [dict(base, **dict(zip(keys, combo))) for combo in itertools.product(*(grid[k] for k in keys))]


def run_one(impl: str, spec: dict, args) -> dict:
    """One implementation of one setting in a fresh Python process; never raises."""
    out = Path(args.out)
    result = out / f".result-{os.getpid()}-{time.time_ns()}.tmp"
    script = HERE / ("bench.py" if impl == "ours" else "baseline_trainer.py")
    cmd = [sys.executable, str(script)] + (["--_worker", "ours"] if impl == "ours" else []) + \
        ["--spec", json.dumps(spec), "--result", str(result)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.tiny:
        env["BENCH_CPU"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.time()
    tail = ""
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=args.timeout)
        rc, tail = proc.returncode, proc.stdout[-3000:]
        status = None
    except subprocess.TimeoutExpired as e:
        rc, status = None, "timeout"
        tail = (e.stdout or b"")[-3000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-3000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
    rec = {}
    if result.is_file():
        rec = json.loads(result.read_text())
        result.unlink()
    if not rec:
        rec = {**spec, "impl": impl, "status": status or "crashed",
               "error": f"exit status {rc}" if status is None else f"no result within {args.timeout:.0f} s"}
    rec.update(impl=impl, returncode=rc, subprocess_s=time.time() - t0, tag=args.tag, label=setting_label(spec),
               timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if rec["status"] != "ok":
        rec["log_tail"] = tail
        log(tail)
    return rec


def write_csv(records: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in CSV_FIELDS})


def plot(records: list[dict], path: Path) -> bool:
    """Tokens/s and peak VRAM per setting, ours vs the seed recipe (repeated runs averaged)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return False
    groups: dict = {}  # (label, impl) -> records, in order; repeated runs are averaged, min-max as error bars
    for r in records:
        groups.setdefault((r.get("label", ""), r["impl"]), []).append(r)
    labels = list(dict.fromkeys(k[0] for k in groups))
    impls = [i for i in ("ours", "baseline") if any(k[1] == i for k in groups)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.6 * len(labels) + 3), 4.5))
    width = 0.8 / max(1, len(impls))
    colors = {"ours": "tab:blue", "baseline": "tab:gray"}
    names = {"ours": "ours (qlora loop)", "baseline": "seed recipe (HF Trainer)"}
    for j, impl in enumerate(impls):
        xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(labels))]
        tps, err, alloc, res, notes = [], [[], []], [], [], []
        for lab in labels:
            recs = groups.get((lab, impl), [])
            ok = [r for r in recs if r.get("status") == "ok"]
            vals = [r["tokens_per_s"] for r in ok]
            mean = sum(vals) / len(vals) if vals else 0.0
            tps.append(mean)
            err[0].append(mean - min(vals) if vals else 0)
            err[1].append(max(vals) - mean if vals else 0)
            alloc.append(max([r.get("peak_allocated_gib") or 0 for r in recs], default=0))
            res.append(max([r.get("peak_reserved_gib") or 0 for r in recs], default=0))
            notes.append("" if not recs else (f"{mean:,.0f}" + (f"\n(n={len(vals)})" if len(vals) > 1 else ""))
                         if vals else recs[-1].get("status", "?"))
        axes[0].bar(xs, tps, width, yerr=err, capsize=3, color=colors[impl], label=names[impl])
        axes[1].bar(xs, res, width, color=colors[impl], alpha=0.35)
        axes[1].bar(xs, alloc, width, color=colors[impl], label=names[impl])
        for x, t, note in zip(xs, tps, notes):
            axes[0].annotate(note, (x, t), ha="center", va="bottom", fontsize=7)
    for ax, title in zip(axes, ("tokens/s (real tokens, higher is better)",
                                "peak VRAM GiB (solid: allocated, light: reserved)")):
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=15, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    card = next((r.get("card") for r in records if r.get("card")), "")
    fig.suptitle(f"QLoRA step, {records[-1].get('model', '')} on {card}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        return common.worker_main(run_ours, ["--spec", args.spec, "--result", args.result])
    if args.make_guanaco_lengths:
        data = common.make_guanaco_lengths(args.make_guanaco_lengths)
        log(f"{len(data['lengths'])} examples written to {common.LENGTHS_FILE}")
        return 0
    if args.plot_only and not args.out:
        raise SystemExit("error: --plot_only needs --out FOLDER (the folder that holds bench.jsonl)")
    if not args.out:
        args.out = tempfile.mkdtemp(prefix="qlora-bench-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"[bench] records go to {out}")
    jsonl = out / "bench.jsonl"
    if args.plot_only:
        records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        write_csv(records, out / "bench.csv")
        return 0 if plot(records, out / "bench.png") else 1
    impls = ["baseline"] if args.baseline_only else (["ours", "baseline"] if args.compare else ["ours"])
    failed, baseline_done = 0, set()
    for spec in settings(args):
        for impl in impls:
            if impl == "baseline":  # it has no packing/attention choice: once per remaining setting
                key = json.dumps({k: v for k, v in spec.items() if k not in OURS_ONLY}, sort_keys=True)
                if key in baseline_done:
                    continue
                baseline_done.add(key)
            log(f"[bench] {impl}: {setting_label(spec)} ({spec['model']}, {spec['warmup']}+{spec['steps']} steps)")
            rec = run_one(impl, spec, args)
            failed += rec["status"] != "ok"
            with open(jsonl, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if rec["status"] == "ok":
                log(f"[bench] {impl}: {rec['tokens_per_s']:,.0f} tok/s ({rec['supervised_tokens_per_s']:,.0f} "
                    f"supervised), {rec['step_time_s']:.3f} s/step, peak {rec['peak_allocated_gib']:.2f} GiB "
                    f"alloc / {rec['peak_reserved_gib']:.2f} reserved, MFU {rec['mfu']:.1%}")
            else:
                log(f"[bench] {impl}: {rec['status']}: {rec.get('error', '')}")
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    write_csv(records, out / "bench.csv")
    if not args.no_plot:
        plot(records, out / "bench.png")
    log(f"[bench] {len(records)} records in {jsonl}; csv {out / 'bench.csv'}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
