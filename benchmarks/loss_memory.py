"""Memory and time of the training loss head (lm_head + cross-entropy, forward and backward) per `TokenLoss` kind.

    python benchmarks/loss_memory.py --vocab 262144 --hidden 640 --positions 2048 --softcap 30 --out /tmp/lossmem
    python benchmarks/loss_memory.py --device cuda --dtype bfloat16 --vocab 128256 --hidden 4096 --positions 16384

The head is the real `qlora.training.loss.TokenLoss` over a stand-in backbone that returns fixed hidden states
(every position supervised, a frozen bias-free lm_head, as in QLoRA), so the figures are those of the head alone:
what the loss adds on top of the model. Kinds: `plain` (lm_head + F.cross_entropy per chunk of positions, what
autograd keeps), `fused` (LinearCrossEntropy, the default in training) and `liger` (CUDA with liger-kernel only).

Memory, above what was allocated before the step (hidden states, targets, lm_head), each kind in a fresh process:
what the forward keeps for backward (alive while the model's own backward and recompute run, where a training
step's peak usually is), and the peak during the loss's forward and backward. On CUDA from
`torch.cuda.memory_allocated`/`max_memory_allocated`; on the CPU from resident memory (large tensors are their own
mappings there, freed back to the system). Time is the
median of `--reps` forward+backward passes after one warm-up. Writes `loss_memory.json` and `loss_memory.png`
under `--out`, and prints one line per kind.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
GIB = 2**30


def measure(kind: str, vocab: int, hidden: int, positions: int, softcap: float, dtype: str, device: str,
            reps: int, chunk_elements: int = 0) -> dict:
    """One kind's peak extra memory (GiB) and median step time (s), in this process."""
    import torch
    from torch import nn

    from qlora.training import loss as loss_mod
    from qlora.training.loss import TokenLoss

    if chunk_elements:  # the fp32 logits per chunk of `plain` and `fused` (default loss_mod.CE_CHUNK_ELEMENTS)
        loss_mod.CE_CHUNK_ELEMENTS = chunk_elements

    dt, dev = getattr(torch, dtype), torch.device(device)
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(1, positions, hidden, generator=g) * hidden ** -0.5).to(dev, dt).requires_grad_()
    y = torch.randint(0, vocab, (1, positions), generator=g).to(dev)

    class Backbone(nn.Module):
        def forward(self, **_):
            return SimpleNamespace(last_hidden_state=h * 1)  # a non-leaf, as a real backbone's output

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = Backbone(), nn.Linear(hidden, vocab, bias=False, device=dev, dtype=dt)
            self.lm_head.weight.requires_grad_(False)
            self.config = SimpleNamespace(final_logit_softcapping=softcap or None)

    torch.manual_seed(0)  # the same lm_head in every kind's process
    loss_model = TokenLoss(Model(), kind).train()
    sup = torch.arange(positions, device=dev)

    def step():
        loss = loss_model(input_ids=None, position_ids=None, targets=y, sup_index=sup)
        loss.backward()
        h.grad = None
        return loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def now() -> int:  # bytes live now: allocated (CUDA) or resident (CPU; large tensors are their own mappings)
        if dev.type == "cuda":
            return torch.cuda.memory_allocated()
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize()
        except OSError:  # not Linux
            import psutil  # noqa: PLC0415 (only where /proc is missing)

            return psutil.Process().memory_info().rss

    def peak_now() -> int:
        if dev.type == "cuda":
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = now()
    # the first step is the one measured for memory (and the warm-up for time)
    loss = loss_model(input_ids=None, position_ids=None, targets=y, sup_index=sup)
    sync()
    held = now() - base  # what the loss keeps for backward, alive while the model's own backward runs
    loss.backward()
    h.grad = None
    sync()
    peak = peak_now() - base
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return dict(kind=kind, vocab=vocab, hidden=hidden, positions=positions, softcap=softcap, dtype=dtype,
                device=str(dev), chunk_elements=loss_mod.CE_CHUNK_ELEMENTS, held_gib=held / GIB, peak_extra_gib=peak / GIB, seconds=statistics.median(times), loss=float(loss),
                logits_fp32_gib=positions * vocab * 4 / GIB)


def plot(records: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    names = [r["kind"] for r in records]
    for ax, key, label in ((axes[0], "held_gib", "kept from forward for backward (GiB)"),
                           (axes[1], "peak_extra_gib", "peak above inputs (GiB)"),
                           (axes[2], "seconds", "forward + backward (s)")):
        ax.bar(names, [r[key] for r in records], color="#4c72b0")
        ax.set_title(label, fontsize=10)
    r = records[0]
    fig.suptitle(f"loss head, {r['positions']} positions x vocab {r['vocab']}, hidden {r['hidden']}, "
                 f"{r['dtype']} on {r['device']}" + (f", soft-cap {r['softcap']:g}" if r["softcap"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--positions", type=int, default=2048, help="supervised positions in the micro-batch")
    ap.add_argument("--softcap", type=float, default=0.0, help="final-logit soft-cap (Gemma 2/3: 30); 0 for none")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kinds", default="plain,fused", help="comma-separated: plain, fused, liger (CUDA only)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk_elements", type=int, default=0,
                    help="fp32 logits per chunk of plain/fused (0: qlora.training.loss.CE_CHUNK_ELEMENTS)")
    ap.add_argument("--out", default=None, help="folder for loss_memory.json and loss_memory.png")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child measuring one kind
    a = ap.parse_args(argv)
    for key in ("vocab", "hidden", "positions", "reps"):
        if getattr(a, key) < 1:
            print(f"error: --{key} must be a positive integer, got {getattr(a, key)}", file=sys.stderr)
            return 2
    if a.chunk_elements < 0:
        print(f"error: --chunk_elements must be 0 (the default) or positive, got {a.chunk_elements}", file=sys.stderr)
        return 2
    if a.softcap < 0:
        print(f"error: --softcap must be 0 (none) or positive, got {a.softcap:g}", file=sys.stderr)
        return 2
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("plain", "fused", "liger")]
    if bad:
        print(f"error: --kinds: unknown kind {bad[0]!r}; choose from plain, fused, liger", file=sys.stderr)
        return 2
    if "liger" in kinds and not a.device.startswith("cuda"):
        print("error: --kinds liger runs on CUDA only: pass --device cuda or leave liger out", file=sys.stderr)
        return 2
    if a.one:
        print(json.dumps(measure(kinds[0], a.vocab, a.hidden, a.positions, a.softcap, a.dtype, a.device, a.reps,
                                 a.chunk_elements)))
        return 0
    records = []
    for kind in kinds:  # a fresh process per kind: peak RSS and the CUDA caching allocator start clean
        args = [sys.executable, __file__, "--one", "--kinds", kind, "--vocab", str(a.vocab), "--hidden", str(a.hidden),
                "--positions", str(a.positions), "--softcap", str(a.softcap), "--dtype", a.dtype, "--device", a.device,
                "--reps", str(a.reps), "--chunk_elements", str(a.chunk_elements)]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"error: kind {kind}: {(r.stderr.strip().splitlines() or ['no output'])[-1]}", file=sys.stderr)
            return 1
        rec = json.loads(r.stdout.strip().splitlines()[-1])
        records.append(rec)
        print(f"{kind:6s} chunk {rec['chunk_elements']:>10d} | kept for backward {rec['held_gib']:7.3f} GiB | peak above inputs {rec['peak_extra_gib']:7.3f} GiB | {rec['seconds']:.3f} s fwd+bwd | "
              f"loss {rec['loss']:.4f} | positions x vocab fp32 = {rec['logits_fp32_gib']:.2f} GiB")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "loss_memory.json").write_text(json.dumps(records, indent=1) + "\n")
        plot(records, out / "loss_memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
