"""qlora.data.schema_link and the `spider_linked` prompt, on real Spider databases; benchmarks/spider_split.py.
Skips without ../shared/data/spider."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED, shared_file

from qlora.data.examples import DataStats, build_examples, parse_source
from qlora.data.schema_link import link_recall, linked_schema, linked_tables, words
from qlora.data.errors import DataError
from qlora.data.spider import database_path, prompt_schema, schema_text
from qlora.evaluation.spider_eval import evaluate_spider


def concert():
    return str(shared_file("spider/database/concert_singer/concert_singer.sqlite"))


def test_words_split_names_and_questions_alike():
    assert words("song_name") == words("songName") == words("song names") == ["song", "name"]
    assert words("Countries") == ["country"] and words("class") == ["class"]


def test_the_question_tables_stay_whole_and_the_rest_shrink_to_names():
    path = concert()
    question = "How many singers do we have?"
    assert linked_tables(path, question) == ["singer", "singer_in_concert"]
    lines = linked_schema(path, question).splitlines()
    full = {line.split()[2]: line for line in schema_text(path).splitlines()}
    assert lines[:2] == [full["singer"], full["singer_in_concert"]] and len(lines) == 3
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    others = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
              if n not in ("singer", "singer_in_concert")]
    assert others == ["stadium", "concert"]
    assert lines[2] == "-- other tables: " + ", ".join(
        f"{n}({', '.join(r[1] for r in conn.execute(f'PRAGMA table_info({n})'))})" for n in others)


def test_a_cell_value_in_the_question_links_its_table():
    path = concert()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    assert conn.execute("SELECT count(*) FROM singer WHERE Country = 'Netherlands'").fetchone()[0] > 0
    assert linked_tables(path, "How many are from Netherlands?") == ["singer"]  # no word of a name matches
    assert linked_tables(path, "How many are from Narnia?") == []


def test_nothing_linked_gives_the_whole_schema():
    path = concert()
    assert linked_schema(path, "How many are from Narnia?") == schema_text(path)
    with pytest.raises(DataError, match="spider_linked prompts have no sample rows"):
        prompt_schema(path, "How many singers?", sample_rows=1, linked=True)


def test_training_and_scoring_build_the_same_prompt(tmp_path, tok):
    """The spider_linked formatter's user turn is exactly the prompt evaluate_spider generates from."""
    dev = json.loads(shared_file("spider/dev.json").read_text())[:6]
    (tmp_path / "database").symlink_to(SHARED / "spider" / "database", target_is_directory=True)
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(dev))
    from qlora.config import load_config

    cfg = load_config([])
    seen = []

    def capture(model, tokenizer, groups, max_new_tokens, batch_size, progress):
        seen.extend(tokenizer.decode(p) for v in groups.values() for p in v)
        return {k: ["SELECT 1"] * len(v) for k, v in groups.items()}

    evaluate_spider(None, tok, cfg, str(path), generate_fn=capture, progress=False, linked=True)
    src = parse_source(f"{path}:spider_linked")
    rows = [{"question": r["question"], "query": r["query"], "db_id": r["db_id"]} for r in dev]
    from qlora.data.formatters import FORMATTERS

    turns = [FORMATTERS["spider_linked"](r, f"row {i}", str(path))[0]["content"] for i, r in enumerate(rows)]
    assert len(seen) == 6 and src.formatter == "spider_linked"
    for turn in turns:
        assert sum(turn in s for s in seen) == 1
    assert any("-- other tables:" in t for t in turns)  # linking changed these prompts
    examples = build_examples(rows, src, tok, 1024, "drop", DataStats())  # train.py's path to the same turns
    assert [sum(t in tok.decode(e.input_ids) for t in turns) for e in examples] == [1] * 6


# measured: on every 7th row of train_spider.json (986 rows) the linker keeps 96.6% of the tables gold queries use
def test_the_linker_keeps_most_gold_tables_on_train():
    src = shared_file("spider/train_spider.json")
    rows = json.loads(src.read_text())[::7]
    hit = total = 0
    for r in rows:
        p = database_path(src, r["db_id"])
        if p.is_file():
            h, n = link_recall(str(p), r["question"], r["query"])
            hit += h
            total += n
    assert total > 1000 and hit / total > 0.93


def test_split_holds_out_whole_databases(tmp_path):
    src = shared_file("spider/train_spider.json")
    out = tmp_path / "split"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "spider_split.py"), str(src), str(out),
                          "--holdout_dbs", "5", "--seed", "3"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    train, held = (json.loads((out / f).read_text()) for f in ("train.json", "holdout.json"))
    assert {r["db_id"] for r in train}.isdisjoint({r["db_id"] for r in held}) and len({r["db_id"] for r in held}) == 5
    rows = json.loads(src.read_text())
    assert len(train) + len(held) == sum(database_path(src, r["db_id"]).is_file() for r in rows)
    assert database_path(out / "holdout.json", held[0]["db_id"]).is_file()  # the link makes it a Spider source
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "spider_split.py"), str(src), str(out),
                          "--holdout_dbs", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --holdout_dbs must be between 1 and")
