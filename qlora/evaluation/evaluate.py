"""Text-to-SQL evaluation of a base model, a base + LoRA adapter, or a merged model directory.

    python -m qlora.evaluate --adapter runs/default/final --limit 40
    python -m qlora.evaluate --model smollm2 --data /path/gretel.jsonl --out base.json
    python -m qlora.evaluate --model runs/default/merged          # written by python -m qlora.merge
    python -m qlora.evaluate --adapter runs/default/final --max_new_tokens 96 --batch_size 4
    python -m qlora.evaluate --adapter runs/spider/final --data ../shared/data/spider/dev.json:spider --decoding schema

For every held-out row (gretel schema: sql_prompt, sql_context, sql) the model answers the *training*
prompt (the `gretel_sql` formatter's user turn through the chat template, the run's system prompt)
greedily, batched and left-padded with a KV cache (qlora.evaluation.generation.generate_ids); answers are scored by
executing them in sqlite (qlora.data.sqlscore.score_rows). The same rows also give the teacher-forced,
response-only eval loss (the training loss: qlora.training.loss.TokenLoss over packed rows, sdpa attention).

A Spider source (`PATH.json:spider`) is scored on its real databases (qlora.evaluation.spider_eval). There
`--decoding schema` takes, per row, the first of the greedy answer and `--num_beams` beam-search answers
that runs on the row's database and uses only its table and column names (qlora.evaluation.schema_decode); the report
then holds both columns, schema-aware and plain greedy.

The model is loaded by qlora.evaluation.inference.load_for_inference: the base model and chat format come from the
adapter's config.yaml (or the merged directory's); a merged directory is loaded in full precision (quant
none) unless --quant says otherwise. On a CPU the 4-bit linears run dequantised by default (identical
logits in fp32, several times faster generation; --dequantize false keeps bitsandbytes' 4-bit matmuls).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time

import torch

from ..speed import attention
from ..config import Config, ConfigError
from ..data.errors import SkipRow
from ..data.examples import (BUILTIN, DataError, DataStats, Example, build_examples, load_rows, parse_source,
                             system_dropped_message, warn_once)
from ..data.formatters import FORMATTERS, detect_formatter
from .generation import generate_ids, prompt_ids
from ..cli import ArgParser, add_model_args, check_writable, count, dequantize_choice, flag, publish_report
from .inference import load_for_inference
from ..model.base import ModelLoadError
from ..training.loss import TokenLoss, mean_token_loss
from ..training.packing import eval_batches, model_inputs
from .spider_eval import main_spider, spider_formatter
from ..data.sqlscore import score_rows

__all__ = ["load_eval_rows", "eval_prompts", "eval_loss", "loss_examples", "evaluate", "main"]


# --------------------------------------------------------------------------- rows and prompts

def load_eval_rows(data: str = "builtin:sql", limit: int | None = None) -> tuple[list[dict], str]:
    """Held-out rows (the first `limit`, file order) and the formatter name. `builtin:sql` -> its test split;
    a file -> all of its rows (`path.jsonl:formatter` names a formatter, else it is detected)."""
    src = parse_source(data)
    rows = load_rows(src, "test" if src.path in BUILTIN else src.split)
    if limit:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"dataset {data}: no rows to evaluate")
    name = src.formatter or detect_formatter(rows, src.path)
    fmt = FORMATTERS[name]
    if getattr(fmt, "needs_source", False):  # reads files beside the data (spider: its databases)
        fmt = functools.partial(fmt, source=src.path)
    for i, row in enumerate(rows):  # every row usable, before a model is loaded
        try:
            fmt(row, where=_where(rows, i))
        except SkipRow as e:
            raise DataError(f"{_where(rows, i)}: {e}; Spider files are scored on their databases with "
                            f"--data PATH/dev.json:spider, the databases in PATH/database/") from None
        _gold(row, _where(rows, i))
    return rows, name


def _where(rows, i: int) -> str:
    return rows.where(i) if hasattr(rows, "where") else f"row {i}"


def _gold(row: dict, where: str = "row") -> tuple[str, str]:
    """(schema script, gold SQL) of a row of either text-to-SQL schema."""
    context = row.get("sql_context") if "sql_context" in row else row.get("schema")
    gold = row.get("sql") if "sql" in row else row.get("SQL")
    if not isinstance(context, str) or not isinstance(gold, str):
        raise DataError(f"{where}: needs the text fields sql_context and sql (gretel) or schema and SQL (bird) "
                        "to be scored")
    return context, gold


def eval_prompts(rows: list[dict], formatter: str, tokenizer, system_prompt: str = "") -> list[list[int]]:
    """Token ids of the training prompt of each row, ending where the answer starts."""
    fmt = FORMATTERS[formatter]
    out = []
    for i, row in enumerate(rows):
        msgs = fmt(row, where=_where(rows, i))
        if [m["role"] for m in msgs] != ["user", "assistant"]:
            raise DataError(f"{_where(rows, i)}: formatter {formatter} gave roles {[m['role'] for m in msgs]}; "
                            "evaluation needs one user turn and its answer")
        out.append(prompt_ids(tokenizer, msgs[0]["content"], system_prompt))
    return out


# --------------------------------------------------------------------------- metrics

def eval_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8, max_seq_len: int = 0,
              device=None) -> tuple[float, int]:
    """(token-mean response-only cross-entropy, supervised tokens): the training loss with no dropout
    (qlora.training.loss.mean_token_loss, as train.py's eval passes, without any term added in train.py's
    `micro_batch_loss`), over rows packed as in training (capacity max(max_seq_len, longest example), so
    no row is dropped)."""
    if not examples:
        return float("nan"), 0
    device = device or next(model.parameters()).device
    capacity = max(max_seq_len, max(len(e.input_ids) for e in examples))
    backend = attention.use_packed_attention(model, "sdpa")
    try:
        batches = eval_batches(examples, capacity, batch_size, pad_id, packing=True)
        token_loss = TokenLoss(model)
        return mean_token_loss(token_loss, batches, lambda b: token_loss(**model_inputs(b, backend, device)))
    finally:
        attention.use_default_attention(model, "sdpa")


def loss_examples(rows: list[dict], formatter: str, tokenizer, cfg: Config) -> list[Example]:
    """The rows encoded exactly as training encodes them (response-only labels); nothing is dropped
    for length (the capacity is raised instead). System text that the chat template leaves out is said once,
    as train.py says it."""
    src = parse_source(f"eval:{formatter}")
    stats = DataStats()
    out = build_examples(rows, src, tokenizer, 10 ** 9, "drop", stats, cfg.system_prompt)
    dropped = system_dropped_message(tokenizer, stats.system_from, "the text the eval loss scores")
    if dropped:
        warn_once(dropped)
    return out


def evaluate(model, tokenizer, cfg: Config, rows: list[dict], formatter: str = "gretel_sql",
             batch_size: int = 8, max_new_tokens: int = 128, progress: bool = True, generate_fn=None) -> dict:
    """Generate, score and compute eval loss on `rows`; returns the report (see module doc).

    `generate_fn(model, tokenizer, prompts, max_new_tokens, device) -> [text]` defaults to
    qlora.evaluation.generation.generate_ids (greedy); tests swap it."""
    from tqdm.auto import tqdm

    generate_fn = generate_fn or generate_ids
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    prompts = eval_prompts(rows, formatter, tokenizer, cfg.system_prompt)
    # longest prompts first: batches of similar length waste less on padding; answers go back in order
    order = sorted(range(len(rows)), key=lambda i: (-len(prompts[i]), i))
    preds: list[str | None] = [None] * len(rows)
    t0 = time.perf_counter()
    bar = tqdm(total=len(rows), desc="generate", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        texts = generate_fn(model, tokenizer, [prompts[i] for i in idx], max_new_tokens, device)
        for i, text in zip(idx, texts):
            preds[i] = text
        bar.update(len(idx))
    bar.close()
    gen_s = time.perf_counter() - t0

    scored_in = []
    for row, pred in zip(rows, preds):
        context, gold = _gold(row)
        scored_in.append({"id": row.get("id"), "sql_context": context, "sql": gold, "prediction": pred})
    score = score_rows(scored_in)

    t1 = time.perf_counter()
    examples = loss_examples(rows, formatter, tokenizer, cfg)
    loss, n_tok = eval_loss(model, examples, tokenizer.pad_token_id, batch_size, cfg.max_seq_len, device)
    loss_s = time.perf_counter() - t1

    predictions = []
    for row, inp, d in zip(rows, scored_in, score["details"]):
        predictions.append({
            "index": d["index"], "id": d["id"], "question": row.get("sql_prompt") or row.get("question"),
            "gold_sql": inp["sql"], "prediction": inp["prediction"], "pred_sql": d["pred_sql"],
            "gold_ok": d["gold_ok"], "pred_ok": d["pred_ok"], "exec_match": d["exec_match"],
            "exact_match": d["exact_match"], "error": d["error"], "gold_error": d["gold_error"]})
    return {
        "n": score["n"],
        "scored": score["n_scored"],
        "skipped_gold_failed": score["n_skipped_gold_failed"],
        "execution_accuracy": score["execution_accuracy"],
        "exact_match": score["exact_match"],
        "pred_error_rate": score["pred_error_rate"],
        "eval_loss": loss,
        "ppl": math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf"),
        "eval_loss_examples": len(examples),
        "eval_loss_tokens": n_tok,
        "seconds": {"generate": round(gen_s, 2), "eval_loss": round(loss_s, 2)},
        "predictions": predictions,
    }


# --------------------------------------------------------------------------- CLI

def summary_line(report: dict) -> str:
    return (f"n={report['n']} scored={report['scored']} skipped_gold_failed={report['skipped_gold_failed']} | "
            f"execution_accuracy={report['execution_accuracy']:.3f} exact_match={report['exact_match']:.3f} "
            f"pred_error_rate={report['pred_error_rate']:.3f} | eval_loss={report['eval_loss']:.4f} "
            f"ppl={report['ppl']:.2f}")


def main(argv=None) -> int:
    ap = ArgParser(prog="python -m qlora.evaluate", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--data", default="builtin:sql", help="builtin:sql (its test split) or PATH.jsonl[:formatter]")
    ap.add_argument("--limit", type=count(0), default=0, help="first N rows only (0 = all)")
    ap.add_argument("--batch_size", type=count(1), default=8)
    ap.add_argument("--max_new_tokens", type=count(1), default=128)
    ap.add_argument("--out", help="write the JSON report here")
    ap.add_argument("--progress", type=flag, default=True, help="progress bar on stderr (true/false)")
    ap.add_argument("--decoding", choices=("greedy", "schema"), default="greedy",
                    help="schema (Spider only): the first of greedy + beam answers that runs on the row's database "
                         "and uses only its names (qlora.evaluation.schema_decode); the report holds both columns")
    ap.add_argument("--num_beams", type=count(1), default=4, help="beams for --decoding schema")
    args = ap.parse_args(argv)
    if not (args.adapter or args.model):
        ap.error("give --adapter FOLDER or --model NAME")
    try:
        spider = spider_formatter(args.data)  # named, or detected from the columns as training does
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.decoding == "schema" and not spider:
        print(f"error: --decoding schema needs a Spider source (--data PATH/dev.json:spider), not {args.data}: "
              "it runs each candidate on the row's database; drop the flag for greedy decoding", file=sys.stderr)
        return 2
    if spider:  # real databases, own report (qlora.evaluation.spider_eval)
        return main_spider(args, spider)
    try:
        if args.out:
            check_writable(args.out, "--out")
        rows, formatter = load_eval_rows(args.data, args.limit or None)
        dequantize = dequantize_choice(args.dequantize)
        model, tokenizer, cfg = load_for_inference(args.adapter, args.model, quant=args.quant,
                                                   compute_dtype=args.compute_dtype, dequantize=dequantize)
        report = evaluate(model, tokenizer, cfg, rows, formatter, args.batch_size, args.max_new_tokens,
                          progress=args.progress)
    except (ConfigError, ModelLoadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    report = {"config": {"adapter": args.adapter, "model": cfg.model, "quant": cfg.quant, "dequantize": dequantize,
                         "compute_dtype": str(dtype).replace("torch.", ""), "data": args.data, "formatter": formatter,
                         "limit": args.limit, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                         "system_prompt": cfg.system_prompt, "decoding": "greedy"}, **report}
    publish_report(report, summary_line(report), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
