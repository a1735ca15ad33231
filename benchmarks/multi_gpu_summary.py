"""The table of benchmarks/multi_gpu.sh: python3 benchmarks/multi_gpu_summary.py WORK_DIR OUT_DIR.

Reads each run's timestamped console log (NAME.txt), its log.jsonl (NAME.log.jsonl) and its nvidia-smi
samples (NAME.smi) from WORK_DIR; writes OUT_DIR/summary.json and OUT_DIR/summary.md: per run the
exit status, tokens/s (mean over the steps after warm-up), final loss, load times, memory per GPU;
then FSDP2 against DDP on 2 GPUs and the 1 -> 4 GPU speed-ups against the project's targets (TARGETS:
FSDP2 >= 0.9 of DDP on 2 GPUs, >= 3.7x DDP and >= 3.4x FSDP2 on 4 GPUs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ["ddp2", "fsdp2", "gpu1", "ddp4", "fsdp4", "fsdp4-70b", "fsdp4-70b-whole", "fsdp2-70b"]
TARGETS = {("fsdp2", "ddp2"): 0.9, ("ddp4", "gpu1"): 3.7, ("fsdp4", "gpu1"): 3.4}  # tokens/s ratio at least
# no target: the low-memory load must train the same model as the whole-model load (same losses)
PAIRS = [("fsdp4-70b", "fsdp4-70b-whole")]


def read_run(work: Path, name: str) -> dict | None:
    txt = work / f"{name}.txt"
    if not txt.is_file():
        return None
    lines = txt.read_text(errors="replace").splitlines()
    stamps = [(float(t), rest) for t, _, rest in (line.partition(" ") for line in lines) if _is_float(t)]
    start = next((t for t, rest in stamps if rest == "START"), None)

    def first(key: str) -> float | None:  # seconds from the launch to the first line starting with key
        return next((round(t - start, 1) for t, rest in stamps if rest.startswith(key)), None)

    exit_line = next((line for line in reversed(lines) if line.startswith("exit ")), "exit ?")
    rec = {"name": name, "exit": exit_line.split()[1], "load_s_model": first("model:") if start else None,
           "load_s_setup": first("memory:") if start else None,
           "errors": [rest[:300] for _, rest in stamps if rest.startswith("error")][:2]}
    log = work / f"{name}.log.jsonl"
    records = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    steps = [r for r in records if r.get("kind") == "train"]
    setup = next((r for r in records if r.get("kind") == "setup"), {})
    rec["losses"] = {r["step"]: r["loss"] for r in steps}
    warm = min(3, len(steps) // 2)  # the first steps carry allocator growth and kernel autotuning
    speeds = [r["tokens_per_s"] for r in steps if r["step"] > warm]
    rec["tokens_per_s"] = round(sum(speeds) / len(speeds)) if speeds else None
    rec["steps"] = len(steps)
    rec["final_loss"] = steps[-1]["loss"] if steps else None
    rec["peak_alloc_gib_rank0"] = max((r.get("peak_mem_gib") or 0 for r in steps), default=None)
    rec["setup_gib_per_rank"] = setup.get("allocated_gib_per_rank")
    rec["smi_peak_gib_per_gpu"] = _smi_peaks(work / f"{name}.smi")
    return rec


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _smi_peaks(path: Path) -> list[float] | None:
    if not path.is_file():
        return None
    peak: dict[int, float] = {}
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and _is_float(parts[1]):
            peak[int(parts[0])] = max(peak.get(int(parts[0]), 0.0), float(parts[1]) / 1024)
    return [round(peak[i], 2) for i in sorted(peak)] or None


def compare(runs: dict, a: str, b: str) -> dict | None:
    """a against b: tokens/s ratio and the largest loss difference over their common steps."""
    if not (runs.get(a) and runs.get(b) and runs[a]["tokens_per_s"] and runs[b]["tokens_per_s"]):
        return None
    common = sorted(set(runs[a]["losses"]) & set(runs[b]["losses"]))
    diff = max((abs(runs[a]["losses"][s] - runs[b]["losses"][s]) for s in common), default=None)
    ratio = runs[a]["tokens_per_s"] / runs[b]["tokens_per_s"]
    target = TARGETS.get((a, b))
    return {"runs": f"{a} / {b}", "tokens_per_s_ratio": round(ratio, 3), "target": target,
            "meets_target": None if target is None else ratio >= target,
            "max_abs_loss_diff": None if diff is None else round(diff, 4), "common_steps": len(common)}


def markdown(runs: dict, comparisons: list, skipped: list[str]) -> str:
    def fmt(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, list):
            return ", ".join(f"{x:.2f}" for x in v)
        return f"{v:,}" if isinstance(v, int) else f"{v:.2f}" if isinstance(v, float) else str(v)

    out = ["| run | exit | steps | tokens/s | final loss | load s (model / setup) | GiB/GPU after setup | "
           "peak alloc rank 0 | nvidia-smi peak GiB/GPU |", "|---|---|---:|---:|---:|---|---|---:|---|"]
    for name in ORDER:
        r = runs.get(name)
        if r:
            loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
            out.append(f"| {name} | {r['exit']} | {r['steps']} | {fmt(r['tokens_per_s'])} | {loss} | "
                       f"{fmt(r['load_s_model'])} / {fmt(r['load_s_setup'])} | {fmt(r['setup_gib_per_rank'])} | "
                       f"{fmt(r['peak_alloc_gib_rank0'])} | {fmt(r['smi_peak_gib_per_gpu'])} |")
    out += ["", "| comparison | tokens/s ratio | target | met | max abs loss diff (steps) |", "|---|---:|---:|---|---:|"]
    for c in comparisons:
        diff = "-" if c["max_abs_loss_diff"] is None else f"{c['max_abs_loss_diff']:.4f}"
        out.append(f"| {c['runs']} | {c['tokens_per_s_ratio']:.3f} | {fmt(c['target'])} | {fmt(c['meets_target'])} | "
                   f"{diff} ({c['common_steps']}) |")
    errors = [f"- {n}: {e}" for n, r in runs.items() for e in r["errors"]]
    return "\n".join(out + ([""] + ["skipped:"] + [f"- {s}" for s in skipped] if skipped else [])
                     + ([""] + ["errors:"] + errors if errors else [])) + "\n"


def main(work: str, out: str) -> None:
    work_dir, out_dir = Path(work), Path(out)
    runs = {n: r for n in ORDER if (r := read_run(work_dir, n))}
    comparisons = [c for a, b in [*TARGETS, *PAIRS] if (c := compare(runs, a, b))]
    skipped = (work_dir / "skipped.txt").read_text().splitlines() if (work_dir / "skipped.txt").is_file() else []
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps({"runs": runs, "comparisons": comparisons, "skipped": skipped},
                                                     indent=1))
    (out_dir / "summary.md").write_text(markdown(runs, comparisons, skipped))


if __name__ == "__main__":
    main(*sys.argv[1:3])
