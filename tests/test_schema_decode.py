"""Schema-aware decoding: the name check against SQLite's own verdicts, the selection among candidates on
real Spider databases (stub generators), the beam search against transformers' generate, and the CLI
through a real model. Skips without ../shared/data/spider."""

from __future__ import annotations

import json
import re

import pytest
import torch
from badinput import assert_one_error, run_cli
from conftest import ROOT, SHARED, shared_file

from qlora.evaluation.beam_search import beam_grouped
from qlora.config import load_config
from qlora.evaluation.inference import load_for_inference
from qlora.evaluation.schema_decode import invalid_reason, plain_rows, schema_names, unknown_names
from qlora.data.spider import database_path
from qlora.evaluation.spider_eval import evaluate_spider, summarise
from qlora.data.sqlscore import execute_db


def db(name: str):
    return shared_file(f"spider/database/{name}/{name}.sqlite")


def subset(tmp_path, rows: list[dict]):
    (tmp_path / "database").symlink_to(SHARED / "spider" / "database", target_is_directory=True)
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(rows))
    return path


# --------------------------------------------------------------------------- the name check

def test_names_on_a_real_database():
    schema = schema_names(str(db("concert_singer")))
    assert "singer" in schema and "name" in schema["singer"] and "stadium_id" not in schema["singer"]
    ok = ["SELECT T1.name FROM singer AS T1", "SELECT T1.Name FROM Singer T1 JOIN concert AS T2 ON T1.singer_id > 0",
          'SELECT name FROM singer WHERE country = "France"', "SELECT count(*) AS n FROM singer ORDER BY n",
          "SELECT avg(age), max(age) FROM singer", "SELECT s.c FROM (SELECT count(*) c FROM singer) s",
          "WITH x AS (SELECT name FROM singer) SELECT name FROM x", "SELECT [name] FROM `singer`"]
    for sql in ok:
        assert unknown_names(sql, schema) == [], sql
        assert invalid_reason(sql, db("concert_singer")) is None, sql
    bad = {"SELECT nme FROM singer": ["nme"], "SELECT T1.nme FROM singer AS T1": ["t1.nme"],
           "SELECT stadium_id FROM singer": ["stadium_id"],  # a column of another table
           "SELECT name FROM singers": ["name", "singers"], "SELECT T9.name FROM singer": ["t9.name"]}
    for sql, names in bad.items():
        assert unknown_names(sql, schema) == names, sql
        assert invalid_reason(sql, db("concert_singer")) is not None, sql


def test_an_alias_reused_in_a_subquery_stands_for_both_tables():
    """A fine-tuned model's answer on dog_kennels (Spider dev) that runs: `T1` is professionals outside and dogs
    inside the subquery. Each column is checked against the tables its alias stands for anywhere in the query;
    a column of neither is still caught."""
    schema = schema_names(str(db("dog_kennels")))
    sql = ("SELECT count(*) FROM professionals AS T1 JOIN treatments AS T2 ON T1.professional_id = T2.professional_id "
           "WHERE T2.dog_id NOT IN (SELECT T1.dog_id FROM dogs AS T1 JOIN treatments AS T2 ON T1.dog_id = T2.dog_id)")
    assert "professional_id" not in schema["dogs"] and "dog_id" not in schema["professionals"]
    assert unknown_names(sql, schema) == [] and invalid_reason(sql, db("dog_kennels")) is None
    wrong = sql.replace("SELECT T1.dog_id", "SELECT T1.breed_nme")
    assert unknown_names(wrong, schema) == ["t1.breed_nme"]


def test_names_agree_with_sqlite_on_committed_predictions():
    """Every committed Spider prediction and gold query that runs uses only existing names; of those that
    fail with SQLite's `no such column/table: X`, the check names X without running them (most: one scope
    per query, so a column of another subquery's table passes it, and execution catches that)."""
    reports = sorted((ROOT / "results").glob("*spider*/**/*spider*dev*.json"))
    if not reports:
        pytest.skip("no Spider reports committed")
    source = shared_file("spider/dev.json")
    runs = caught = failed = 0
    for path in reports[:3]:
        for r in json.loads(path.read_text())["rows"]:
            if r["correct"] is None:
                continue
            schema = schema_names(str(database_path(source, r["db_id"])))
            assert unknown_names(r["gold"], schema) == [], r["gold"]
            m = re.search(r"no such (?:column|table): (\S+)", r["error"] or "")
            if r["error"] is None:
                runs += 1
                assert unknown_names(r["pred"], schema) == [], (path.name, r["pred"])
            elif m:
                failed += 1
                caught += m.group(1).lower() in unknown_names(r["pred"], schema)
    assert runs > 200 and failed > 300 and caught / failed > 0.9, (runs, caught, failed)


# --------------------------------------------------------------------------- selection (stub generators)

def test_first_valid_candidate_is_chosen_and_valid_greedy_kept(tmp_path, tok):
    """Greedy answers per row: a bad name, right, wrong but valid, a syntax error. Beams (in score order) for
    the first: another bad name, then a valid one; for the last: only invalid ones. Valid greedy answers are
    kept and get no beams; the bad-name row takes the valid beam; the last keeps its greedy answer."""
    dev = json.loads(shared_file("spider/dev.json").read_text())
    rows = dev[:4]  # concert_singer
    path = subset(tmp_path, rows)
    greedy = ["SELECT count(*) FROM singers", rows[1]["query"], "SELECT name FROM singer", "SELECT FROM WHERE"]
    beams = {0: ["SELECT count(singer_nme) FROM singer", "SELECT count(*) FROM singer"],
             3: ["SELECT nme FROM singer", "SELECT x.y FROM singer"]}
    asked = []

    def row_of(tokenizer, ids):
        return next(i for i, r in enumerate(rows) if f"Question: {r['question']}" in tokenizer.decode(ids))

    def greedy_fn(model, tokenizer, groups, max_new_tokens, batch_size, progress):
        return {k: [greedy[row_of(tokenizer, p)] for p in v] for k, v in groups.items()}

    def beam_fn(model, tokenizer, groups, max_new_tokens, batch_size, progress):
        asked.extend(row_of(tokenizer, p) for v in groups.values() for p in v)
        return {k: [beams[row_of(tokenizer, p)] for p in v] for k, v in groups.items()}

    report = evaluate_spider(None, tok, load_config([]), str(path), generate_fn=greedy_fn, beam_fn=beam_fn,
                             progress=False, decoding="schema")
    out = report["rows"]
    assert sorted(asked) == [0, 3]
    assert [r["candidate"] for r in out] == [2, 0, 0, None]
    assert [r["pred"] for r in out] == ["SELECT count(*) FROM singer", greedy[1], greedy[2], greedy[3]]
    assert [r["correct"] for r in out] == [True, True, False, False]
    assert [r["greedy_correct"] for r in out] == [False, True, False, False]
    for r in out:  # a prediction is valid on its database, or no candidate was (then greedy stays)
        assert r["candidate"] is None or invalid_reason(r["pred"], db("concert_singer")) is None
        assert r["candidate"] is None or execute_db(db("concert_singer"), r["pred"])[1] is None
    # both columns re-score from the rows, with their intervals
    again = json.loads(json.dumps(report))["rows"]
    assert summarise(again)["execution_accuracy"] == report["execution_accuracy"] == 0.5
    assert summarise(plain_rows(again)) == report["plain"] and report["plain"]["execution_accuracy"] == 0.25
    assert report["candidates"] == {"greedy_valid": 2, "beam": 1, "none_valid": 1}


# --------------------------------------------------------------------------- the real model path

def test_beam_search_matches_transformers_generate():
    """The n answers and their order are what model.generate(num_beams=n, num_return_sequences=n) gives,
    with one shared prefix cached, prompts of several lengths and an EOS that ends some beams early."""
    torch.manual_seed(0)
    model, tok, _ = load_for_inference(model="random:tiny", quant="none", compute_dtype="float32")
    with torch.no_grad():  # larger random weights: answers that depend on the prompt, not one repeated token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)

    class Tokenizer:
        pad_token_id, eos_token_id = tok.pad_token_id, -1

        def decode(self, ids, **kw):
            return " ".join(str(int(i)) for i in ids if int(i) != self.eos_token_id)

    shared = list(range(300, 330))
    groups = {"a": [shared + [5, 6, 7], shared + [8], shared + [9, 10, 11, 12, 13]], "b": [[7, 8, 9, 10]]}
    first = beam_grouped(model, Tokenizer(), groups, 8, batch_size=2, num_beams=3)
    # EOS := the token most often produced after the first step, so some beams end early
    counts = {}
    for answers in first.values():
        for beams in answers:
            for text in beams:
                for t in text.split()[1:]:
                    counts[t] = counts.get(t, 0) + 1
    Tokenizer.eos_token_id = int(max(counts, key=counts.get))
    got = beam_grouped(model, Tokenizer(), groups, 8, batch_size=2, num_beams=3)

    def generate(p):
        out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             num_beams=3, num_return_sequences=3, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=Tokenizer.eos_token_id,
                             temperature=None, top_p=None, top_k=None)
        return [Tokenizer().decode([t for t in o[len(p):] if int(t) != tok.pad_token_id]) for o in out]

    assert got == {k: [generate(p) for p in v] for k, v in groups.items()}
    assert any(len(t.split()) < 8 for beams in got.values() for b in beams for t in b)  # EOS ended some


def test_cli_schema_decoding_through_a_model(tmp_path):
    dev = json.loads(shared_file("spider/dev.json").read_text())
    path = subset(tmp_path, dev[:2])
    out = tmp_path / "schema.json"
    r = run_cli(["-m", "qlora.evaluate", "--model", "random:tiny", "--quant", "none", "--data", f"{path}:spider",
                 "--decoding", "schema", "--num_beams", "2", "--max_new_tokens", "4", "--progress", "false",
                 "--out", str(out)])
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["config"]["decoding"] == "schema" and report["config"]["num_beams"] == 2
    assert "plain greedy: execution_accuracy=" in r.stdout
    assert report["n_scored"] == report["plain"]["n_scored"] == 2 and "beams" in report["seconds"]
    for row in report["rows"]:  # a random model writes no valid SQL: greedy kept, after trying the beams
        assert row["candidate"] is None and row["pred"] == row["greedy_pred"]
    assert report["execution_accuracy_ci95"] == report["plain"]["execution_accuracy_ci95"]


def test_schema_decoding_needs_a_spider_source():
    r = run_cli(["-m", "qlora.evaluate", "--model", "random:tiny", "--decoding", "schema"])
    assert_one_error(r, "--decoding schema", "builtin:sql", "spider")
