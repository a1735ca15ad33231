"""Row formatters: one dataset row -> a list of chat messages (`{"role", "content"}`).

Chosen by name (`path.jsonl:gretel_sql`) or detected from the columns. A row missing a required
field, or holding a non-string where text is needed, raises `DataError` naming the source, the row
and the field (`FIELDS` lists what each formatter reads).
"""

from __future__ import annotations

import re

from .errors import DataError
from .spider import spider_messages
from .sqlscore import sql_instruction


class MappedRow(dict):
    """A row whose file columns were renamed to a formatter's fields (`columns`: field -> column), so
    that errors can name the column as it is in the file."""

    def __init__(self, row: dict, columns: dict):
        sources = set(columns.values())
        super().__init__({k: v for k, v in row.items() if k not in sources})
        self.update({f: row[c] for f, c in columns.items() if c in row})
        self.columns, self.file_columns = dict(columns), list(row)


def kind_of(value) -> str:
    """'a number', 'a list', ... for messages about a value of the wrong type."""
    names = {str: "a string", bool: "true/false", list: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _label(row: dict, key: str) -> str:
    col = getattr(row, "columns", {}).get(key)
    return f"column '{col}' (mapped to field '{key}')" if col else f"field '{key}'"


def _need(row: dict, keys, where: str, text: bool = True) -> list:
    """The values of the required `keys`; a missing, null or (when `text`) non-string one is an error that
    names the field and what the row holds."""
    for k in keys:
        if k not in row:
            have = getattr(row, "file_columns", None) or sorted(row)
            have = ", ".join(map(str, have)) or "nothing"
            raise DataError(f"{where}: missing {_label(row, k)}; this row has only: {have} "
                            f"(this format needs {', '.join(keys)})")
        if row[k] is None:
            raise DataError(f"{where}: {_label(row, k)} is empty (null); this format needs text in {', '.join(keys)}")
        if text and not isinstance(row[k], str):
            raise DataError(f"{where}: {_label(row, k)} must be a string, found {kind_of(row[k])} "
                            f"({str(row[k])[:40]}): write it as text in the file")
    return [row[k] for k in keys]


def _opt(row: dict, key: str, where: str) -> str:
    """An optional text field: '' when absent or null."""
    v = row.get(key)
    if v is not None and not isinstance(v, str):
        raise DataError(f"{where}: {_label(row, key)} must be a string, found {kind_of(v)} ({str(v)[:40]})")
    return v or ""


def _turn(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


_INST = re.compile(r"\[INST\](.*?)\[/INST\](.*?)(?:</s>|$)", re.S)


def guanaco(row: dict, where: str = "row") -> list[dict]:
    """`text` in Llama-2 `<s>[INST] q [/INST] a </s><s>[INST] q2 [/INST] a2 </s>` form, any number of turns."""
    (text,) = _need(row, ["text"], where)
    turns = _INST.findall(text)
    if not turns:
        raise DataError(f"{where}: field 'text' has no '[INST] ... [/INST] ...' turn")
    messages = []
    for q, a in turns:
        q = q.strip()
        if q.startswith("<<SYS>>") and "<</SYS>>" in q:
            system, q = q[len("<<SYS>>"):].split("<</SYS>>", 1)
            if not messages:
                messages.append({"role": "system", "content": system.strip()})
            q = q.strip()
        messages += _turn(q, a.strip())
    return messages


def gretel_sql(row: dict, where: str = "row") -> list[dict]:
    """gretelai/synthetic_text_to_sql: schema + question -> SQL (explanation, when present, is not trained on:
    it would make the answer harder to extract and score)."""
    question, context, sql = _need(row, ["sql_prompt", "sql_context", "sql"], where)
    prompt = f"{sql_instruction(context, question)}"
    return _turn(prompt, sql.strip())


def bird_reasoning(row: dict, where: str = "row") -> list[dict]:
    """meowterspace45/bird-sql-train-with-reasoning: schema, question, evidence -> reasoning then SQL."""
    schema, question, sql = _need(row, ["schema", "question", "SQL"], where)
    reasoning = _opt(row, "reasoning_trace", where).strip()
    answer = f"{reasoning}\n\nSQL: {sql.strip()}" if reasoning else sql.strip()
    return _turn(sql_instruction(schema, question, _opt(row, "evidence", where)), answer)


def prompt_response(row: dict, where: str = "row") -> list[dict]:
    """Generic `prompt`/`response` columns (optional `system`)."""
    prompt, response = _need(row, ["prompt", "response"], where)
    system = _opt(row, "system", where)
    return ([{"role": "system", "content": system}] if system else []) + _turn(prompt, response)


def input_output(row: dict, where: str = "row") -> list[dict]:
    """Generic `input`/`output` columns, with an optional `instruction` (Alpaca style)."""
    inp, out = _need(row, ["input", "output"], where)
    instruction = _opt(row, "instruction", where)
    prompt = f"{instruction}\n\n{inp}".strip() if instruction else inp
    return _turn(prompt, out)


def _message_text(content, where: str, field: str) -> str:
    """A message's text: a string, or the OpenAI list of text parts `[{"type": "text", "text": "..."}, ...]`
    joined with newlines. Null, a number, an object or any other part (an image, audio) is an error."""
    if isinstance(content, str):
        return content
    if content is None:
        raise DataError(f"{where}: {field} is empty (null): give every message its text as a string")
    if isinstance(content, list) and content:
        for k, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and not isinstance(part.get("text"), str):
                raise DataError(f"{where}: {field} part {k} 'text' must be a string, found "
                                f"{kind_of(part.get('text'))}: write the part's text as a string")
            if not (isinstance(part, dict) and part.get("type") == "text"):
                shown = part.get("type") if isinstance(part, dict) and isinstance(part.get("type"), str) else None
                what = f"a part of type {shown!r}" if shown and shown != "text" else kind_of(part)
                raise DataError(f"{where}: {field} part {k} is {what}, not a text part {{\"type\": \"text\", "
                                f"\"text\": \"...\"}}: only text can be trained on; write the content as a string")
        return "\n".join(part["text"] for part in content)
    raise DataError(f"{where}: {field} must be a string (or a list of {{\"type\": \"text\", \"text\": ...}} "
                    f"parts), found {kind_of(content)} ({str(content)[:40]}): write the message's text as a string")


def messages(row: dict, where: str = "row") -> list[dict]:
    """Chat `messages`: a list of {role, content} with roles system/user/assistant; a content is a string
    or a list of text parts (`_message_text`)."""
    (msgs,) = _need(row, ["messages"], where, text=False)
    label, name = _label(row, "messages"), getattr(row, "columns", {}).get("messages", "messages")
    if not isinstance(msgs, list) or not msgs:
        found = "an empty list" if msgs == [] else kind_of(msgs)
        raise DataError(f"{where}: {label} must be a non-empty list of {{role, content}}, found {found}")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {name}[{j}] needs 'role' and 'content'")
        if not isinstance(m["role"], str):
            raise DataError(f"{where}: {name}[{j}] 'role' must be a string (system, user or assistant), "
                            f"found {kind_of(m['role'])}")
        role = {"human": "user", "gpt": "assistant", "bot": "assistant"}.get(m["role"], m["role"])
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: {name}[{j}] has unknown role {m['role']!r}")
        out.append({"role": role, "content": _message_text(m["content"], where, f"{name}[{j}] 'content'")})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: 'messages' has no assistant turn to learn from")
    return out


def spider(row: dict, where: str = "row", source: str = "") -> list[dict]:
    """Spider 1.0 (`question`, `query`, `db_id`): the schema of `<source dir>/database/<db_id>/<db_id>.sqlite`
    + the question -> the gold SQL (qlora.data.spider)."""
    return spider_messages(row, where, source)


def spider_linked(row: dict, where: str = "row", source: str = "") -> list[dict]:
    """`spider` with the schema linked to the question: the tables it names whole, the others as
    `name(col, ...)` (qlora.data.schema_link). Score with `--data dev.json:spider_linked`."""
    return spider_messages(row, where, source, linked=True)


spider.needs_source = True  # build_examples passes the data file's path (the databases sit beside it)
spider_linked.needs_source = True

FORMATTERS = {
    "guanaco": guanaco,
    "gretel_sql": gretel_sql,
    "bird_reasoning": bird_reasoning,
    "prompt_response": prompt_response,
    "input_output": input_output,
    "messages": messages,
    "spider": spider,
    "spider_linked": spider_linked,
}

# the fields each formatter reads: (required, optional); `columns` in a source maps them to a file's columns
FIELDS = {
    "guanaco": (("text",), ()),
    "gretel_sql": (("sql_prompt", "sql_context", "sql"), ()),
    "bird_reasoning": (("schema", "question", "SQL"), ("evidence", "reasoning_trace")),
    "prompt_response": (("prompt", "response"), ("system",)),
    "input_output": (("input", "output"), ("instruction",)),
    "messages": (("messages",), ()),
    "spider": (("question", "query", "db_id"), ()),
    "spider_linked": (("question", "query", "db_id"), ()),
}

# (formatter, columns that identify it), most specific first
_SIGNATURES = [
    ("gretel_sql", {"sql_prompt", "sql_context", "sql"}),
    ("bird_reasoning", {"schema", "question", "SQL"}),
    ("spider", {"question", "query", "db_id"}),
    ("messages", {"messages"}),
    ("prompt_response", {"prompt", "response"}),
    ("input_output", {"input", "output"}),
    ("guanaco", {"text"}),
]


def detect_formatter(rows: list[dict], where: str) -> str:
    """Pick a formatter from the columns of the rows (all of them: a row that lacks a field is then
    reported as such, wherever it is, rather than making the whole file unrecognisable)."""
    cols = {k for row in rows for k in row}
    for name, need in _SIGNATURES:
        if need <= cols:
            return name
    raise DataError(f"dataset {where}: cannot tell the format from its columns ({', '.join(sorted(cols))}); "
                    f"name a formatter as '{where}:NAME' with NAME one of {', '.join(FORMATTERS)}, and map your "
                    f"columns to its fields if they differ, e.g. '{where}:prompt_response?prompt=COL&response=COL'")
