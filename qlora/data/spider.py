"""Spider 1.0 text-to-SQL: schemas read from the benchmark's SQLite files, the `spider` formatter, and
Spider's hardness levels.

A Spider source is a json file of rows with `question`, `query` and `db_id` (train_spider.json, dev.json);
the databases sit beside it in `database/<db_id>/<db_id>.sqlite`, as in the official release:

    python train.py --datasets ../shared/data/spider/train_spider.json:spider
    python -m qlora.evaluate --adapter runs/spider/final --data ../shared/data/spider/dev.json:spider

The prompt is the schema (the database's own `CREATE TABLE` statements from sqlite_master, one compact line
each) and the question, in the same instruction as the other text-to-SQL formatters; the response is the
gold query with its whitespace runs collapsed. A row whose database file is absent is skipped and counted
(`SkipRow`). Every database is opened read-only so the benchmark's files never change.
Scoring on the dev set lives in qlora.evaluation.spider_eval.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from pathlib import Path

from .errors import DataError, SkipRow, lone_surrogate
from .sqlscore import collapse_whitespace, extract_sql, sql_instruction, sql_tokens

__all__ = ["database_path", "connect_ro", "schema_text", "prompt_schema", "spider_messages", "answer_sql", "hardness", "HARDNESS_LEVELS"]

# Sample rows of each table under its CREATE TABLE line, in training and evaluation prompts alike.
SAMPLE_ROWS = 0
_SAMPLE_CHARS = 30  # longer text values are cut in sample rows

# SQLite keywords: an identifier spelt like one keeps its quotes in the compact schema (unquoted it would
# not parse, and the model would learn to write it bare).
_KEYWORDS = set("""abort action add after all alter always analyze and as asc attach autoincrement before begin
between by cascade case cast check collate column commit conflict constraint create cross current current_date
current_time current_timestamp database default deferrable deferred delete desc detach distinct do drop each
else end escape except exclude exclusive exists explain fail filter first following for foreign from full
generated glob group groups having if ignore immediate in index indexed initially inner insert instead intersect
into is isnull join key last left like limit match materialized natural no not nothing notnull null nulls of
offset on or order others outer over partition plan pragma preceding primary query raise range recursive
references regexp reindex release rename replace restrict returning right rollback row rows savepoint select
set table temp temporary then ties to transaction trigger unbounded union unique update using vacuum values
view virtual when where window with without""".split())
_SIMPLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def database_path(source: str | Path, db_id: str) -> Path:
    """`<directory of the json file>/database/<db_id>/<db_id>.sqlite`."""
    return Path(source).expanduser().parent / "database" / db_id / f"{db_id}.sqlite"


def connect_ro(path: str | Path) -> sqlite3.Connection:
    """A read-only connection (mode=ro: a query that writes fails instead of changing the file)."""
    return sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)


def _unquote(kind: str, text: str, prev: str) -> str:
    """A quoted name as a bare identifier where that is safe; string literals only as table names
    (`CREATE TABLE 'airlines'`), never as DEFAULT values."""
    if kind == "str" and prev not in ("table", "references"):
        return text
    inner = text[1:-1]
    return inner if _SIMPLE.match(inner) and inner.lower() not in _KEYWORDS else text


def compact_create(sql: str) -> str:
    """One CREATE statement on one line: comments dropped, each gap of blanks in the source one space
    (none after '(' or before ')' and ','), quotes removed where the name does not need them."""
    out, prev, end = [], "", 0
    for kind, text, pos in sql_tokens(sql):
        if out and pos > end and prev != "(" and text not in (")", ","):
            out.append(" ")
        end = pos + len(text)
        out.append(_unquote(kind, text, prev) if kind in ("qid", "str") else text)
        prev = text.lower()
    return "".join(out)


def _literal(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bytes):
        return "X'..'"
    if isinstance(v, str):
        v = v if len(v) <= _SAMPLE_CHARS else v[:_SAMPLE_CHARS - 3] + "..."
        return "'" + v.replace("'", "''") + "'"
    return repr(v)


def user_tables(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """(name, CREATE statement) of a database's own tables, in sqlite_master order."""
    return conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL "
                        "AND name NOT LIKE 'sqlite_%'").fetchall()


@functools.lru_cache(maxsize=512)
def schema_text(path: str, sample_rows: int = 0) -> str:
    """The database's tables as compact `CREATE TABLE ...;` lines (sqlite_master order), each followed by
    up to `sample_rows` of its rows as `-- v1, v2, ...` comments. Cached per (file, sample_rows)."""
    conn = connect_ro(path)
    try:
        lines = []
        for name, sql in user_tables(conn):
            lines.append(compact_create(sql) + ";")
            if sample_rows:
                quoted = '"' + name.replace('"', '""') + '"'
                for row in conn.execute(f"SELECT * FROM {quoted} LIMIT {int(sample_rows)}"):
                    lines.append("-- " + ", ".join(_literal(v) for v in row))
        return "\n".join(lines)
    except sqlite3.Error as e:
        raise DataError(f"database {path}: cannot read its schema ({e}); is it a Spider .sqlite file?") from None
    finally:
        conn.close()


def spider_prompt(schema: str, question: str) -> str:
    """The user turn: the shared text-to-SQL instruction around the schema and the question."""
    return sql_instruction(schema, question)


def prompt_schema(path: str, question: str, sample_rows: int = 0, linked: bool = False) -> str:
    """The schema part of a Spider prompt, in training and evaluation alike: the whole schema
    (`schema_text`), or with `linked` the question's tables whole and the rest shortened
    (qlora.data.schema_link; sample rows are not combined with it)."""
    if linked:
        if sample_rows:
            raise DataError("spider_linked prompts have no sample rows: use the spider formatter for those")
        from .schema_link import linked_schema

        return linked_schema(path, question)
    return schema_text(path, sample_rows)


def text_problem(row: dict) -> str | None:
    """Why a Spider row's question or query is not text a tokenizer takes (not a string, or a lone UTF-16
    surrogate that the JSON spelled as an escape such as "\\ud800"), or None."""
    for key in ("question", "query", "db_id"):
        value = row.get(key)
        if not isinstance(value, str):
            return f"field '{key}' must be a string, found {type(value).__name__}"
        bad = lone_surrogate(value)
        if bad:
            return (f"field '{key}' holds the escape {bad}, half of a UTF-16 surrogate pair without its other half, "
                    "which is not text: fix or remove that escape in the file")
    return None


def spider_messages(row: dict, where: str = "row", source: str = "", sample_rows: int | None = None,
                    linked: bool = False) -> list[dict]:
    """One Spider row (`question`, `query`, `db_id`) -> [user: schema + question, assistant: gold SQL].

    `source` is the json file the row came from; its `database/` folder holds the SQLite files;
    `sample_rows` (default SAMPLE_ROWS) rows of each table follow its CREATE TABLE line; `linked`: the
    schema linked to the question (`prompt_schema`). Raises SkipRow when the row's database file is absent
    (the data pipeline counts those)."""
    for key in ("question", "query", "db_id"):
        if row.get(key) is None:
            raise DataError(f"{where}: missing required field '{key}' (row has {', '.join(sorted(row))})")
    problem = text_problem(row)
    if problem:
        raise DataError(f"{where}: {problem}")
    path = database_path(source, row["db_id"])
    if not path.is_file():
        raise SkipRow("Spider database missing")
    schema = prompt_schema(str(path), row["question"], SAMPLE_ROWS if sample_rows is None else sample_rows, linked)
    return [{"role": "user", "content": spider_prompt(schema, row["question"])},
            {"role": "assistant", "content": collapse_whitespace(row["query"])}]


_ECHO = re.compile(r"\s*(?:CREATE|INSERT)\b", re.I)


def answer_sql(text: str) -> str:
    """The query in a model's answer: extract_sql's first statement, or, when that is a CREATE/INSERT the
    model echoed from the schema (base models do), the first later statement that is not one."""
    first = sql = extract_sql(text)
    rest = text
    while sql and _ECHO.match(sql):
        cut = rest.find(sql)
        if cut < 0:
            break
        rest = rest[cut + len(sql):]
        sql = extract_sql(rest)
    return sql if sql and not _ECHO.match(sql) else first


# --------------------------------------------------------------------------- hardness
# Spider's own difficulty levels, computed from the parsed query (the `sql` field of dev.json) exactly as
# eval_hardness in the official evaluation.py (taoyds/spider), quirks included: count_agg looks at unit[0],
# which for a WHERE condition is its NOT flag and for HAVING's 'and'/'or' strings is a letter.
# On dev.json this gives the published split: easy 248, medium 446, hard 174, extra 166.

HARDNESS_LEVELS = ("easy", "medium", "hard", "extra")
_LIKE = 9  # WHERE_OPS.index('like') in ('not', 'between', '=', '>', '<', '>=', '<=', '!=', 'in', 'like', ...)


def _count_agg(units) -> int:
    return sum(1 for u in units if u[0] != 0)  # AGG_OPS.index('none') == 0


def _nested(sql: dict) -> list:
    conds = sql["from"]["conds"][::2] + sql["where"][::2] + sql["having"][::2]
    out = [v for c in conds for v in (c[3], c[4]) if isinstance(v, dict)]
    return out + [sql[k] for k in ("intersect", "except", "union") if sql[k] is not None]


def _component1(sql: dict) -> int:
    n = sum((len(sql["where"]) > 0, len(sql["groupBy"]) > 0, len(sql["orderBy"]) > 0, sql["limit"] is not None))
    n += max(len(sql["from"]["table_units"]) - 1, 0)  # joins
    n += sum(1 for t in sql["from"]["conds"][1::2] + sql["where"][1::2] + sql["having"][1::2] if t == "or")
    conds = sql["from"]["conds"][::2] + sql["where"][::2] + sql["having"][::2]
    return n + sum(1 for c in conds if c[1] == _LIKE)


def _others(sql: dict) -> int:
    agg = _count_agg(sql["select"][1]) + _count_agg(sql["where"][::2]) + _count_agg(sql["groupBy"])
    if sql["orderBy"]:
        units = sql["orderBy"][1]
        agg += _count_agg([u[1] for u in units if u[1]] + [u[2] for u in units if u[2]])
    agg += _count_agg(sql["having"])
    return sum((agg > 1, len(sql["select"][1]) > 1, len(sql["where"]) > 1, len(sql["groupBy"]) > 1))


def hardness(sql: dict) -> str:
    """'easy', 'medium', 'hard' or 'extra' for a parsed Spider query (a row's `sql` field)."""
    c1, c2, others = _component1(sql), len(_nested(sql)), _others(sql)
    if c1 <= 1 and others == 0 and c2 == 0:
        return "easy"
    if (others <= 2 and c1 <= 1 and c2 == 0) or (c1 <= 2 and others < 2 and c2 == 0):
        return "medium"
    if (others > 2 and c1 <= 2 and c2 == 0) or (2 < c1 <= 3 and others <= 2 and c2 == 0) or \
            (c1 <= 1 and others == 0 and c2 <= 1):
        return "hard"
    return "extra"
