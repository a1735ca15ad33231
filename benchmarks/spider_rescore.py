"""Score a saved Spider report again from the model's raw answers, with the current SQL extraction and scorer
(no model, no generation): for reports written before a change to `qlora.data.spider.answer_sql` or the scorer.

    python benchmarks/spider_rescore.py base_spider_dev.json.gz --data ../shared/data/spider/dev.json \
        --out base_spider_dev.rescored.json

Prints the old and the new summary and how many predictions changed. The report must hold each row's `raw`
answer (qlora.evaluate writes it); `--data` defaults to the report's own `config.data` without its formatter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qlora.cli import check_writable, read_report  # noqa: E402
from qlora.config import ConfigError  # noqa: E402
from qlora.data.errors import DataError  # noqa: E402
from qlora.evaluation.spider_eval import load_spider, prepare_rows, score_predictions, summarise  # noqa: E402


def rescore(report: dict, source: str) -> tuple[dict, int]:
    """(the report with rows and summary scored again, how many predictions changed)."""
    old = report["rows"]
    rows = load_spider(source, int(report.get("config", {}).get("limit") or 0))
    if len(rows) != len(old):
        raise SystemExit(f"error: {source} has {len(rows)} rows, the report {len(old)}: pass the file it was scored on")
    recs, gold = prepare_rows(rows, source)
    texts = {i: old[i]["raw"] for i in gold if old[i].get("raw") is not None}
    score_predictions(recs, gold, texts, source)
    changed = sum(recs[i]["pred"] != old[i]["pred"] for i in texts)
    out = {k: v for k, v in report.items() if k not in ("rows", "plain", "candidates")}
    return {**out, **summarise(recs), "rescored_from_raw": True, "rows": recs}, changed


def line(r: dict) -> str:
    lo, hi = r["execution_accuracy_ci95"]
    return (f"exec {r['execution_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] exact {r['exact_match']:.3f} "
            f"pred errors {r['pred_error_rate']:.3f} (n {r['n_scored']})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", help="a qlora.evaluate Spider report (.json or .json.gz) with raw answers")
    p.add_argument("--data", default=None, help="the Spider json it was scored on (default: the report's config.data)")
    p.add_argument("--out", default=None, help="where to write the rescored report (.json)")
    args = p.parse_args(argv)
    if args.out:
        try:
            check_writable(args.out, "--out")
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
    try:
        report = read_report(Path(args.report))
    except (OSError, ValueError) as e:  # missing, unreadable, not gzip, not JSON
        raise SystemExit(f"error: {args.report} cannot be read as a qlora.evaluate report: {e}") from None
    rows = report.get("rows") if isinstance(report, dict) else None
    if not rows or not all(isinstance(r, dict) and "raw" in r for r in rows if r.get("correct") is not None):
        raise SystemExit(f"error: {args.report} has no report rows with raw answers: pass a Spider report that "
                         "qlora.evaluate wrote")
    if "plain" in report:
        raise SystemExit("error: a --decoding schema report: its rows are the chosen candidates, not one greedy answer; "
                         "rescore the greedy run instead")
    source = args.data or str(report.get("config", {}).get("data", "")).split(":")[0]
    if not source:
        raise SystemExit(f"error: {args.report} does not name the Spider json it was scored on: pass it with --data")
    try:
        new, changed = rescore(report, source)
    except DataError as e:
        raise SystemExit(f"error: {e} (pass the Spider json the report was scored on with --data)") from None
    print(f"before: {line(report)}\nafter:  {line(new)}\npredictions changed: {changed}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(new, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
