"""Training curves of a run: loss and eval loss, learning rate, tokens/s, from RUN_DIR/log.jsonl.

    python -m qlora.curves runs/default                 # -> runs/default/curves.png
    python -m qlora.curves runs/default --out /tmp/curves.png

log.jsonl is written by train.py: `{"kind": "train", "step", "loss", "lr", "tokens_per_s", ...}` per
logged step and `{"kind": "eval", "step", "eval_loss"}` per eval pass. A resumed run appends to the
same log; for a step logged twice the later line wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import ArgParser


def read_log(path: str | Path) -> tuple[dict[int, dict], dict[int, float]]:
    """({step: train record}, {step: eval loss}) from a log.jsonl; unparseable lines (a run killed
    mid-write) are skipped."""
    train, evals = {}, {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        if rec.get("kind") == "train":
            train[int(rec["step"])] = rec
        elif rec.get("kind") == "eval" and rec.get("eval_loss") is not None:
            evals[int(rec["step"])] = float(rec["eval_loss"])
    return dict(sorted(train.items())), dict(sorted(evals.items()))


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves to a PNG (default RUN_DIR/curves.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    log = run_dir / "log.jsonl" if run_dir.is_dir() else run_dir
    if not log.is_file():
        raise FileNotFoundError(f"{log} not found: pass a run directory written by train.py")
    train, evals = read_log(log)
    if not train and not evals:
        raise ValueError(f"{log} has no train or eval records")
    out = Path(out) if out else (log.parent / "curves.png")

    def series(key):
        pts = [(s, r[key]) for s, r in train.items() if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax = axes[0]
    steps, loss = series("loss")
    if steps:
        ax.plot(steps, loss, label="train loss", lw=1.2)
    if evals:
        ax.plot(list(evals), list(evals.values()), "o-", label="eval loss", lw=1.5)
    ax.set_ylabel("loss (token mean CE)")
    ax.set_title(f"{log.parent.name}: {len(train)} logged steps, {len(evals)} evals")
    ax.legend()
    ax.grid(alpha=0.3)
    for ax, key, label in ((axes[1], "lr", "learning rate"), (axes[2], "tokens_per_s", "tokens / s")):
        steps, ys = series(key)
        if steps:
            ax.plot(steps, ys, lw=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = ArgParser(prog="python -m qlora.curves", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a run directory holding log.jsonl (or the log file itself)")
    ap.add_argument("--out", help="PNG to write (default RUN_DIR/curves.png)")
    args = ap.parse_args(argv)
    try:
        path = plot(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"curves: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
