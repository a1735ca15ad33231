"""Spider dev scoring: execution accuracy on the real SQLite databases, exact match, fail rate, a bootstrap
confidence interval and Spider's hardness breakdown, as one JSON report.

    python -m qlora.evaluate --adapter runs/spider/final --data ../shared/data/spider/dev.json:spider \\
        --out adapter_spider_dev.json

Every row whose database file exists is scored, unless its gold query fails (skipped and counted):
execution match compares the gold and the predicted result as multisets of rows, as lists when the gold
query has a top-level ORDER BY; each query runs read-only with a time limit (qlora.data.sqlscore.execute_db).
The report's top level holds the rates over the scored rows; `rows` holds one object per row of the file
(`db_id`, `question`, `gold`, `pred`, `correct`, `hardness`, `error`, ...), so anyone can re-score it:
`summarise(report["rows"])` gives the top level back. With schema-aware decoding (qlora.evaluation.schema_decode) the
rows hold the schema-aware predictions and their greedy ones (`greedy_pred`, `greedy_correct`, ...), and
`plain` is `summarise(plain_rows(report["rows"]))`, the greedy column.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..data import spider
from ..model.base import ModelLoadError
from ..cli import check_writable, dequantize_choice, publish_report
from ..config import ConfigError
from ..data.examples import BUILTIN, load_rows, parse_source
from ..data.formatters import DataError, detect_formatter
from ..data.sources import is_local
from .generation import prompt_ids
from .inference import load_for_inference
from .schema_decode import beam_generator, choose_predictions, needs_beams, plain_rows
from .shared_prefix import generate_grouped
from ..data.spider import (HARDNESS_LEVELS, answer_sql, database_path, hardness, prompt_schema, spider_prompt,
                           text_problem)
from ..data.sqlscore import execute_db, score_db_row

__all__ = ["spider_formatter", "load_spider", "bootstrap_ci", "summarise", "answer_sql", "score_predictions", "generate_all", "evaluate_spider"]


SPIDER_FORMATTERS = ("spider", "spider_linked")


def spider_formatter(data) -> str | None:
    """The Spider formatter a data source is scored with: the one it names (`dev.json:spider_linked`), or
    `spider` for a local file that names none and whose columns are Spider's (question, query, db_id), as
    training detects it; None for any other source."""
    src = parse_source(data)
    if src.formatter or src.path in BUILTIN or not is_local(src.path):
        return src.formatter if src.formatter in SPIDER_FORMATTERS else None
    rows = load_rows(src, src.split)
    return "spider" if detect_formatter(rows, src.path) == "spider" else None


def load_spider(path: str, limit: int = 0) -> list[dict]:
    """The rows of a Spider json file (a list of objects with `question`, `query`, `db_id`)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file {path} not found: check the path (relative paths are from {Path.cwd()})")
    try:
        rows = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"data file {path} is not valid JSON ({e}): Spider files are one JSON list") from None
    if not isinstance(rows, list) or not rows:
        raise DataError(f"data file {path}: expected a non-empty JSON list of Spider rows")
    for i, row in enumerate(rows):
        missing = [k for k in ("question", "query", "db_id") if not isinstance(row, dict) or row.get(k) is None]
        if missing:
            raise DataError(f"{path} row {i}: missing required field '{missing[0]}' (a Spider row needs "
                            "question, query and db_id)")
        problem = text_problem(row)
        if problem:
            raise DataError(f"{path} row {i}: {problem}")
    return rows[:limit] if limit else rows


def bootstrap_ci(values: list[bool], resamples: int = 2000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean of `values` (seeded, so a report is reproducible)."""
    import numpy as np

    if not values:
        return [0.0, 0.0]
    x = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [round(float(lo), 4), round(float(hi), 4)]


def summarise(rows: list[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """The report's top level from its `rows`: rates over the scored rows (`correct` not None)."""
    scored = [r for r in rows if r["correct"] is not None]
    n = len(scored)

    def rate(key, rs=scored):
        return sum(bool(r[key]) for r in rs) / len(rs) if rs else 0.0

    by_level = {}
    for level in HARDNESS_LEVELS:
        rs = [r for r in scored if r.get("hardness") == level]
        if rs:
            by_level[level] = {"n": len(rs), "execution_accuracy": rate("correct", rs), "exact_match": rate("exact", rs)}
    return {
        "execution_accuracy": rate("correct"),
        "execution_accuracy_ci95": bootstrap_ci([bool(r["correct"]) for r in scored], resamples, seed),
        "n_scored": n,
        "exact_match": rate("exact"),
        "pred_error_rate": sum(r["error"] is not None for r in scored) / n if n else 0.0,
        "n_rows": len(rows),
        "skipped_missing_database": sum(r.get("skipped") == "database missing" for r in rows),
        "skipped_gold_failed": sum(r.get("skipped") == "gold query failed" for r in rows),
        "by_hardness": by_level,
    }


def prepare_rows(rows: list[dict], source: str, timeout_s: float = 5.0) -> tuple[list[dict], dict]:
    """One report row per input row, and the gold results of the scorable ones (index -> result rows)."""
    out, gold = [], {}
    for i, row in enumerate(rows):
        path = database_path(source, row["db_id"])
        rec = {"index": i, "db_id": row["db_id"], "question": row["question"], "gold": row["query"],
               "pred": None, "correct": None, "exact": None, "error": None,
               "hardness": hardness(row["sql"]) if isinstance(row.get("sql"), dict) else None}
        if not path.is_file():
            rec["skipped"] = "database missing"
        else:
            result, err = execute_db(path, row["query"], timeout_s)
            if err is not None:
                rec.update(skipped="gold query failed", gold_error=err)
            else:
                gold[i] = result
        out.append(rec)
    return out, gold


def score_predictions(recs: list[dict], gold: dict, texts: dict, source: str, timeout_s: float = 5.0) -> None:
    """Fill `raw`, `pred`, `correct`, `exact` and `error` of the scorable rows from the model's `texts`."""
    for i, text in texts.items():
        rec = recs[i]
        pred = answer_sql(text)
        res = score_db_row(database_path(source, rec["db_id"]), rec["gold"], pred, timeout_s, gold_rows=gold[i])
        rec.update(raw=text, pred=pred, correct=res["exec_match"], exact=res["exact_match"], error=res["error"])


def generate_all(model, tokenizer, recs: list[dict], prompts: dict, batch_size: int, max_new_tokens: int,
                 generate_fn=None, progress: bool = True) -> dict:
    """Greedy answers for {row index: prompt ids}, grouped by database so each schema prefix is computed once
    (qlora.evaluation.shared_prefix.generate_grouped, or `generate_fn` with the same signature)."""
    from tqdm.auto import tqdm

    groups: dict[str, list[int]] = {}
    for i in prompts:
        groups.setdefault(recs[i]["db_id"], []).append(i)
    with tqdm(total=len(prompts), desc="generate", disable=not progress, dynamic_ncols=True, file=sys.stderr) as bar:
        texts = (generate_fn or generate_grouped)(model, tokenizer, {k: [prompts[i] for i in v] for k, v in groups.items()},
                                                  max_new_tokens, batch_size, bar.update)
    return {i: t for k, v in groups.items() for i, t in zip(v, texts[k])}


def evaluate_spider(model, tokenizer, cfg, source: str, limit: int = 0, batch_size: int = 8,
                    max_new_tokens: int = 128, sample_rows: int | None = None, timeout_s: float = 5.0,
                    generate_fn=None, progress=True, decoding: str = "greedy", num_beams: int = 4,
                    beam_fn=None, linked: bool = False) -> dict:
    """Generate for and score every scorable row of a Spider json file; returns the report (module doc).
    `sample_rows`, `linked`: the prompt as in training (default qlora.data.spider.SAMPLE_ROWS; `linked`: the
    `spider_linked` formatter's schema, qlora.data.schema_link). `decoding="schema"`: the rows and the
    top level are the schema-aware predictions (qlora.evaluation.schema_decode, `num_beams` beams from `beam_fn`,
    default qlora.evaluation.beam_search.beam_grouped), `plain` summarises the greedy ones."""
    rows = load_spider(source, limit)
    sample_rows = spider.SAMPLE_ROWS if sample_rows is None else sample_rows
    t0 = time.perf_counter()
    recs, gold = prepare_rows(rows, source, timeout_s)
    prompts = {i: prompt_ids(tokenizer, spider_prompt(prompt_schema(str(database_path(source, recs[i]["db_id"])),
                                                                    recs[i]["question"], sample_rows, linked),
                                                      recs[i]["question"]), cfg.system_prompt) for i in gold}
    t1 = time.perf_counter()
    texts = generate_all(model, tokenizer, recs, prompts, batch_size, max_new_tokens, generate_fn, progress)
    t2 = time.perf_counter()
    score_predictions(recs, gold, texts, source, timeout_s)
    t3 = time.perf_counter()
    lengths = sorted(len(p) for p in prompts.values())
    seconds = {"prepare": round(t1 - t0, 2), "generate": round(t2 - t1, 2), "score": round(t3 - t2, 2)}
    extra = {}
    if decoding == "schema":
        redo = needs_beams(recs, source)
        beams = generate_all(model, tokenizer, recs, {i: prompts[i] for i in redo}, batch_size, max_new_tokens,
                             beam_fn or beam_generator(num_beams), progress)
        t4 = time.perf_counter()
        choose_predictions(recs, gold, beams, source, timeout_s)
        seconds.update(beams=round(t4 - t3, 2), choose=round(time.perf_counter() - t4, 2))
        picked = [r["candidate"] for r in recs if r["correct"] is not None]
        extra = {"plain": summarise(plain_rows(recs)),
                 "candidates": {"greedy_valid": picked.count(0), "beam": sum(bool(k) for k in picked),
                                "none_valid": picked.count(None)}}
    return {**summarise(recs), **extra,
            "prompt_tokens": {"total": sum(lengths), "max": lengths[-1] if lengths else 0},
            "seconds": seconds, "rows": recs}


def summary_line(report: dict) -> str:
    """One line for the log: EX with its interval, EM, fail rate, counts."""
    lo, hi = report["execution_accuracy_ci95"]
    levels = " ".join(f"{k}={v['execution_accuracy']:.3f}/{v['n']}" for k, v in report["by_hardness"].items())
    return (f"spider: n_rows={report['n_rows']} scored={report['n_scored']} "
            f"skipped_missing_database={report['skipped_missing_database']} "
            f"skipped_gold_failed={report['skipped_gold_failed']} | execution_accuracy="
            f"{report['execution_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] exact_match={report['exact_match']:.3f} "
            f"pred_error_rate={report['pred_error_rate']:.3f} | {levels}" + _plain_part(report))


def _plain_part(report: dict) -> str:
    """The greedy column of a schema-aware report, for its summary line ('' for a greedy report)."""
    if "plain" not in report:
        return ""
    plain, c = report["plain"], report["candidates"]
    lo, hi = plain["execution_accuracy_ci95"]
    return (f" | decoding=schema (above); plain greedy: execution_accuracy={plain['execution_accuracy']:.3f} "
            f"[{lo:.3f}, {hi:.3f}] pred_error_rate={plain['pred_error_rate']:.3f} | greedy valid "
            f"{c['greedy_valid']}, a beam chosen {c['beam']}, none valid {c['none_valid']}")


def main_spider(args, formatter: str | None = None) -> int:
    """`python -m qlora.evaluate ... --data PATH.json:spider` (or `:spider_linked`, or a Spider file that names
    no formatter: `formatter`, from `spider_formatter`): load, score, print the summary, write --out; a line on
    stderr when the adapter was trained on the other Spider prompt. `args` is qlora.evaluation.evaluate's
    parsed command line."""
    src, sample_rows = parse_source(args.data), spider.SAMPLE_ROWS
    formatter = formatter or src.formatter
    source, linked = src.path, formatter == "spider_linked"
    try:
        if args.out:
            check_writable(args.out, "--out")
        load_spider(source, args.limit)  # every row usable, before a model is loaded
        dequantize = dequantize_choice(args.dequantize)
        model, tokenizer, cfg = load_for_inference(args.adapter, args.model, quant=args.quant,
                                                   compute_dtype=args.compute_dtype, dequantize=dequantize)
    except (ConfigError, ModelLoadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trained = trained_spider_prompts(cfg) if args.adapter else set()
    if trained and formatter not in trained:
        print(f"warning: the adapter was trained on {' and '.join(sorted(trained))} prompts and is scored on "
              f"{formatter} prompts; pass --data {source}:{sorted(trained)[0]} to score it as it was trained",
              file=sys.stderr)
    t0 = time.perf_counter()
    report = evaluate_spider(model, tokenizer, cfg, source, args.limit, args.batch_size, args.max_new_tokens,
                             sample_rows, progress=args.progress, decoding=args.decoding, num_beams=args.num_beams,
                             linked=linked)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    report = {"config": {"adapter": args.adapter, "model": cfg.model, "quant": cfg.quant, "dequantize": dequantize,
                         "compute_dtype": str(dtype).replace("torch.", ""), "data": args.data, "limit": args.limit,
                         "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                         "sample_rows": sample_rows, "prompt": formatter, "system_prompt": cfg.system_prompt,
                         "decoding": args.decoding,
                         **({"num_beams": args.num_beams} if args.decoding == "schema" else {}),
                         "machine": _machine(model)},
              "wall_seconds": round(time.perf_counter() - t0, 1), **report}
    publish_report(report, summary_line(report), args.out)
    return 0


def trained_spider_prompts(cfg) -> set[str]:
    """The Spider formatters (`spider`, `spider_linked`) among the training sources of an adapter's config."""
    out = set()
    for spec in cfg.datasets:
        try:
            formatter = spider_formatter(spec)
        except DataError:  # a training file since moved or changed: no warning rather than a failure
            continue
        if formatter:
            out.add(formatter)
    return out


def _machine(model) -> str:
    """What ran the evaluation: the GPU's name, or the CPU's and the thread count."""
    import platform

    import torch

    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"
