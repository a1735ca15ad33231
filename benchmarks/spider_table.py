"""The parity table of a benchmarks/spider_parity.sh run: per variant, every seed's Spider dev execution accuracy
(plain greedy and schema-aware), exact match and held-out loss, their mean and seed spread, and whether each
4-bit variant's mean lies within the seed spread of 16-bit LoRA.

    python benchmarks/spider_table.py /tmp/parity            # markdown on stdout
    python benchmarks/spider_table.py /tmp/parity --json t.json

Reads <variant>_s<seed>_spider_dev.json or .json.gz (qlora.evaluate reports, --decoding schema: the top level is the
schema-aware column, `plain` the greedy one), <variant>_s<seed>.log.jsonl (train.py's log: the last `eval`
record is the held-out loss) and base_spider_dev.json when present.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qlora.cli import read_report  # noqa: E402

NAME = re.compile(r"^(?P<variant>.+)_s(?P<seed>\d+)_spider_dev\.json(?:\.gz)?$")
ORDER = ("lora16", "nf4", "fastest", "fp8")
LABEL = {"lora16": "16-bit LoRA (quant none)", "nf4": "QLoRA NF4 + double quant, peft forward, eager",
         "fastest": "QLoRA NF4, fused node + CUDA graphs", "fp8": "QLoRA NF4, fused node + base_fp8"}


def seed_row(report: dict, log: Path | None) -> dict:
    """One seed's figures from its evaluate report (and train log, for the held-out loss)."""
    plain = report.get("plain", report)
    loss = None
    if log is not None and log.is_file():
        evals = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == "eval"]
        loss = evals[-1]["eval_loss"] if evals else None
    return {"exec_plain": plain["execution_accuracy"], "exec_plain_ci95": plain["execution_accuracy_ci95"],
            "exec_schema": report["execution_accuracy"] if "plain" in report else None,
            "exec_schema_ci95": report["execution_accuracy_ci95"] if "plain" in report else None,
            "exact_plain": plain["exact_match"], "exact_schema": report["exact_match"] if "plain" in report else None,
            "eval_loss": loss, "n_scored": report["n_scored"]}


def spread(values: list) -> dict:
    """mean, sample standard deviation, min and max of the values that are not None."""
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "min": min(v), "max": max(v), "n": len(v)}


def collect(folder: Path) -> dict:
    """{variant: {"seeds": {seed: row}, "summary": {metric: spread}}} plus "base" when scored."""
    out: dict = {}
    for path in sorted(folder.glob("*_spider_dev.json*")):
        m = NAME.match(path.name)
        if not m:
            continue
        report = read_report(path)
        log = folder / f"{m['variant']}_s{m['seed']}.log.jsonl"
        out.setdefault(m["variant"], {"seeds": {}})["seeds"][int(m["seed"])] = seed_row(report, log)
    for v in out.values():
        rows = list(v["seeds"].values())
        v["summary"] = {k: spread([r[k] for r in rows]) for k in ("exec_plain", "exec_schema", "exact_plain",
                                                                   "exact_schema", "eval_loss")}
    for base in (folder / "base_spider_dev.json", folder / "base_spider_dev.json.gz"):
        if base.is_file():
            out["base"] = {"seeds": {0: seed_row(read_report(base), None)}}
    return out


def parity(table: dict, metric: str = "exec_plain", reference: str = "lora16") -> dict:
    """Per 4-bit variant: its mean minus the reference's, and whether that lies within the seed spread (the larger
    of the two variants' max - min over seeds)."""
    ref = table.get(reference, {}).get("summary", {}).get(metric)
    out = {}
    if not ref or ref["mean"] is None:
        return out
    for name in [v for v in ORDER if v in table] + sorted(set(table) - set(ORDER)):
        v = table[name]
        if name in (reference, "base"):
            continue
        s = v["summary"][metric]
        if s["mean"] is None:
            continue
        width = max(ref["max"] - ref["min"], s["max"] - s["min"])
        diff = s["mean"] - ref["mean"]
        out[name] = {"difference": diff, "seed_spread": width, "within": abs(diff) <= width}
    return out


def _f(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(table: dict) -> str:
    lines = ["| variant | seeds | exec. acc. (greedy) | exec. acc. (schema-aware) | exact match (greedy) | "
             "held-out loss | per seed: greedy / schema-aware |", "|---|---:|---:|---:|---:|---:|---|"]
    names = [v for v in ORDER if v in table] + sorted(set(table) - set(ORDER) - {"base"})
    for name in names:
        s, seeds = table[name]["summary"], table[name]["seeds"]
        per = "; ".join(f"s{k}: {_f(r['exec_plain'])} / {_f(r['exec_schema'])}" for k, r in sorted(seeds.items()))
        cell = lambda m, d=3: f"{_f(s[m]['mean'], d)} ± {_f(s[m]['std'], d)}" if s[m]["mean"] is not None else "-"
        lines.append(f"| {LABEL.get(name, name)} | {s['exec_plain']['n']} | {cell('exec_plain')} | "
                     f"{cell('exec_schema')} | {cell('exact_plain')} | {cell('eval_loss', 4)} | {per} |")
    if "base" in table:
        r = table["base"]["seeds"][0]
        lines.append(f"| base model (no training) | - | {_f(r['exec_plain'])} | {_f(r['exec_schema'])} | "
                     f"{_f(r['exact_plain'])} | - | - |")
    lines.append("")
    lines.append("mean ± sample standard deviation over seeds. Parity with 16-bit LoRA (greedy execution accuracy; "
                 "within = |difference of means| <= the larger max - min over seeds):")
    for name, p in parity(table).items():
        lines.append(f"- {LABEL.get(name, name)}: {p['difference']:+.3f} vs seed spread {p['seed_spread']:.3f}: "
                     f"{'within' if p['within'] else 'NOT within'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="OUT of benchmarks/spider_parity.sh")
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder: pass the OUT folder of benchmarks/spider_parity.sh", file=sys.stderr)
        return 2
    table = collect(args.folder)
    if not table:
        print(f"error: no <variant>_s<seed>_spider_dev.json in {args.folder}", file=sys.stderr)
        return 2
    print(markdown(table))
    if args.json:
        args.json.write_text(json.dumps({"table": table, "parity": parity(table)}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
