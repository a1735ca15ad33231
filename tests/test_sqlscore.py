"""Tests for qlora.data.sqlscore: extraction, normalisation, sqlite execution and scoring."""

import json
import time
from pathlib import Path

import pytest

from qlora.data.sqlscore import execute, extract_sql, normalize_sql, score_row, score_rows

GRETEL = Path(__file__).resolve().parents[2] / "shared" / "data" / "gretel-synthetic-text-to-sql-25.jsonl"

CTX = (
    "CREATE TABLE emp (id INT, name TEXT, dept TEXT, salary REAL);"
    "INSERT INTO emp VALUES (1, 'Ann', 'IT', 100), (2, 'Bob', 'HR', 80), (3, 'Cid', 'IT', 120),"
    " (4, 'Dee', 'HR', 90);"
    "CREATE TABLE dept (code TEXT, title TEXT);"
    "INSERT INTO dept VALUES ('IT', 'Tech'), ('HR', 'People');"
)


# --- extract_sql -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("```sql\nSELECT name FROM emp;\n```", "SELECT name FROM emp;"),
    ("Here you go:\n```sql\nSELECT name\nFROM emp\n```\nHope it helps.", "SELECT name\nFROM emp"),
    ("```\nSELECT 1; SELECT 2;\n```", "SELECT 1;"),
    ("```sql\nSELECT 1", "SELECT 1"),  # generation cut off inside the fence
    ("SQL: SELECT name FROM emp", "SELECT name FROM emp"),
    ("Answer:  select * from emp;  ", "select * from emp;"),
    ("Answer: SQL: SELECT 1;", "SELECT 1;"),
    ("  SELECT a FROM t ; trailing junk", "SELECT a FROM t ;"),
    ("SELECT name FROM emp WHERE name = 'a;b'; more", "SELECT name FROM emp WHERE name = 'a;b';"),
    ("```sql\nSELECT id FROM t WHERE note = 'Answer: yes';\n```", "SELECT id FROM t WHERE note = 'Answer: yes';"),
])
def test_extract_sql_fences_and_labels(text, want):
    assert extract_sql(text) == want


def test_extract_sql_takes_sql_after_reasoning():
    text = ("The question asks which employees work in IT, so we select rows with dept = 'IT'. "
            "The SQL: a simple filter is enough.\nSQL: SELECT name FROM emp WHERE dept = 'IT';\n"
            "This returns the names.")
    assert extract_sql(text) == "SELECT name FROM emp WHERE dept = 'IT';"


def test_extract_sql_unlabelled_reasoning_and_trailing_explanation():
    text = "We need the names of staff.\n\nSELECT name FROM emp\n\nThis lists every name."
    assert extract_sql(text) == "SELECT name FROM emp"


@pytest.mark.parametrize("text, want", [
    # a stray closing fence after a bare query, then a tagged block: the tagged block, not "Output:"
    ("SELECT a FROM t;\n```\nOutput:\n```sql\nSELECT b FROM u;\n```", "SELECT b FROM u;"),
    # a bare query, then a stray fence pair around the result: the query, not the result label
    ("SELECT a FROM t\n```\nOutput:\n```\n3\n```", "SELECT a FROM t"),
    ("SELECT a FROM t;\n```\nOutput:\n```", "SELECT a FROM t;"),
    ("SELECT a FROM t;\n```\nOutput:\n```\nSELECT b FROM u;\n```", "SELECT a FROM t;"),
    # the first fence (a sample result) is never closed, so strict pairing swallows the ```sql opener
    ("Result:\n```\n| a |\n\n```sql\nSELECT a FROM t;\n```", "SELECT a FROM t;"),
    ("```\nOutput:\n```sql\nSELECT b FROM u\n```\nDone.", "SELECT b FROM u"),
])
def test_extract_sql_stray_fences(text, want):
    assert extract_sql(text) == want


@pytest.mark.parametrize("text, want", [
    ("```\nSELECT a FROM t\n```\nOutput:\n```\n3", "SELECT a FROM t"),
    ("Query:\n```sql\nSELECT a FROM t;\nOutput:\n```\n| a |\n```", "SELECT a FROM t;"),
    ("```\nOutput:\n```\nThe query:\n```\nSELECT a FROM t\n```", "SELECT a FROM t"),
    ("```sql\nSELECT a FROM t\n```\nSelect statements read rows.\n```sql\nSELECT b FROM u\n```", "SELECT a FROM t"),
    ("```sql\n-- names\nSELECT name FROM emp;\n```", "SELECT name FROM emp;"),
    ("```\nOutput:\n```", "Output:"),  # nothing SQL-like anywhere: the first block, as before
    ("```text\nno query here\n```\nsorry", "no query here"),
])
def test_extract_sql_well_paired_fences(text, want):
    assert extract_sql(text) == want


def test_extract_sql_empty():
    assert extract_sql("") == ""
    assert extract_sql("```sql\n```") == ""


# --- normalize_sql ---------------------------------------------------------------------------------

def test_normalize_sql_case_whitespace_punctuation():
    a = "SELECT  COUNT( * ) ,e.name\nFROM Emp e WHERE salary>=90 ;"
    b = "select count(*), e . name from emp e where salary >= 90"
    assert normalize_sql(a) == normalize_sql(b) == "select count(*), e.name from emp e where salary >= 90"


def test_normalize_sql_keeps_string_literals_verbatim():
    assert normalize_sql("SELECT * FROM t WHERE x = 'Ab  C'") == "select * from t where x = 'Ab  C'"
    assert normalize_sql("SELECT 'Paris'") != normalize_sql("SELECT 'paris'")
    assert normalize_sql("SELECT 'it''s  X' -- note\n;") == "select 'it''s  X'"


# --- execute ---------------------------------------------------------------------------------------

def test_execute_returns_rows_and_errors():
    rows, err = execute(CTX, "SELECT name FROM emp WHERE dept = 'HR' ORDER BY id")
    assert err is None and rows == [("Bob",), ("Dee",)]
    rows, err = execute(CTX, "SELEC name FROM emp")
    assert rows is None and "syntax error" in err
    rows, err = execute("CREATE TABLE broken (", "SELECT 1")
    assert rows is None and err.startswith("context:")
    assert execute(CTX, "   ") == (None, "empty query")


def test_runaway_query_is_stopped_by_timeout():
    sql = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
           "SELECT count(*) FROM c")
    t0 = time.monotonic()
    rows, err = execute(CTX, sql, timeout_s=0.3)
    assert rows is None and "timeout" in err
    assert time.monotonic() - t0 < 5
    res = score_row(CTX, "SELECT 1", sql + ";")
    assert res["pred_ok"] is False and "timeout" in res["error"] and res["exec_match"] is False


# --- score_row -------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred", [
    "select NAME from EMP   where DEPT='IT'",                        # case and whitespace
    "SELECT e.name AS who FROM emp AS e WHERE e.dept = 'IT';",       # aliases
    "SELECT name FROM emp WHERE salary >= 100",                      # different but equivalent here
    "SELECT e.name FROM emp e JOIN dept d ON e.dept = d.code WHERE d.title = 'Tech'",
])
def test_equivalent_sql_is_execution_match(pred):
    res = score_row(CTX, "SELECT name FROM emp WHERE dept = 'IT';", pred)
    assert res["gold_ok"] and res["pred_ok"] and res["exec_match"] and res["error"] is None


def test_exact_match_only_for_textually_equal_sql():
    gold = "SELECT name FROM emp WHERE dept = 'IT';"
    assert score_row(CTX, gold, "select  name from EMP where dept='IT'")["exact_match"] is True
    res = score_row(CTX, gold, "SELECT e.name FROM emp e WHERE e.dept = 'IT'")
    assert res["exec_match"] is True and res["exact_match"] is False


def test_wrong_filter_is_not_a_match():
    res = score_row(CTX, "SELECT name FROM emp WHERE dept = 'IT'", "SELECT name FROM emp WHERE dept = 'HR'")
    assert res["pred_ok"] is True and res["exec_match"] is False and res["exact_match"] is False


def test_column_order_matters_but_names_do_not():
    gold = "SELECT name, salary FROM emp"
    assert score_row(CTX, gold, "SELECT name AS n, salary AS s FROM emp")["exec_match"] is True
    assert score_row(CTX, gold, "SELECT salary, name FROM emp")["exec_match"] is False
    assert score_row(CTX, gold, "SELECT name FROM emp")["exec_match"] is False


@pytest.mark.parametrize("pred, needle", [
    ("SELECT name FROM FROM emp", "syntax error"),
    ("SELECT name FROM emp WHERE", "incomplete input"),
    ("SELECT nme FROM emp", "no such column"),
    ("SELECT name FROM employees", "no such table"),
])
def test_failing_prediction(pred, needle):
    res = score_row(CTX, "SELECT name FROM emp", pred)
    assert res["gold_ok"] is True and res["pred_ok"] is False and res["exec_match"] is False
    assert isinstance(res["error"], str) and needle in res["error"]


def test_order_matters_only_when_gold_has_top_level_order_by():
    asc = "SELECT name FROM emp ORDER BY salary"
    desc = "SELECT name FROM emp ORDER BY salary DESC"
    assert score_row(CTX, asc, desc)["exec_match"] is False
    assert score_row(CTX, asc, asc.lower())["exec_match"] is True
    # No ORDER BY in gold: any row order is fine.
    assert score_row(CTX, "SELECT name FROM emp", desc)["exec_match"] is True
    # ORDER BY only inside a subquery / window does not make the outer result ordered.
    sub = "SELECT name FROM (SELECT name, salary FROM emp ORDER BY salary)"
    win = "SELECT name, ROW_NUMBER() OVER (ORDER BY id) FROM emp"
    assert score_row(CTX, sub, desc)["order_sensitive"] is False
    assert score_row(CTX, sub, desc)["exec_match"] is True
    assert score_row(CTX, win, win + " ORDER BY name DESC")["exec_match"] is True
    # A literal mentioning ORDER BY is not a clause.
    assert score_row(CTX, "SELECT name FROM emp WHERE name != 'order by'", desc)["order_sensitive"] is False


def test_multiset_not_set_comparison():
    res = score_row(CTX, "SELECT dept FROM emp", "SELECT DISTINCT dept FROM emp")
    assert res["exec_match"] is False


def test_mixed_unorderable_values_do_not_crash():
    ctx = "CREATE TABLE m (v); INSERT INTO m VALUES (NULL), (3), ('x'), (1.5), (X'00'), (NULL);"
    res = score_row(ctx, "SELECT v FROM m", "SELECT v FROM m ORDER BY rowid DESC")
    assert res["exec_match"] is True
    assert score_row(ctx, "SELECT v FROM m", "SELECT v FROM m WHERE v IS NOT NULL")["exec_match"] is False
    # Ordered gold with mixed types, prediction reversed: still compared (and wrong), no crash.
    assert score_row(ctx, "SELECT v FROM m ORDER BY rowid", "SELECT v FROM m ORDER BY rowid DESC")[
        "exec_match"] is False


def test_float_tolerance():
    assert score_row(CTX, "SELECT 2", "SELECT 2.0")["exec_match"] is True
    assert score_row(CTX, "SELECT 1.0 / 3", "SELECT (1.0 / 6) * 2")["exec_match"] is True
    assert score_row(CTX, "SELECT AVG(salary) FROM emp", "SELECT SUM(salary) / COUNT(*) FROM emp")[
        "exec_match"] is True
    assert score_row(CTX, "SELECT 0.1 + 0.2", "SELECT 0.3")["exec_match"] is True
    assert score_row(CTX, "SELECT 1.0 / 3", "SELECT 0.3334")["exec_match"] is False
    assert score_row(CTX, "SELECT 1234567", "SELECT 1234568")["exec_match"] is False


def test_dml_is_scored_by_its_effect_on_the_database():
    gold = "DELETE FROM emp WHERE dept = 'HR';"
    assert score_row(CTX, gold, "DELETE FROM emp WHERE salary < 95")["exec_match"] is True
    assert score_row(CTX, gold, "DELETE FROM emp WHERE dept = 'IT'")["exec_match"] is False
    assert score_row(CTX, gold, "UPDATE emp SET salary = 0 WHERE dept = 'HR'")["exec_match"] is False
    # A SELECT with an empty result must not match a statement that returns no rows.
    assert score_row(CTX, gold, "SELECT * FROM emp WHERE 0")["exec_match"] is False


# --- score_rows ------------------------------------------------------------------------------------

def test_score_rows_skips_failed_gold_and_aggregates():
    rows = [
        {"sql_context": CTX, "sql": "SELECT name FROM emp WHERE dept = 'IT';",
         "prediction": "```sql\nSELECT name FROM emp WHERE dept = 'IT';\n```"},          # exact + exec
        {"sql_context": CTX, "sql": "SELECT COUNT(*) FROM emp;",
         "prediction": "Counting rows.\nSQL: SELECT COUNT(id) FROM emp"},                 # exec only
        {"sql_context": CTX, "sql": "SELECT name FROM emp WHERE dept = 'IT';",
         "prediction": "SELECT name FROM emp WHERE dept = 'HR';"},                         # wrong
        {"sql_context": CTX, "sql": "SELECT nope FROM emp;",
         "prediction": "SELECT nope FROM emp;"},                                           # gold fails: skipped
        {"sql_context": CTX, "sql": "SELECT YEAR(CURRENT_DATE);",
         "prediction": "SELECT 1"},                                                        # gold fails: skipped
        {"sql_context": CTX, "sql": "SELECT name FROM emp;",
         "prediction": "SELECT nme FROM emp;"},                                            # pred error
    ]
    out = score_rows(rows)
    assert out["n"] == 6 and out["n_scored"] == 4 and out["n_skipped_gold_failed"] == 2
    assert out["execution_accuracy"] == pytest.approx(2 / 4)
    assert out["exact_match"] == pytest.approx(1 / 4)
    assert out["pred_error_rate"] == pytest.approx(1 / 4)
    d = out["details"]
    assert len(d) == 6 and [x["index"] for x in d] == list(range(6))
    assert d[1]["pred_sql"] == "SELECT COUNT(id) FROM emp"
    assert d[3]["gold_ok"] is False and d[3]["gold_error"]
    assert d[5]["pred_ok"] is False and "no such column" in d[5]["error"]


def test_score_rows_empty():
    out = score_rows([])
    assert out["n"] == out["n_scored"] == 0 and out["execution_accuracy"] == 0.0


def test_gretel_gold_as_prediction():
    if not GRETEL.exists():
        pytest.skip(f"data file not found: {GRETEL}")
    rows = [json.loads(line) for line in GRETEL.read_text().splitlines() if line.strip()]
    assert len(rows) == 25
    out = score_rows([{**r, "prediction": r["sql"]} for r in rows])
    assert out["n"] == 25
    assert out["n_scored"] == 18
    assert out["n_skipped_gold_failed"] == 7
    assert out["execution_accuracy"] == 1.0
    assert out["exact_match"] == 1.0
    assert out["pred_error_rate"] == 0.0
    assert [d["id"] for d in out["details"] if not d["gold_ok"]] == [5097, 5102, 5103, 5108, 5117, 5119, 5120]
    # A labelled, fenced version of the same answers scores the same.
    wrapped = score_rows([{**r, "prediction": f"Reasoning here.\n```sql\n{r['sql']}\n```"} for r in rows])
    assert wrapped["execution_accuracy"] == 1.0 and wrapped["n_scored"] == 18
