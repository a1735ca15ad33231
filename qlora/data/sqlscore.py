"""Text-to-SQL: the instruction every SQL formatter gives the model, and scoring: pull SQL out of model
output, run it in sqlite, compare with the gold query.

Two metrics per row, the usual pair for text-to-SQL:

* execution match -- gold and prediction, each run on a fresh in-memory sqlite db built from the row's
  ``sql_context``, return the same values. This is the metric that matters: it accepts aliases, other
  whitespace/case and different-but-equivalent queries.
* exact match -- the normalised SQL strings are equal. Strict, cheap, reported for reference only.

Rows whose *gold* query does not run in sqlite (MySQL-only functions, ``CREATE SCHEMA``, broken context)
are skipped rather than counted as wrong: we cannot tell what the right answer is.
``execute_db``/``score_db_row`` do the same against a database *file* (Spider), opened read-only.
Pure Python and stdlib only, so it runs anywhere the evaluation does.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time

__all__ = ["sql_instruction", "extract_sql", "normalize_sql", "collapse_whitespace", "sql_tokens", "execute", "execute_db", "results_equal",
           "score_row", "score_db_row", "score_rows"]

# One regex tokenizer shared by normalize_sql, the ORDER BY check and the ';' cut, so string literals and
# comments are recognised the same way everywhere (a ';' or 'ORDER BY' inside a literal means nothing).
_TOKEN_RE = re.compile(
    r"""(?P<ws>\s+)
      | (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
      | (?P<str>'(?:[^']|'')*'?)                       # '' is an escaped quote; unterminated is tolerated
      | (?P<qid>"(?:[^"]|"")*"?|`[^`]*`?|\[[^\]]*\]?)  # quoted identifiers: kept verbatim like strings
      | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
      | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
      | (?P<op><=|>=|<>|!=|==|\|\||<<|>>|[-+*/%<>=~&|])
      | (?P<other>.)""",
    re.X | re.S,
)


def sql_tokens(sql: str) -> list[tuple[str, str, int]]:
    """(kind, text, start offset) for every token, whitespace and comments dropped."""
    return [(m.lastgroup, m.group(), m.start()) for m in _TOKEN_RE.finditer(sql)
            if m.lastgroup not in ("ws", "comment")]


def sql_instruction(context: str, question: str, evidence: str = "") -> str:
    """The prompt shared by training and evaluation of text-to-SQL rows."""
    hint = f"\n\nHint: {evidence.strip()}" if evidence and evidence.strip() else ""
    return (f"Database schema:\n{context.strip()}\n\nQuestion: {question.strip()}{hint}\n\n"
            "Write one SQLite query that answers the question.")


_SQL_START = r"(?:SELECT|WITH|INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER)\b"
_STARTS_SQL = re.compile(r"\s*(?:" + _SQL_START + r"|\()", re.I)
_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n?(.*?)(?:```|\Z)", re.S)
_UPPER_SQL_START = re.compile(r"\s*" + _SQL_START)  # case-sensitive: prose says "Select ..." too
_UPPER_SQL_ANY = re.compile(r"\b" + _SQL_START)
# "SQL:", "SQL query:", "Answer:", "Final answer:" -- the labels models put in front of the query.
_LABEL_RE = re.compile(r"\b(?:final\s+)?(?:sql(?:\s*query)?|answer|query)\s*:[ \t]*", re.I)


def _starts_sql(body: str) -> bool:
    """Whether `body`'s first token (comments skipped) opens a statement: a SQL keyword or '('."""
    toks = sql_tokens(body)
    return bool(toks) and (toks[0][1] == "(" or bool(re.fullmatch(_SQL_START, toks[0][1], re.I)))


def _fence_segments(text: str) -> list[tuple[str, str, bool]]:
    """(lang, body, paired) for every stretch of `text` between two consecutive ``` markers (the last one
    running to the end), plus the text before the first marker.

    ``paired`` is True for the blocks that strict left-to-right pairing of the markers opens (the 1st, 3rd,
    ... marker); the others sit between a closing and an opening marker, or before the first one. A stray
    closing fence shifts that pairing by one, so the real query may be in either kind of stretch; looking
    at all of them lets the caller pick by content. ``lang`` is the info word after the marker that opens
    the stretch ("" for the text before the first marker). A marker's body starts on the next line.
    """
    marks = [m.start() for m in re.finditer("```", text)]
    out = [("", text[:marks[0]], False)] if marks and text[:marks[0]].strip() else []
    for i, at in enumerate(marks):
        end = marks[i + 1] if i + 1 < len(marks) else len(text)
        nl = text.find("\n", at + 3)
        start = min(nl + 1 if nl >= 0 else len(text), end)
        lang = re.match(r"[ \t]*([\w+-]*)", text[at + 3:start]).group(1).lower()
        out.append((lang, text[start:end], i % 2 == 0))
    return out


def _pick_fenced(text: str) -> str | None:
    """The stretch of a fenced answer that holds the query, None if every fenced block is empty.

    Best first: a block tagged sql that starts like SQL; a properly paired block that starts like SQL; any
    other stretch starting with an uppercase SQL keyword; a block tagged sql; a paired block mentioning a
    SQL keyword; any other stretch that starts like SQL or names an uppercase keyword; the first paired
    block. So a stray fence (a bare query, then ``` Output: ```) never makes a non-SQL stretch win over one
    that looks like SQL. Ties go to paired blocks, then to the earlier stretch.
    """
    segs = [(lang, body, paired) for lang, body, paired in _fence_segments(text) if body.strip()]
    if not any(paired for _, _, paired in segs):
        return None
    tagged = lambda lang: lang in ("sql", "sqlite")  # noqa: E731
    tiers = (
        lambda lang, b, paired: tagged(lang) and _starts_sql(b),
        lambda lang, b, paired: paired and _starts_sql(b),
        lambda lang, b, paired: not paired and bool(_UPPER_SQL_START.match(b)),
        lambda lang, b, paired: tagged(lang),
        lambda lang, b, paired: paired and bool(re.search(_SQL_START, b, re.I)),
        lambda lang, b, paired: not paired and (_starts_sql(b) or bool(_UPPER_SQL_ANY.search(b))),
        lambda lang, b, paired: paired,
    )
    for keep in tiers:
        hits = [seg for seg in segs if keep(*seg)]
        if hits:
            return min(hits, key=lambda seg: not seg[2])[1]  # stable: paired first, then position
    return None


def extract_sql(text: str) -> str:
    """The first SQL statement in a model's answer, ';' kept, whitespace trimmed ('' if there is none).

    Handles ```sql fences (an unclosed one too: generation may stop mid-block), "SQL:"/"Answer:" labels
    and "reasoning ... SQL: SELECT ..." answers. Without a ';' the statement ends at the first blank line,
    so an explanation written after the query is not glued onto it.
    """
    text = text or ""
    if "```" in text:
        block = _pick_fenced(text)
        text = block if block is not None else _FENCE_RE.sub("", text)  # only empty fences: what is outside
    # Already SQL: leave labels alone, they could sit in a literal (WHERE note = 'Answer: yes').
    labels = [] if _STARTS_SQL.match(text) else list(_LABEL_RE.finditer(text))
    if labels:  # first label followed by something SQL-like; else the last label (reasoning comes first)
        good = [m for m in labels if _STARTS_SQL.match(text, m.end())]
        text = text[(good or labels[-1:])[0].end():]
    if not _STARTS_SQL.match(text):
        # Unlabelled reasoning before the query: find where the SQL starts. Uppercase keywords first,
        # since prose says "we select the rows ..." in lowercase far more often than SQL does.
        for pattern, flags in ((r"(?m)^[ \t]*" + _SQL_START, 0), (r"\b" + _SQL_START, 0),
                               (r"(?m)^[ \t]*" + _SQL_START, re.I)):
            m = re.search(pattern, text, flags)
            if m:
                text = text[m.start():]
                break
    for kind, tok, pos in sql_tokens(text):
        if tok == ";":
            return text[:pos + 1].strip()
    return re.split(r"\n[ \t]*\n", text.strip(), maxsplit=1)[0].strip()


_NO_SPACE_BEFORE = {",", ")", "(", ".", ";"}
_NO_SPACE_AFTER = {"(", "."}


def normalize_sql(sql: str) -> str:
    """Canonical form for exact match: lowercase outside literals, one space between tokens except none
    before ``, ) ( .`` and after ``( .``, comments and trailing ';' dropped. String literals and quoted
    identifiers are kept verbatim ('Paris' and 'paris' are different queries)."""
    toks = [(k, t if k in ("str", "qid") else t.lower()) for k, t, _ in sql_tokens(sql or "")]
    while toks and toks[-1][1] == ";":
        toks.pop()
    out: list[str] = []
    for i, (_, t) in enumerate(toks):
        if i and t not in _NO_SPACE_BEFORE and toks[i - 1][1] not in _NO_SPACE_AFTER:
            out.append(" ")
        out.append(t)
    return "".join(out)


def collapse_whitespace(sql: str) -> str:
    """``sql`` with every run of whitespace outside literals and comments made one space, ends trimmed
    (Spider's gold queries space operators with two blanks: ``age  >  56``)."""
    return "".join(" " if m.lastgroup == "ws" else m.group() for m in _TOKEN_RE.finditer(sql or "")).strip()


def _has_top_level_order_by(sql: str) -> bool:
    """ORDER BY outside any parentheses, i.e. not in a subquery, CTE body or window's OVER (...)."""
    depth, prev = 0, None
    for kind, tok, _ in sql_tokens(sql):
        low = tok.lower() if kind == "word" else tok
        depth += (low == "(") - (low == ")")
        if depth == 0 and prev == "order" and low == "by":
            return True
        prev = low
    return False


def _snapshot(conn: sqlite3.Connection) -> list[tuple]:
    """Whole-database state, for statements without a result set (INSERT/UPDATE/DELETE/DROP/...).

    Without it every such statement "returns" [] and any DML would match any other DML gold, or a
    SELECT with an empty result. Each table gives a ("schema:<name>", *columns) row and one
    ("table:<name>", *values) row per record, sorted so the snapshot is deterministic.
    """
    out: list[tuple] = []
    names = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    for name in sorted(names, key=str.lower):
        quoted = '"' + name.replace('"', '""') + '"'
        cur = conn.execute(f"SELECT * FROM {quoted}")
        out.append(("schema:" + name.lower(), *[d[0].lower() for d in cur.description]))
        out.extend(sorted((("table:" + name.lower(), *r) for r in cur.fetchall()), key=_row_key))
    return out


def _guard(conn: sqlite3.Connection, timeout_s: float):
    """Arm a progress handler on ``conn``; returns ``restart()``, which gives the next phase ``timeout_s``.

    sqlite calls the handler every 1000 VM instructions and a non-zero return makes it raise "interrupted":
    without it a recursive CTE with no stop condition, or a many-way cross join, hangs the evaluation."""
    deadline = [0.0]
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline[0]), 1000)

    def restart():
        deadline[0] = time.monotonic() + timeout_s
    return restart


def _error(phase: str, e: Exception, timeout_s: float) -> str:
    if "interrupted" in str(e):
        return f"{phase}: timeout after {timeout_s:g}s"
    return f"{phase}: {type(e).__name__}: {e}"


_DB_ERRORS = (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError)


def execute(context: str, sql: str, timeout_s: float = 2.0) -> tuple[list[tuple] | None, str | None]:
    """Run ``context`` (a script) then ``sql`` in a fresh in-memory sqlite db: (rows, None) or (None, error).

    Each phase gets ``timeout_s`` (see _guard). For a statement that returns no result set, ``rows`` is a
    snapshot of the database afterwards (see _snapshot), so DML is scored by effect.
    """
    if not (sql or "").strip():
        return None, "empty query"
    conn = sqlite3.connect(":memory:")
    restart = _guard(conn, timeout_s)
    phase = "context"
    try:
        restart()
        conn.executescript(context or "")
        phase = "query"
        restart()
        cur = conn.execute(sql)
        if cur.description is None:
            restart()
            return _snapshot(conn), None
        return cur.fetchall(), None
    except _DB_ERRORS as e:
        return None, _error(phase, e, timeout_s)
    finally:
        conn.close()


def execute_db(db_path, sql: str, timeout_s: float = 5.0) -> tuple[list[tuple] | None, str | None]:
    """Run ``sql`` on the sqlite file ``db_path`` opened read-only: (rows, None) or (None, error).

    Read-only (``mode=ro``), so a predicted INSERT/DROP fails instead of changing the benchmark's files;
    a statement without a result set is an error. Fetching counts towards ``timeout_s``.
    """
    if not (sql or "").strip():
        return None, "empty query"
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    except sqlite3.Error as e:
        return None, f"database {db_path}: {e}"
    restart = _guard(conn, timeout_s)
    try:
        restart()
        cur = conn.execute(sql)
        if cur.description is None:
            return None, "query: statement returns no rows"
        return cur.fetchall(), None
    except _DB_ERRORS as e:
        return None, _error("query", e, timeout_s)
    finally:
        conn.close()


def _canon(v):
    """Value as compared: floats rounded to 6 significant digits, integral numbers as int (2.0 == 2)."""
    if isinstance(v, float) and math.isfinite(v):
        if not v.is_integer():
            v = float(f"{v:.6g}")
        if v.is_integer() and abs(v) < 2**53:
            return int(v)
    return v


def _value_key(v) -> tuple:
    """Type-tagged sort key: None < numbers < text < blobs, so mixed columns sort without TypeError."""
    if v is None:
        return (0, 0)
    if isinstance(v, (int, float)):
        return (1, v)
    if isinstance(v, str):
        return (2, v)
    if isinstance(v, bytes):
        return (3, v)
    return (4, repr(v))


def _row_key(row: tuple) -> tuple:
    return tuple(_value_key(v) for v in row)


def results_equal(gold: list[tuple], pred: list[tuple], ordered: bool) -> bool:
    """Values only (column names never reach here), column order matters, row order only if ``ordered``."""
    g = [tuple(_canon(v) for v in r) for r in gold]
    p = [tuple(_canon(v) for v in r) for r in pred]
    if not ordered:  # multiset comparison
        g, p = sorted(g, key=_row_key), sorted(p, key=_row_key)
    return g == p


def _verdict(gold_sql: str, pred_sql: str, gold: tuple, pred: tuple) -> dict:
    """score_row's dict from the (rows, error) pairs of the gold and the predicted query."""
    ordered = _has_top_level_order_by(gold_sql or "")
    return {"gold_ok": gold[1] is None, "pred_ok": pred[1] is None,
            "exec_match": gold[0] is not None and pred[0] is not None and results_equal(gold[0], pred[0], ordered),
            "exact_match": normalize_sql(gold_sql) == normalize_sql(pred_sql),
            "error": pred[1], "gold_error": gold[1], "order_sensitive": ordered}


def score_row(context: str, gold_sql: str, pred_sql: str, timeout_s: float = 2.0) -> dict:
    """Score one already-extracted prediction against the gold query; each runs on its own fresh db.

    Order-sensitive only when the gold query has a top-level ORDER BY. Known limit: ties under that
    ORDER BY may legitimately come back in another order and are then counted wrong.
    """
    return _verdict(gold_sql, pred_sql, execute(context, gold_sql, timeout_s), execute(context, pred_sql, timeout_s))


def score_db_row(db_path, gold_sql: str, pred_sql: str, timeout_s: float = 5.0, gold_rows=None) -> dict:
    """score_row against the sqlite file ``db_path`` (read-only). ``gold_rows``: the gold result when the
    caller already has it (it is then not run again)."""
    gold = (gold_rows, None) if gold_rows is not None else execute_db(db_path, gold_sql, timeout_s)
    return _verdict(gold_sql, pred_sql, gold, execute_db(db_path, pred_sql, timeout_s))


def score_rows(rows: list[dict], timeout_s: float = 2.0) -> dict:
    """Aggregate over rows with ``sql_context``, ``sql`` (gold) and ``prediction`` (raw model text).

    Rates are over *scored* rows (gold executed); 0.0 when none was scored. ``details`` holds one dict
    per input row, in order: score_row's keys plus ``index``, ``id`` (if the row has one) and the
    extracted ``pred_sql``.
    """
    details = []
    for i, row in enumerate(rows):
        pred_sql = extract_sql(row.get("prediction") or "")
        res = score_row(row.get("sql_context") or "", row.get("sql") or "", pred_sql, timeout_s)
        details.append({"index": i, "id": row.get("id"), "pred_sql": pred_sql, **res})
    scored = [d for d in details if d["gold_ok"]]
    n = len(scored)

    def rate(key: str, want=True) -> float:
        return sum(d[key] is want for d in scored) / n if n else 0.0

    return {
        "n": len(details),
        "n_scored": n,
        "n_skipped_gold_failed": len(details) - n,
        "execution_accuracy": rate("exec_match"),
        "exact_match": rate("exact_match"),
        "pred_error_rate": rate("pred_ok", False),
        "details": details,
    }
