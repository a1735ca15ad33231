"""Schema-aware decoding for Spider: execution-guided selection among beam-search candidates.

    python -m qlora.evaluate --adapter runs/spider/final --data ../shared/data/spider/dev.json:spider \\
        --decoding schema --num_beams 4 --out adapter_spider_dev_schema.json

The candidates of a row are its greedy answer first, then the `num_beams` answers of a beam search
(qlora.evaluation.beam_search.beam_grouped) in score order. The prediction is the first candidate that is valid on
the row's database: it runs there without error (qlora.data.sqlscore.execute_db: read-only, the evaluation's
time limit) and every table and column name it uses exists in that database (`unknown_names`). When no
candidate is valid the greedy answer stays. So a greedy answer that is valid is never changed, and the
beam search only runs for rows whose greedy answer is not.

Names are checked against the database's own tables and columns (`schema_names`). A query may also use
names it defines itself: aliases (`singer AS T1`, `singer T1`, `count(*) AS n`) and WITH tables; `T1.name`
must be a column of the table T1 stands for. Keywords, function names (followed by `(`) and string
literals are not names; a double-quoted word that is no name is a string, as SQLite reads it.
"""

from __future__ import annotations

import functools

from .beam_search import beam_grouped
from ..data.spider import _KEYWORDS, answer_sql, connect_ro, database_path
from ..data.sqlscore import execute_db, normalize_sql, score_db_row, sql_tokens

__all__ = ["schema_names", "unknown_names", "invalid_reason", "first_valid", "beam_generator", "needs_beams",
           "choose_predictions", "plain_rows"]

# names SQLite knows in every database: the implicit rowid, TRUE/FALSE, the built-in collations
_BUILTIN = {"rowid", "oid", "_rowid_", "true", "false", "nocase", "binary", "rtrim"}


@functools.lru_cache(maxsize=256)
def schema_names(path: str) -> dict[str, frozenset[str]]:
    """{table: its columns} of the database file, every name lower-cased (SQLite names ignore case)."""
    conn = connect_ro(path)
    try:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                                             "AND name NOT LIKE 'sqlite_%'")]
        return {t.lower(): frozenset(r[1].lower() for r in conn.execute(f"PRAGMA table_info(\"{t}\")"))
                for t in tables}
    finally:
        conn.close()


def _name(kind: str, text: str) -> str | None:
    """The name a token spells (lower-cased), or None for keywords, literals and punctuation."""
    if kind == "word":
        return None if text.lower() in _KEYWORDS else text.lower()
    if kind == "qid":
        return text[1:].rstrip(text[0] if text[0] != "[" else "]").lower()
    return None


def _definitions(toks) -> tuple[set[str], dict[str, set]]:
    """Names the query defines (aliases, WITH tables) and, per alias, the names it stands for: more than one
    where subqueries reuse an alias (`T1` for a table in the outer query and another in a subquery)."""
    defined, alias_of = set(), {}
    for i, (kind, text, _) in enumerate(toks):
        name = _name(kind, text)
        if name is None:
            continue
        prev = toks[i - 1] if i else ("", "", 0)
        follows = toks[i + 1][1] if i + 1 < len(toks) else ""
        if prev[1].lower() == "as":  # ... AS name
            defined.add(name)
            alias_of.setdefault(name, set()).add(_name(*toks[i - 2][:2]) if i >= 2 else None)
        elif i and (prev[0] in ("str", "num") or prev[1] == ")" or _name(*prev[:2]) is not None):
            # right after an operand (a name, a literal, a closing parenthesis): an alias without AS
            defined.add(name)
            alias_of.setdefault(name, set()).add(_name(*prev[:2]))
        elif follows.lower() == "as" and i + 2 < len(toks) and toks[i + 2][1] == "(":  # WITH name AS (...)
            defined.add(name)
    return defined, alias_of


def unknown_names(sql: str, schema: dict[str, frozenset[str]]) -> list[str]:
    """The table and column names `sql` uses that are neither in `schema` (schema_names) nor defined by the
    query itself; a qualified one as `qualifier.name`. [] when every name exists. An unqualified column must
    belong to a table the query names; a qualified one to the table its qualifier stands for."""
    toks = sql_tokens(sql or "")
    defined, alias_of = _definitions(toks)
    used = {n for k, t, _ in toks if (n := _name(k, t)) in schema}  # tables the query names
    known = set(schema) | set().union(set(), *(schema[t] for t in used)) | defined | _BUILTIN
    bad = []
    for i, (kind, text, _) in enumerate(toks):
        name = _name(kind, text)
        if name is None:
            continue
        prev = toks[i - 1][1] if i else ""
        follows = toks[i + 1][1] if i + 1 < len(toks) else ""
        if follows in (".", "("):  # a qualifier (checked with its column) or a function call
            continue
        if prev == "." and i >= 2:
            qual = _name(*toks[i - 2][:2])
            stands = {qual} if qual in schema and qual not in defined else alias_of.get(qual, set())
            tables = {t for t in stands if t in schema}
            ok = name in _BUILTIN or any(name in schema[t] for t in tables)
            if not ok and (stands - tables or not tables):
                # (also) a subquery or WITH alias: a column of a table the query names, or a name it defines
                ok = qual in defined and name in known
            if not ok:
                bad.append(f"{qual}.{name}")
        elif name not in known and not (kind == "qid" and text[0] == '"'):  # "..." that is no name: a string
            bad.append(name)
    return bad


def invalid_reason(sql: str, db_path, timeout_s: float = 5.0) -> str | None:
    """Why `sql` is not a valid candidate on the database (its error, or the unknown names); None if valid."""
    _, err = execute_db(db_path, sql, timeout_s)
    if err is not None:
        return err
    bad = unknown_names(sql, schema_names(str(db_path)))
    return f"unknown names: {', '.join(bad)}" if bad else None


def first_valid(sqls: list[str], db_path, timeout_s: float = 5.0) -> int | None:
    """Index of the first valid query in `sqls` (each distinct query is run once), None when none is."""
    seen = set()
    for k, sql in enumerate(sqls):
        key = normalize_sql(sql)
        if key in seen:
            continue
        seen.add(key)
        if invalid_reason(sql, db_path, timeout_s) is None:
            return k
    return None


def beam_generator(num_beams: int):
    """beam_grouped with `num_beams`, in the signature qlora.evaluation.spider_eval.generate_all calls."""
    return functools.partial(beam_grouped, num_beams=num_beams)


def needs_beams(recs: list[dict], source: str) -> list[int]:
    """Indices of the scored rows whose greedy prediction is not valid (only those get candidates)."""
    return [r["index"] for r in recs if r["correct"] is not None and
            (r["error"] is not None or unknown_names(r["pred"], schema_names(str(database_path(source, r["db_id"])))))]


def choose_predictions(recs: list[dict], gold: dict, beams: dict, source: str, timeout_s: float = 5.0) -> None:
    """Turn the greedy report rows into schema-aware ones: each scored row keeps its greedy verdict as
    `greedy_pred`, `greedy_correct`, `greedy_exact`, `greedy_error`; `pred` (and `raw`, `correct`, ...) become
    the chosen candidate's; `candidate` says which: 0 greedy, k the k-th beam, None none valid (greedy kept).
    `beams`: {row index: [beam answer texts]} for the rows of needs_beams."""
    for rec in recs:
        if rec["correct"] is None:
            continue
        rec.update(greedy_pred=rec["pred"], greedy_correct=rec["correct"], greedy_exact=rec["exact"],
                   greedy_error=rec["error"], candidate=0)
        if rec["index"] not in beams:
            continue
        path = database_path(source, rec["db_id"])
        texts = [rec["raw"]] + list(beams[rec["index"]])
        k = first_valid([answer_sql(t) for t in texts], path, timeout_s)
        rec["candidate"] = k
        if k:
            pred = answer_sql(texts[k])
            res = score_db_row(path, rec["gold"], pred, timeout_s, gold_rows=gold[rec["index"]])
            rec.update(raw=texts[k], pred=pred, correct=res["exec_match"], exact=res["exact_match"], error=res["error"])


def plain_rows(recs: list[dict]) -> list[dict]:
    """The greedy column of a schema-aware report's rows, in the report's row format (for summarise)."""
    return [{**r, "pred": r["greedy_pred"], "correct": r["greedy_correct"], "exact": r["greedy_exact"],
             "error": r["greedy_error"]} if "greedy_pred" in r else r for r in recs]
