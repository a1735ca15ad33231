"""Schema linking for Spider prompts: the tables a question touches keep their whole `CREATE TABLE` line,
the others shrink to their name and column names.

Most wrong answers of a fine-tuned small model on Spider dev fail with `no such column`: the model invents
names. The `spider_linked` formatter tries a prompt that points it at the right tables. A table is linked when
the question shares a word with its name or with one of its columns' names (lower-cased, split at `_`, case
changes and non-letters, a plural `s` dropped: "singers" links `singer`, "song names" links `song_name`), or
when one of its cells equals a word or two-word phrase of the question (text columns only, up to
`VALUE_SCAN_ROWS` rows a table: "singers from the Netherlands" links the table with a cell 'Netherlands').
Linked tables come first, in the database's order, as the `spider` formatter writes them; then one line
`-- other tables: name(col, col), ...`. When nothing is linked the prompt is the whole schema, unchanged.

The same function builds the training prompt and the evaluation prompt, from the question and the database
alone (never from the gold query), so what the model sees at test time is what it was trained on.
`link_recall` measures the heuristic against gold queries: the share of the tables a gold query uses that
the linker kept whole.
"""

from __future__ import annotations

import functools
import re
import sqlite3

from .errors import DataError
from .spider import compact_create, connect_ro, user_tables
from .sqlscore import sql_tokens

__all__ = ["linked_schema", "linked_tables", "words", "link_recall"]

VALUE_SCAN_ROWS = 2000  # rows per table read for value matching (Spider tables are small; caps the odd big one)
_STOP = set("""a an and are as at be by did do does each for from had has have how in is it its list many me
much of on or per show than that the their them there these they this those to was were what when where
which who whose with all any give find name names number count""".split())
_SPLIT = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")


def _stem(w: str) -> str:
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def words(text: str) -> list[str]:
    """Lower-cased, stemmed word pieces of a name or a question: `songName`, `song_name` and "song names"
    all give ['song', 'name']."""
    return [_stem(m.group().lower()) for m in _SPLIT.finditer(text.replace("_", " "))]


@functools.lru_cache(maxsize=256)
def _tables(path: str) -> tuple:
    """((name, compact CREATE line, column names, {lower-cased text cell values}), ...) in sqlite_master order."""
    conn = connect_ro(path)
    try:
        out = []
        for name, sql in user_tables(conn):
            quoted = '"' + name.replace('"', '""') + '"'
            cols = [r[1] for r in conn.execute(f"PRAGMA table_info({quoted})")]
            values = set()
            for row in conn.execute(f"SELECT * FROM {quoted} LIMIT {VALUE_SCAN_ROWS}"):
                values.update(v.strip().lower() for v in row if isinstance(v, str) and 0 < len(v.strip()) <= 40)
            out.append((name, compact_create(sql) + ";", tuple(cols), frozenset(values)))
        return tuple(out)
    except sqlite3.Error as e:
        raise DataError(f"database {path}: cannot read its schema ({e}); is it a Spider .sqlite file?") from None
    finally:
        conn.close()


def linked_tables(path: str, question: str) -> list[str]:
    """Names of the tables `question` links to (module doc), in the database's order."""
    q = {w for w in words(question) if w not in _STOP}
    raw = re.findall(r"[a-z0-9]+(?:[.'-][a-z0-9]+)*", question.lower())
    phrases = set(raw) | {" ".join(raw[i:i + 2]) for i in range(len(raw) - 1)} | \
        {" ".join(raw[i:i + 3]) for i in range(len(raw) - 2)}
    phrases -= _STOP
    out = []
    for name, _, cols, values in _tables(path):
        names = set(words(name)) | {w for c in cols for w in words(c)}
        if q & (names - _STOP) or phrases & values:
            out.append(name)
    return out


def linked_schema(path: str, question: str) -> str:
    """The prompt's schema for `question`: linked tables whole, the rest as `name(col, ...)` on one line."""
    tables = _tables(path)
    keep = set(linked_tables(path, question))
    if not keep:
        return "\n".join(t[1] for t in tables)
    lines = [t[1] for t in tables if t[0] in keep]
    rest = [f"{t[0]}({', '.join(t[2])})" for t in tables if t[0] not in keep]
    if rest:
        lines.append("-- other tables: " + ", ".join(rest))
    return "\n".join(lines)


def gold_tables(path: str, query: str) -> set[str]:
    """The database's tables (lower-cased) that a gold query names."""
    names = {t[0].lower() for t in _tables(path)}
    return {text.strip('"`[]').lower() for kind, text, _ in sql_tokens(query) if kind in ("word", "qid")} & names


def link_recall(path: str, question: str, query: str) -> tuple[int, int]:
    """(gold tables the linker kept whole, gold tables) for one row."""
    gold = gold_tables(path, query)
    kept = {t.lower() for t in linked_tables(path, question)} or {t[0].lower() for t in _tables(path)}
    return len(gold & kept), len(gold)
