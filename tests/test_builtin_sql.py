"""The shipped built-in SQL data (data/sql) is exactly what qlora.data.builtin_sql generates, and
every row is a valid, self-contained, executable gretel-style example."""
import collections
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from qlora.data import builtin_sql

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "sql"
FIELDS = ["id", "domain", "sql_complexity", "sql_task_type", "sql_prompt", "sql_context", "sql",
          "sql_explanation"]
COMPLEXITIES = {"basic SQL", "aggregation", "single join", "subqueries"}


@pytest.fixture(scope="module")
def generated():
    return builtin_sql.generate()


@pytest.fixture(scope="module")
def shipped():
    return {s: (DATA / f"{s}.jsonl").read_text(encoding="utf-8") for s in ("train", "test")}


@pytest.fixture(scope="module")
def rows(shipped):
    return {s: [json.loads(line) for line in text.splitlines()] for s, text in shipped.items()}


def test_shipped_files_match_generator(generated, shipped):
    train, test = generated
    assert len(train) == 400 and len(test) == 100
    # Byte-for-byte: regenerate with `python -m qlora.data.builtin_sql --out data/sql` if this fails.
    assert shipped["train"] == builtin_sql.to_jsonl(train)
    assert shipped["test"] == builtin_sql.to_jsonl(test)


def test_shipped_files_are_small():
    assert sum((DATA / f"{s}.jsonl").stat().st_size for s in ("train", "test")) < 500_000


def test_all_fields_present_and_typed(rows):
    ids = []
    for split in ("train", "test"):
        for r in rows[split]:
            assert list(r) == FIELDS
            assert isinstance(r["id"], int)
            assert all(isinstance(r[f], str) and r[f].strip() for f in FIELDS[1:])
            assert r["sql"].endswith(";") and r["sql_context"].startswith("CREATE TABLE ")
            assert r["sql_explanation"].endswith(".") and r["sql_explanation"].count(". ") == 0
            ids.append(r["id"])
    assert len(set(ids)) == len(ids)


def test_every_query_executes_and_returns_rows(rows):
    for split in ("train", "test"):
        for r in rows[split]:
            con = sqlite3.connect(":memory:")
            try:
                con.executescript(r["sql_context"])
                result = con.execute(r["sql"]).fetchall()
            finally:
                con.close()
            assert result, (split, r["id"], r["sql"])
            assert any(v not in (None, 0) for row in result for v in row), (split, r["id"])


def test_context_creates_exactly_the_tables_the_query_uses(rows):
    for r in rows["train"] + rows["test"]:
        created = re.findall(r"CREATE TABLE (\w+)", r["sql_context"])
        used = re.findall(r"\b(?:FROM|JOIN)\s+(\w+)", r["sql"])
        assert set(created) == set(used), r["id"]
        for table in created:  # 2-6 inserted rows per table
            values = re.search(rf"INSERT INTO {table} \([^)]*\) VALUES (.*?);", r["sql_context"]).group(1)
            assert 2 <= values.count("), (") + 1 <= 6, (r["id"], table)
        # Short rows: ~1000 chars is roughly 340 tokens even with digit-by-digit tokenisers.
        assert len(r["sql_context"]) + len(r["sql"]) < 1000, r["id"]


def test_train_test_disjoint(rows):
    key = lambda r: (r["sql_prompt"], r["sql_context"])  # noqa: E731
    train_keys = {key(r) for r in rows["train"]}
    assert len(train_keys) == len(rows["train"])
    assert not train_keys & {key(r) for r in rows["test"]}


def test_generation_is_deterministic(generated):
    assert builtin_sql.generate() == generated
    assert builtin_sql.generate(seed=1, n_train=30, n_test=10) != builtin_sql.generate(n_train=30, n_test=10)
    # Also across processes with different hash seeds (no set/dict-order dependence).
    code = "from qlora.data import builtin_sql as b; t, s = b.generate(3, 40, 10); print(b.to_jsonl(t + s), end='')"
    outs = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("0", "12345")]
    assert outs[0] == outs[1] == builtin_sql.to_jsonl(sum(builtin_sql.generate(3, 40, 10), []))


def test_coverage_of_domains_and_sql_constructs(rows):
    train = rows["train"]
    assert len({r["domain"] for r in train}) >= 6
    assert {r["sql_complexity"] for r in train} == COMPLEXITIES
    sqls = " ".join(r["sql"] for r in train)
    for construct in ["WHERE", "COUNT(", "SUM(", "AVG(", "MIN(", "MAX(", "GROUP BY", "HAVING", "ORDER BY",
                      "LIMIT", " JOIN ", "(SELECT", "DISTINCT", "BETWEEN", " IN (", "LIKE"]:
        assert construct in sqls, construct


def test_test_split_has_same_query_mix_as_train(rows):
    def mix(split):
        c = collections.Counter(r["sql_complexity"] for r in rows[split])
        return {k: v / len(rows[split]) for k, v in c.items()}
    tr, te = mix("train"), mix("test")
    assert set(tr) == set(te)
    assert all(abs(tr[k] - te[k]) < 0.05 for k in tr)


def test_question_phrasing_varies(rows):
    # Same template, different wording: strip quoted constants/numbers and count distinct shapes.
    shapes = {re.sub(r"'[^']*'|\d[\d.]*", "X", r["sql_prompt"]) for r in rows["train"]}
    assert len(shapes) > 100
