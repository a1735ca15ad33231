"""Spider: the formatter on real rows and databases, the scorer against real SQLite files, the report
format, Spider's hardness levels and the bootstrap interval. Skips without ../shared/data/spider."""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from badinput import assert_one_error, run_cli
from conftest import SHARED, shared_file
from helpers import supervised_text

from qlora.cli import read_report
from qlora.data.examples import IGNORE, DataStats, build_examples, parse_source
from qlora.data.spider import compact_create, connect_ro, database_path, hardness, schema_text
from qlora.evaluation.spider_eval import answer_sql, bootstrap_ci, evaluate_spider, summarise
from qlora.data.sqlscore import collapse_whitespace, execute_db, score_db_row


def spider_file(name: str):
    return shared_file(f"spider/{name}")


def db(name: str):
    return shared_file(f"spider/database/{name}/{name}.sqlite")


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def subset(tmp_path, rows: list[dict], name="dev.json"):
    """A Spider json of `rows` beside a link to the real database folder (the layout the loader expects)."""
    (tmp_path / "database").symlink_to(SHARED / "spider" / "database", target_is_directory=True)
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


# --------------------------------------------------------------------------- schema and formatter

def test_compact_schema_is_the_same_schema():
    """Every dev database's compact CREATE statements build tables with the same columns, types and keys."""
    dev = json.loads(spider_file("dev.json").read_text())
    for db_id in sorted({r["db_id"] for r in dev}):
        path = database_path(spider_file("dev.json"), db_id)
        if not path.is_file():
            continue
        orig, copy = connect_ro(path), sqlite3.connect(":memory:")
        copy.executescript(schema_text(str(path)))
        tables = [n for (n,) in orig.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for t in tables:
            q = '"' + t + '"'
            assert copy.execute(f"PRAGMA table_info({q})").fetchall() == \
                orig.execute(f"PRAGMA table_info({q})").fetchall(), (db_id, t)
            assert copy.execute(f"PRAGMA foreign_key_list({q})").fetchall() == \
                orig.execute(f"PRAGMA foreign_key_list({q})").fetchall(), (db_id, t)


def test_compact_create_keeps_needed_quotes():
    sql = 'CREATE TABLE "a b" (\n"Order" int, -- note\n"x" varchar(20) DEFAULT \'y\', [c] text)'
    assert compact_create(sql) == 'CREATE TABLE "a b" ("Order" int, x varchar(20) DEFAULT \'y\', c text)'


def test_formatter_on_real_rows(tok):
    path = spider_file("train_spider.json")
    rows = json.loads(path.read_text())
    picked = [rows[0], rows[1000], rows[5000]]
    missing = next(r for r in rows if r["db_id"] == "baseball_1")
    stats = DataStats()
    exs = build_examples(picked + [missing], parse_source(f"{path}:spider"), tok, 2048, "drop", stats)
    assert len(exs) == 3 and stats.skipped == {"Spider database missing": 1} and "skipped 1" in stats.summary()
    for ex, row in zip(exs, picked):
        text = tok.decode(ex.input_ids)
        conn = connect_ro(database_path(path, row["db_id"]))
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            assert f"CREATE TABLE {name} (" in text or f'CREATE TABLE "{name}" (' in text
        assert f"Question: {row['question']}" in text
        # the SQL (whitespace runs collapsed) and the EOS closing it are the only supervised text
        assert supervised_text(tok, ex) == collapse_whitespace(row["query"]) + tok.eos_token
        sup = [t for t in ex.labels if t != IGNORE]
        assert sup.count(tok.eos_token_id) == 1 and sup[-1] == tok.eos_token_id and tok.bos_token_id not in sup
        # one BOS opens the example (SmolLM2's <|im_start|> also opens each of the 3 turns; none is added)
        assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[1] != tok.bos_token_id
        assert ex.input_ids.count(tok.bos_token_id) == ex.input_ids.count(tok.eos_token_id) == 3


def test_sample_rows_add_one_row_per_table():
    from qlora.data.spider import spider_messages

    path = spider_file("dev.json")
    row = json.loads(path.read_text())[0]
    plain = spider_messages(row, source=str(path), sample_rows=0)[0]["content"]
    with_rows = spider_messages(row, source=str(path), sample_rows=1)[0]["content"]
    lines = [line for line in with_rows.splitlines() if line.startswith("-- ")]
    conn = connect_ro(database_path(path, row["db_id"]))
    tables = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert len(lines) == sum(1 for t in tables if conn.execute(f'SELECT 1 FROM "{t}" LIMIT 1').fetchone())
    singer = conn.execute("SELECT * FROM singer LIMIT 1").fetchone()  # (1, 'Joe Sharp', 'Netherlands', ...)
    assert f"-- {singer[0]}, '{singer[1]}', '{singer[2]}'" in with_rows
    assert [x for x in with_rows.splitlines() if not x.startswith("-- ")] == plain.splitlines()


def test_overlong_prompts_are_dropped_and_counted(tok):
    path = spider_file("train_spider.json")
    rows = json.loads(path.read_text())[:40]
    stats = DataStats()
    exs = build_examples(rows, parse_source(f"{path}:spider"), tok, 300, "drop", stats)
    assert stats.dropped_overlong > 0 and len(exs) + stats.dropped_overlong == 40
    assert all(len(e.input_ids) <= 300 for e in exs)


# --------------------------------------------------------------------------- scoring on real databases

def test_scorer_right_wrong_failing_and_ordered():
    path = db("concert_singer")
    before = sha(path)
    gold = "SELECT count(*) FROM singer"
    right = score_db_row(path, gold, "select COUNT(Singer_ID) from SINGER")
    assert right["exec_match"] and not right["exact_match"] and right["error"] is None
    assert score_db_row(path, gold, "SELECT  count(*)  FROM singer;")["exact_match"]
    wrong = score_db_row(path, gold, "SELECT count(*) FROM stadium")  # 9 rows, not 6
    assert wrong["pred_ok"] and not wrong["exec_match"]
    failing = score_db_row(path, gold, "SELECT count(*) FROM singers")
    assert not failing["pred_ok"] and "no such table" in failing["error"]
    # ORDER BY in the gold: row order counts; without it the same rows in any order match
    by_age = "SELECT name FROM singer ORDER BY age DESC"
    assert not score_db_row(path, by_age, "SELECT name FROM singer ORDER BY age ASC")["exec_match"]
    assert score_db_row(path, by_age, "SELECT name FROM singer ORDER BY age DESC, name")["exec_match"]
    assert score_db_row(path, "SELECT name FROM singer", "SELECT name FROM singer ORDER BY age ASC")["exec_match"]
    # read-only: a write fails and the file is unchanged
    assert "readonly" in score_db_row(path, gold, "DELETE FROM singer")["error"]
    assert sha(path) == before


def test_runaway_query_times_out():
    path = db("concert_singer")
    # 6 singers, 12-way cross join: 2.2e9 rows, minutes of work, so only the time limit can end it
    rows, err = execute_db(path, "SELECT count(*) FROM singer a, singer b, singer c, singer d, singer e, "
                                 "singer f, singer g, singer h, singer i, singer j, singer k, singer l",
                           timeout_s=0.2)
    assert rows is None and "timeout" in err


# --------------------------------------------------------------------------- the report

def test_report_rows_and_counts(tmp_path, tok):
    dev = json.loads(spider_file("dev.json").read_text())
    rows = dev[:6] + [r for r in dev if r["db_id"] == "wta_1"][:2]
    rows.append({**dev[6], "query": "SELECT nope FROM singer"})  # a gold query that fails
    path = subset(tmp_path, rows)

    def answers(model, tokenizer, groups, max_new_tokens, batch_size, progress):
        """gold SQL for the even rows, a wrong query for the odd ones; found by the question in the prompt"""
        def answer(ids):
            i = next(i for i, r in enumerate(rows) if f"Question: {r['question']}" in tokenizer.decode(ids))
            if i % 2 == 0:
                return f"```sql\n{rows[i]['query']}\n```"
            return "SELECT nope FROM singer" if i == 5 else "SELECT Name FROM stadium"
        return {k: [answer(p) for p in v] for k, v in groups.items()}

    from qlora.config import load_config

    report = evaluate_spider(None, tok, load_config([]), str(path), batch_size=4, generate_fn=answers,
                             progress=False)
    assert report["n_rows"] == 9 and len(report["rows"]) == 9
    assert report["skipped_missing_database"] == 2 and report["skipped_gold_failed"] == 1
    assert report["n_scored"] == 6
    scored = [r for r in report["rows"] if r["correct"] is not None]
    assert [r["index"] for r in scored] == list(range(6))
    assert [r["correct"] for r in scored] == [True, False, True, False, True, False]
    assert report["execution_accuracy"] == sum(r["correct"] for r in scored) / len(scored) == 0.5
    assert report["exact_match"] == 0.5 and report["pred_error_rate"] == pytest.approx(1 / 6)
    assert "no such column" in scored[5]["error"] and scored[0]["pred"] == rows[0]["query"]
    for r in report["rows"]:
        assert {"db_id", "question", "gold", "pred", "correct", "hardness", "error"} <= set(r)
    # the report re-scores from its own rows, after a JSON round trip
    again = summarise(json.loads(json.dumps(report))["rows"])
    assert {k: again[k] for k in again} == {k: report[k] for k in again}
    lo, hi = report["execution_accuracy_ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


def committed_reports() -> list:
    """Every committed Spider dev report, as written (.json) or gzip-compressed (.json.gz)."""
    from conftest import ROOT

    return sorted((ROOT / "results").glob("**/*spider*dev*.json")) + sorted((ROOT / "results").glob("**/*spider*dev*.json.gz"))


def test_committed_reports_match_their_rows():
    reports = committed_reports()
    assert any(p.suffix == ".gz" for p in reports) or not reports
    if not reports:
        pytest.skip("no Spider reports committed")
    for path in reports:
        report = read_report(path)
        scored = [r for r in report["rows"] if r["correct"] is not None]
        assert report["n_scored"] == len(scored) >= 900, path
        assert report["execution_accuracy"] == pytest.approx(sum(r["correct"] for r in scored) / len(scored),
                                                             abs=1e-12), path


def test_committed_reports_rescore_on_the_real_databases():
    """Every 40th row of each committed report, re-run against the Spider database: the same verdict."""
    reports = committed_reports()
    if not reports:
        pytest.skip("no Spider reports committed")
    spider_file("dev.json")  # skips without ../shared
    checked = 0
    for path in reports:
        for r in read_report(path)["rows"][::40]:
            if r["correct"] is None:
                continue
            got = score_db_row(db(r["db_id"]), r["gold"], r["pred"])
            assert got["exec_match"] == r["correct"] and got["exact_match"] == r["exact"], (path.name, r["index"])
            checked += 1
    assert checked >= 20 * len(reports)



def test_committed_greedy_reports_hold_what_todays_extraction_takes_from_their_raw_answers():
    """The SQL taken from each stored raw answer by today's `answer_sql` is the stored prediction, for every row of
    every committed greedy report: a change to the extraction that would move a published figure fails here (then
    score the reports again with benchmarks/spider_rescore.py)."""
    reports = [p for p in committed_reports() if "plain" not in read_report(p)]
    if not reports:
        pytest.skip("no greedy Spider reports committed")
    checked = 0
    for path in reports:
        for r in read_report(path)["rows"]:
            if r.get("raw") is not None:
                assert answer_sql(r["raw"]) == r["pred"], (path.name, r["index"])
                checked += 1
    assert checked >= 900 * len(reports)


def test_rescore_takes_the_sql_again_from_raw_answers_and_summarises(tmp_path):
    """benchmarks/spider_rescore.py on a report of the first 6 dev rows whose stored predictions are stale: the SQL
    is taken again from the raw answers and scored on the databases, the summary follows the rows."""
    import sys

    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import spider_rescore

    source = str(spider_file("dev.json"))
    rows = json.loads(Path(source).read_text())[:6]
    raws = [f"```sql\n{rows[0]['query']}\n```", rows[1]["query"], "SELECT nothing FROM nowhere", "", rows[4]["query"],
            "Answer: " + rows[5]["query"]]
    stale = [{"index": i, "db_id": r["db_id"], "gold": r["query"], "raw": raw, "pred": "SELECT 1", "correct": False,
              "exact": False, "error": None} for i, (r, raw) in enumerate(zip(rows, raws))]
    report = {"config": {"data": f"{source}:spider", "limit": 6}, "rows": stale, **summarise(stale)}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    new, changed = spider_rescore.rescore(report, source)
    assert changed == 6 - (answer_sql("") == "SELECT 1")
    assert [r["correct"] for r in new["rows"]] == [True, True, False, False, True, True]
    assert new["execution_accuracy"] == pytest.approx(4 / 6) and new["rescored_from_raw"]
    out = tmp_path / "new.json"
    assert spider_rescore.main([str(path), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["execution_accuracy"] == pytest.approx(4 / 6)

def test_evaluate_cli_bad_spider_file(tmp_path):
    bad = tmp_path / "dev.json"
    bad.write_text(json.dumps([{"question": "q", "db_id": "x"}]))
    r = run_cli(["-m", "qlora.evaluate", "--model", "random:tiny", "--data", f"{bad}:spider"])
    assert_one_error(r, str(bad), "row 0", "query")


def test_evaluate_cli_detects_a_spider_file_without_the_suffix(tmp_path, capsys):
    """`--data dev.json` (no `:spider`) is scored on the databases as `--data dev.json:spider` is, as training
    detects the same file; it used to end in a SkipRow traceback (the formatter had no path to the databases)."""
    from qlora.evaluation.evaluate import main

    path = subset(tmp_path, json.loads(spider_file("dev.json").read_text())[:2])
    reports = {}
    for data in (str(path), f"{path}:spider"):
        out = tmp_path / f"{len(reports)}.json"
        assert main(["--model", "random:tiny", "--data", data, "--max_new_tokens", "4", "--progress", "false",
                     "--out", str(out)]) == 0
        reports[data] = json.loads(out.read_text())
    detected, named = reports[str(path)], reports[f"{path}:spider"]
    assert detected["config"]["prompt"] == named["config"]["prompt"] == "spider"
    assert detected["n_rows"] == 2 and detected["skipped_missing_database"] == 0
    assert detected["rows"] == named["rows"]
    assert capsys.readouterr().out.count("spider: n_rows=2") == 2
    # the route is chosen by spider_formatter; an adapter trained on the file without the suffix was trained
    # on spider prompts (the warning about scoring it on spider_linked prompts needs that)
    from types import SimpleNamespace

    from qlora.evaluation.spider_eval import spider_formatter, trained_spider_prompts

    assert spider_formatter(str(path)) == "spider" and spider_formatter(f"{path}:spider_linked") == "spider_linked"
    assert spider_formatter("builtin:sql") is None
    assert trained_spider_prompts(SimpleNamespace(datasets=[str(path), "builtin:sql"])) == {"spider"}


def test_evaluate_cli_schema_decoding_accepts_a_detected_spider_file(tmp_path):
    """--decoding schema needs a Spider source, and a Spider file without the suffix is one: the run gets past
    that check to the Spider route, where an --out that is a folder stops it before a model is loaded."""
    path = subset(tmp_path, json.loads(spider_file("dev.json").read_text())[:1])
    r = run_cli(["-m", "qlora.evaluate", "--model", "random:tiny", "--data", str(path), "--decoding", "schema",
                 "--out", str(tmp_path)])
    assert_one_error(r, f"--out {tmp_path} is a folder")


# --------------------------------------------------------------------------- hardness and the interval

def test_hardness_matches_the_official_dev_split():
    dev = json.loads(spider_file("dev.json").read_text())
    assert Counter(hardness(r["sql"]) for r in dev) == {"easy": 248, "medium": 446, "hard": 174, "extra": 166}
    # dev rows by index, levels worked out by hand from the official rules (components: WHERE, GROUP BY,
    # ORDER BY, LIMIT, joins, OR, LIKE; nesting; others: >1 aggregate, >1 select column, >1 condition)
    known = {0: "easy",     # SELECT count(*) FROM singer: nothing
             2: "medium",   # ORDER BY (1 component) + 3 select columns (1 other)
             19: "medium",  # ORDER BY + LIMIT (2 components) + 2 select columns
             41: "extra",   # WHERE + JOIN (2 components) and an INTERSECT (nesting)
             900: "hard",   # one JOIN and an INTERSECT, nothing else
             744: "easy"}   # COUNT(*) FROM (subquery): the official rules do not count a FROM subquery
    assert {i: hardness(dev[i]["sql"]) for i in known} == known


def test_bootstrap_interval_agrees_with_the_normal_approximation():
    values = [i % 5 == 0 for i in range(1000)]  # p = 0.2
    lo, hi = bootstrap_ci(values, resamples=2000, seed=0)
    half = 1.96 * math.sqrt(0.2 * 0.8 / 1000)  # 0.0248
    assert abs(lo - (0.2 - half)) < 0.006 and abs(hi - (0.2 + half)) < 0.006
    assert bootstrap_ci(values, seed=0) == bootstrap_ci(values, seed=0)


def test_answer_sql_looks_past_an_echoed_schema():
    text = "CREATE TABLE singer (id int);\n\nSELECT count(*) FROM singer;\nSELECT 2;"
    assert answer_sql(text) == "SELECT count(*) FROM singer;"
    assert answer_sql("```sql\nSELECT name FROM singer\n```") == "SELECT name FROM singer"
    assert answer_sql("CREATE TABLE t (a int);") == "CREATE TABLE t (a int);"  # nothing else: kept (and fails)


# --------------------------------------------------------------------------- shared-prefix generation

def test_grouped_generation_equals_one_prompt_at_a_time():
    """Cached shared prefix + masked padding + sequences leaving the batch give generate_ids' tokens."""
    import torch

    from qlora.evaluation.generation import generate_ids
    from qlora.evaluation.inference import load_for_inference
    from qlora.evaluation.shared_prefix import common_prefix_len, generate_grouped

    torch.manual_seed(0)
    model, tok, _ = load_for_inference(model="random:tiny", quant="none", compute_dtype="float32")
    shared = list(range(300, 360))
    groups = {"a": [shared + [5, 6, 7], shared + [8], shared + [9, 10, 11, 12, 13], shared[:40], shared + [5, 6]],
              "b": [[7, 8, 9, 10], [7, 8, 11]], "c": [[42]]}
    assert common_prefix_len(groups["a"]) == 39 and common_prefix_len(groups["c"]) == 0

    class Tokenizer:  # the real tokenizer with another EOS (below), recording what it decodes
        pad_token_id, eos_token_id, seen = tok.pad_token_id, -1, []

        def decode(self, ids, **kw):  # an ordinary token now stands for EOS: cut there, as a special one is skipped
            ids = [int(i) for i in ids]
            ids = ids[:ids.index(self.eos_token_id)] if self.eos_token_id in ids else ids
            self.seen.append(ids)
            return tok.decode(ids, **kw)

    generate_grouped(model, Tokenizer(), groups, max_new_tokens=12, batch_size=3)  # no EOS: 12 tokens each
    # EOS := a token some answer first produces after step 0, so answers end at different steps, some at none
    Tokenizer.eos_token_id = next(ids[j] for ids in Tokenizer.seen for j in range(1, 12) if ids[j] not in ids[:j])
    Tokenizer.seen = []
    got = generate_grouped(model, Tokenizer(), groups, max_new_tokens=12, batch_size=3)
    lengths = [len(ids) for ids in Tokenizer.seen]
    want = {k: [generate_ids(model, Tokenizer(), [p], 12, torch.device("cpu"))[0] for p in v] for k, v in groups.items()}
    assert got == want
    assert 12 in lengths and any(n < 12 for n in lengths), lengths  # some run to the end, some leave early


def test_grouped_generation_under_the_older_cache_argument_name():
    """transformers before 5.2x takes the KV cache as `past_key_values` and silently ignores `cache` (GPU
    image: 5.17). A model with the older forward must get its cache under that name: without it, every
    decode step sees one token and no context (that produced 'SELECT----...' for every Spider dev row)."""
    import torch
    from transformers import LlamaForCausalLM

    from qlora.evaluation.inference import load_for_inference
    from qlora.evaluation.shared_prefix import cache_kwarg, generate_grouped

    torch.manual_seed(0)
    model, tok, _ = load_for_inference(model="random:tiny", quant="none", compute_dtype="float32")
    assert cache_kwarg(model) in ("cache", "past_key_values")
    new_name = cache_kwarg(model)

    class OlderApi(LlamaForCausalLM):  # the older signature; anything else lands in **kwargs and is dropped
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None, logits_to_keep=0, **ignored):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache, logits_to_keep=logits_to_keep,
                                   **{new_name: past_key_values})

    old = OlderApi(model.config).eval()
    old.load_state_dict(model.state_dict())
    assert cache_kwarg(old) == "past_key_values"

    class Tokenizer:
        pad_token_id, eos_token_id = tok.pad_token_id, -1

        def decode(self, ids, **kw):
            return " ".join(str(int(i)) for i in ids)

    shared = list(range(300, 360))
    groups = {"a": [shared + [5, 6, 7], shared + [8], shared + [9, 10, 11]], "b": [[7, 8, 9, 10]]}
    want = generate_grouped(model, Tokenizer(), groups, max_new_tokens=10, batch_size=2)
    assert generate_grouped(old, Tokenizer(), groups, max_new_tokens=10, batch_size=2) == want


@pytest.mark.parametrize("text, why", [('"How many\\ud800 singers?"', "holds the escape \\ud800"),
                                       ("42", "must be a string, found int")])
def test_a_spider_question_that_is_not_text_names_the_row_and_field(tmp_path, text, why):
    """A Spider row whose question is not text (a lone surrogate escape, a number) is one error naming the row
    and field, both where evaluation reads the file and where training formats it (before any database is
    looked up, so no database is needed)."""
    import re

    from qlora.data.errors import DataError
    from qlora.data.spider import spider_messages
    from qlora.evaluation.spider_eval import load_spider

    good = '{"question": "How many singers?", "query": "SELECT count(*) FROM singer", "db_id": "concert_singer"}'
    bad = good.replace('"How many singers?"', text)
    f = tmp_path / "dev.json"
    f.write_text(f"[{good}, {bad}]")
    with pytest.raises(DataError, match=re.escape(f"dev.json row 1: field 'question' {why}")):
        load_spider(str(f))
    row = json.loads(bad)
    with pytest.raises(DataError, match=re.escape(f"dev.json row 2: field 'question' {why}")):
        spider_messages(row, "dev.json row 2", str(f))
