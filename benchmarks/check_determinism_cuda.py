#!/usr/bin/env python
"""Check on CUDA that `deterministic: true` makes train.py bitwise reproducible, and what it costs.

    python benchmarks/check_determinism_cuda.py --out /tmp/determinism          # ~5 min on one H100/H200
    python benchmarks/check_determinism_cuda.py --out /tmp/determinism --quick  # fastest path only, ~2 min

Real train.py runs (subprocesses, as a user runs them): two Llama-2-7B layers with random weights
(`random:llama2-7b-2l`, NF4, bf16), the built-in SQL rows with a byte-level BPE tokenizer trained here in a
second (no download, no model package), 2 x 2 x 2048-token packed rows, 6 optimizer steps, a checkpoint
every 3, seed 7, lr 1e-3, LoRA dropout 0.05. Two paths, each with `--deterministic true`:

  default   train.py's defaults on a GPU: fused NF4+LoRA node, liger (if installed), flash varlen attention,
            torch's dropout, every layer recomputed, paged 8-bit AdamW
  fastest   plus CUDA graphs, seeded dropout, 1 of 2 layers recomputed, and base_fp8 where the GPU has FP8

Per path, each against the first run (`ref`), bitwise (every step's loss and grad norm from log.jsonl,
the final eval loss, and every tensor of final/adapter_model.safetensors):

  run vs run       the same command again
  eval on vs off   an eval pass every 2 steps (`ref` evaluates only at steps 0 and 6)
  kill + resume    SIGKILL as soon as checkpoint-3 is complete, then `--resume auto` to the end

Then the cost: benchmarks/bench.py (train.py's own step) with `--deterministic off,on` in one call, at the
2048-token setting of RESULTS.md (random:llama2-7b, 2 x 4 x 2048, CUDA graphs, 4 of 32 layers recomputed,
dropout 0): tokens/s and peak memory. `--control` adds the fastest path twice without the mode (how far two
runs drift without it). Every case prints one PASS/FAIL/SKIP line and never stops the others; the record
goes to OUT/determinism.json (and .txt). Exit 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT = 6, 3
COMMON = ["--datasets", "builtin:sql", "--max_seq_len", "2048", "--micro_batch_size", "2", "--grad_accum", "2",
          "--max_steps", str(STEPS), "--save_every", str(SAVE_AT), "--keep_last", "3", "--eval_every", "0",
          "--eval_batches", "2", "--sample_prompts", "0", "--tracker", "none", "--lr", "1e-3", "--warmup_steps", "1",
          "--seed", "7", "--lora_dropout", "0.05", "--compute_dtype", "bfloat16"]
lines: list[str] = []
CPU_SMOKE = False  # --cpu: this script's own plumbing on a CPU (random:tiny, short rows, no GPU-only levers)


def say(msg: str) -> None:
    print(msg, flush=True)
    lines.append(msg)


def build_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer of the built-in SQL rows (3k tokens, deterministic), saved as a folder
    train.py's --tokenizer reads; the Llama-2 [INST] format is used, as for any tokenizer without a template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [str(v) for f in ("train.jsonl", "test.jsonl")
             for line in (ROOT / "data" / "sql" / f).read_text().splitlines() for v in json.loads(line).values()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, show_progress=False,
                                                       special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))  # train.py wants a model folder's shape
    return folder


# --------------------------------------------------------------------------- runs and their records

def env() -> dict:
    extra = {"ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""} if CPU_SMOKE else {}
    return dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TRANSFORMERS_VERBOSITY="error", **extra)


def train(args, out: Path, extra: list[str], timeout: float) -> None:
    """One train.py run to the end; raises with the last lines of its log if it fails."""
    cmd = [sys.executable, "train.py", *args.base, *extra, "--output_dir", str(out)]
    with open(out.with_suffix(".log"), "a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py exited {proc.returncode}: {tail(out)}")


def train_killed(args, out: Path, extra: list[str], timeout: float) -> int:
    """train.py, SIGKILLed as soon as checkpoint-SAVE_AT is complete (its meta.json is written last);
    returns the newest step logged before the kill."""
    cmd = [sys.executable, "train.py", *args.base, *extra, "--output_dir", str(out)]
    marker = out / f"checkpoint-{SAVE_AT}" / "meta.json"
    with open(out.with_suffix(".log"), "a") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while not marker.exists():
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"checkpoint-{SAVE_AT} never appeared (exit {proc.returncode}): {tail(out)}")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if (out / "final").exists():
        raise RuntimeError("the run finished before the kill: nothing was interrupted")
    return max(record(out)["loss"], default=0)


def tail(out: Path, n: int = 3) -> str:
    text = out.with_suffix(".log").read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-n:])[-600:]


def record(out: Path) -> dict:
    """Per-step loss and grad norm (the last record of a step: a resumed run logs steps again), the final
    eval loss, and the final adapter's tensors as raw bytes."""
    from safetensors.torch import load_file

    loss, gnorm, evals = {}, {}, {}
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            loss[rec["step"]], gnorm[rec["step"]] = rec["loss"], rec["grad_norm"]
        elif rec["kind"] == "eval":
            evals[rec["step"]] = rec["eval_loss"]
    final = out / "final" / "adapter_model.safetensors"
    tensors = load_file(str(final)) if final.is_file() else {}
    return {"loss": loss, "grad_norm": gnorm, "eval_final": evals.get(STEPS), "adapter": tensors}


def compare(ref: dict, got: dict) -> tuple[bool, str]:
    """Bitwise equality of two `record`s, and a one-line account (what differs, and by how much)."""
    import torch

    problems = []
    for key in ("loss", "grad_norm"):
        if sorted(got[key]) != list(range(1, STEPS + 1)):
            problems.append(f"{key} logged for steps {sorted(got[key])}")
            continue
        bad = [s for s in ref[key] if ref[key][s] != got[key][s]]
        if bad:
            s = bad[0]
            rel = abs(got[key][s] - ref[key][s]) / max(abs(ref[key][s]), 1e-30)
            problems.append(f"{key} differs from step {s} ({ref[key][s]!r} vs {got[key][s]!r}, {rel:.1e} relative)")
    if ref["eval_final"] != got["eval_final"]:
        problems.append(f"final eval loss {ref['eval_final']!r} vs {got['eval_final']!r}")
    a, b = ref["adapter"], got["adapter"]
    if not a or a.keys() != b.keys():
        problems.append("adapter tensors missing or named differently")
    else:
        differ = [k for k in a if a[k].shape != b[k].shape or
                  not torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8))]
        if differ:
            rel = [((a[k].float() - b[k].float()).abs().max() / a[k].float().abs().max().clamp(min=1e-30)).item()
                   for k in differ if a[k].shape == b[k].shape]
            worst = max(rel, default=float("nan"))
            problems.append(f"{len(differ)} of {len(a)} adapter tensors differ (worst {worst:.1e} relative to max)")
    if problems:
        return False, "; ".join(problems)
    return True, (f"{STEPS} losses, {STEPS} grad norms, the final eval loss and {len(a)} adapter tensors "
                  "bitwise equal")


# --------------------------------------------------------------------------- the cases

def check_path(args, name: str, flags: list[str], results: list) -> bool:
    """The path's four cases; False if its first run failed (nothing could be compared)."""
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    mode = ["--deterministic", "true"]

    def case(label: str, fn) -> None:
        if time.time() - args.t0 > args.budget:
            results.append({"path": name, "case": label, "status": "SKIP", "detail": "time budget spent"})
            say(f"SKIP  {name:<8} {label:<15} time budget ({args.budget:.0f} s) spent")
            return
        t = time.time()
        try:
            ok, detail = fn()
            status = "PASS" if ok else "FAIL"
        except Exception as e:  # noqa: BLE001 - recorded, the other cases go on
            status, detail = "FAIL", f"{type(e).__name__}: {e}"
        results.append({"path": name, "case": label, "status": status, "detail": detail, "flags": flags,
                        "seconds": round(time.time() - t, 1)})
        say(f"{status}  {name:<8} {label:<15} {detail}  [{time.time() - t:.0f} s]")
        write(args, results)

    refs = {}

    def first():
        train(args, folder / "ref", flags + mode, args.run_timeout)
        refs["ref"] = record(folder / "ref")
        r = refs["ref"]
        return True, f"ran: loss {r['loss'][1]:.6f} -> {r['loss'][STEPS]:.6f}, grad norm {r['grad_norm'][STEPS]:.4f}"

    def same(label, extra):
        def fn():
            if "ref" not in refs:
                return False, "no reference run"
            train(args, folder / label, flags + mode + extra, args.run_timeout)
            return compare(refs["ref"], record(folder / label))
        return fn

    def kill_resume():
        if "ref" not in refs:
            return False, "no reference run"
        cut = folder / "kill_resume"
        at = train_killed(args, cut, flags + mode, args.run_timeout)
        train(args, cut, flags + mode + ["--resume", "auto"], args.run_timeout)
        ok, detail = compare(refs["ref"], record(cut))
        return ok, f"killed after checkpoint-{SAVE_AT} (last step logged {at}); " + detail

    case("first run", first)
    if "ref" not in refs:
        return False
    case("run vs run", same("again", []))
    case("eval on vs off", same("eval", ["--eval_every", "2"]))
    case("kill + resume", kill_resume)
    return True


def check_control(args, flags: list[str], results: list) -> None:
    """The fastest path twice without the mode: how far apart runs drift by default."""
    folder = args.out / "control"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for label in ("a", "b"):
            train(args, folder / label, flags, args.run_timeout)
        a, b = record(folder / "a"), record(folder / "b")
        rel = {s: abs(a["loss"][s] - b["loss"][s]) / abs(a["loss"][s]) for s in a["loss"]}
        same_bits = compare(a, b)[0]
        detail = ("bitwise equal even without the mode" if same_bits else
                  "relative loss difference by step: " + ", ".join(f"{s}: {r:.1e}" for s, r in sorted(rel.items())))
        results.append({"path": "fastest, no mode", "case": "run vs run", "status": "INFO", "detail": detail})
        say(f"INFO  control  run vs run without the mode: {detail}")
    except Exception as e:  # noqa: BLE001
        say(f"FAIL  control  {type(e).__name__}: {e}")
        results.append({"path": "fastest, no mode", "case": "run vs run", "status": "FAIL", "detail": str(e)})


def check_cost(args, results: list) -> None:
    """bench.py, --deterministic off,on in one call: tokens/s and peak memory."""
    out = args.out / "bench"
    cmd = [sys.executable, "benchmarks/bench.py", "--out", str(out), "--model", args.bench_model,
           "--max_seq_len", "2048", "--micro_batch_size", "2", "--grad_accum", "4", "--recompute_layers=4",
           "--cuda_graphs", "on", "--lora_dropout", "0", "--base_fp8", args.bench_fp8, "--deterministic", "off,on", "--warmup", "2",
           "--attn_backend", "varlen",  # both sides on flash (auto would take cuDNN's frontend off, flash on)
           "--steps", "3", "--no_plot", "--timeout", str(args.bench_timeout)]
    say("cost: " + " ".join(cmd[1:]))
    try:
        subprocess.run(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                       timeout=6 * args.bench_timeout)
        recs = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    except Exception as e:  # noqa: BLE001
        say(f"FAIL  cost     bench.py: {type(e).__name__}: {e}")
        results.append({"path": "cost", "case": "bench", "status": "FAIL", "detail": str(e)})
        return
    for fp8_on in sorted({r.get("base_fp8") for r in recs}):
        pair = {r.get("deterministic"): r for r in recs if r.get("base_fp8") == fp8_on}
        off, on = pair.get(False, {}), pair.get(True, {})
        if off.get("status") != "ok" or on.get("status") != "ok":
            detail = f"off: {off.get('status')} {off.get('error', '')}; on: {on.get('status')} {on.get('error', '')}"
            say(f"FAIL  cost     {'fp8' if fp8_on else 'bf16'}: {detail}")
            results.append({"path": "cost", "case": f"fp8 {fp8_on}", "status": "FAIL", "detail": detail})
            continue
        t0, t1 = off["tokens_per_s"], on["tokens_per_s"]
        m0, m1 = off["peak_allocated_gib"], on["peak_allocated_gib"]
        detail = (f"{args.bench_model} 2 x 4 x 2048, graphs, {'base_fp8' if fp8_on else 'bf16'}: {t0:,.0f} -> "
                  f"{t1:,.0f} tok/s ({t1 / t0 - 1:+.1%}), peak {m0:.2f} -> {m1:.2f} GiB ({off.get('card', '')})")
        say(f"COST  {detail}")
        results.append({"path": "cost", "case": f"fp8 {fp8_on}", "status": "INFO", "detail": detail,
                        "tokens_per_s": [t0, t1], "peak_allocated_gib": [m0, m1]})
    write(args, results)


def write(args, results: list) -> None:
    summary = {"device": args.device, "torch": args.torch_version, "liger": args.liger, "base_fp8": args.fp8,
               "model": args.model, "train_args": args.base, "steps": STEPS, "results": results,
               "failed": sum(r["status"] == "FAIL" for r in results), "seconds": round(time.time() - args.t0, 1)}
    (args.out / "determinism.json").write_text(json.dumps(summary, indent=1))
    (args.out / "determinism.txt").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the runs and determinism.json/.txt")
    p.add_argument("--quick", action="store_true", help="fastest path only; the cost measured on --model, not a 7B")
    p.add_argument("--model", default="random:llama2-7b-2l", help="the model of the train.py runs")
    p.add_argument("--tokenizer", default="", help="a tokenizer folder (default: a BPE one trained here)")
    p.add_argument("--bench_model", default="", help="bench.py's model (default random:llama2-7b; 'none' skips)")
    p.add_argument("--bench_fp8", default="off", help="bench.py's --base_fp8: off, on, or off,on")
    p.add_argument("--control", action="store_true", help="also run the fastest path twice without the mode")
    p.add_argument("--budget", type=float, default=400, help="seconds; cases and the cost after it are skipped")
    p.add_argument("--run_timeout", type=float, default=120, help="seconds per train.py run")
    p.add_argument("--bench_timeout", type=float, default=150, help="seconds per bench.py setting")
    p.add_argument("--cpu", action="store_true", help="smoke test of this script on a CPU (random:tiny, 256-token "
                   "rows, fp32, no graphs/liger/fp8, no cost)")
    args = p.parse_args()
    args.t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    global CPU_SMOKE
    CPU_SMOKE = args.cpu
    if args.cpu:
        args.device, args.liger, args.fp8, args.model, args.bench_model = "cpu", False, False, "random:tiny", "none"
    elif not torch.cuda.is_available():
        print("FAIL  no CUDA device: this check needs a GPU (--cpu: a smoke test of the script)")
        return 1
    else:
        args.device = torch.cuda.get_device_name(0)
        args.liger = importlib.util.find_spec("liger_kernel") is not None
        args.fp8 = torch.cuda.get_device_capability(0) >= (8, 9)
    args.torch_version = torch.__version__
    tok = Path(args.tokenizer) if args.tokenizer else build_tokenizer(args.out / "tokenizer")
    args.base = ["--model", args.model, "--tokenizer", str(tok.resolve()), *COMMON]
    if args.cpu:
        args.base += ["--max_seq_len", "256", "--compute_dtype", "float32"]  # the last of a repeated flag wins
    args.bench_model = args.bench_model or (args.model if args.quick else "random:llama2-7b")
    say(f"device {args.device}, torch {args.torch_version}, liger {'installed' if args.liger else 'absent'}, "
        f"base_fp8 {'on' if args.fp8 else 'off (no FP8 tensor cores)'} on the fastest path; model {args.model}")
    fastest = ["--cuda_graphs", str(not args.cpu).lower(), "--seeded_dropout", "true", "--recompute_layers", "1",
               "--base_fp8", str(args.fp8).lower()]
    results: list = []
    if not args.quick:
        check_path(args, "default", [], results)
    if not check_path(args, "fastest", fastest, results) and args.fp8:
        # its first run failed (base_fp8 refused, say): the rest of the fastest path without it
        check_path(args, "fast-bf16", fastest[:-1] + ["false"], results)
    if args.control:
        check_control(args, fastest, results)
    if args.bench_model != "none" and time.time() - args.t0 <= args.budget:
        check_cost(args, results)
    elif args.bench_model != "none":
        say(f"SKIP  cost     time budget ({args.budget:.0f} s) spent")
        results.append({"path": "cost", "case": "bench", "status": "SKIP", "detail": "time budget spent"})
    write(args, results)
    failed = sum(r["status"] == "FAIL" for r in results)
    say("all PASS" if not failed else f"{failed} FAIL")
    print(json.dumps({"failed": failed, "results": [{k: r[k] for k in ("path", "case", "status", "detail")}
                                                    for r in results]}, indent=1))
    write(args, results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
