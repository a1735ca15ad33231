"""Row formatters: one dataset row -> a list of chat messages (`{"role", "content"}`).

Chosen by name (`path.jsonl:gretel_sql`) or detected from the columns. A row missing a required
field raises `DataError` naming the source, the row and the field.
"""

from __future__ import annotations

import re


class DataError(ValueError):
    """Bad data: the message names the file, row or field and what to do."""


def _need(row: dict, keys, where: str):
    for k in keys:
        if k not in row or row[k] is None:
            raise DataError(f"{where}: missing required field '{k}' (row has {', '.join(sorted(row))})")
    return [row[k] for k in keys]


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


def sql_instruction(context: str, question: str, evidence: str = "") -> str:
    """The prompt shared by training and evaluation of text-to-SQL rows."""
    hint = f"\n\nHint: {evidence.strip()}" if evidence and evidence.strip() else ""
    return (f"Database schema:\n{context.strip()}\n\nQuestion: {question.strip()}{hint}\n\n"
            "Write one SQLite query that answers the question.")


def bird_reasoning(row: dict, where: str = "row") -> list[dict]:
    """meowterspace45/bird-sql-train-with-reasoning: schema, question, evidence -> reasoning then SQL."""
    schema, question, sql = _need(row, ["schema", "question", "SQL"], where)
    reasoning = (row.get("reasoning_trace") or "").strip()
    answer = f"{reasoning}\n\nSQL: {sql.strip()}" if reasoning else sql.strip()
    return _turn(sql_instruction(schema, question, row.get("evidence") or ""), answer)


def prompt_response(row: dict, where: str = "row") -> list[dict]:
    """Generic `prompt`/`response` columns (optional `system`)."""
    prompt, response = _need(row, ["prompt", "response"], where)
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return system + _turn(str(prompt), str(response))


def input_output(row: dict, where: str = "row") -> list[dict]:
    """Generic `input`/`output` columns, with an optional `instruction` (Alpaca style)."""
    inp, out = _need(row, ["input", "output"], where)
    instruction = row.get("instruction") or ""
    prompt = f"{instruction}\n\n{inp}".strip() if instruction else str(inp)
    return _turn(prompt, str(out))


def messages(row: dict, where: str = "row") -> list[dict]:
    """Chat `messages`: a list of {role, content} with roles system/user/assistant."""
    (msgs,) = _need(row, ["messages"], where)
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{j}] needs 'role' and 'content'")
        role = {"human": "user", "gpt": "assistant", "bot": "assistant"}.get(m["role"], m["role"])
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: messages[{j}] has unknown role {m['role']!r}")
        out.append({"role": role, "content": str(m["content"])})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: 'messages' has no assistant turn to learn from")
    return out


FORMATTERS = {
    "guanaco": guanaco,
    "gretel_sql": gretel_sql,
    "bird_reasoning": bird_reasoning,
    "prompt_response": prompt_response,
    "input_output": input_output,
    "messages": messages,
}

# (formatter, columns that identify it), most specific first
_SIGNATURES = [
    ("gretel_sql", {"sql_prompt", "sql_context", "sql"}),
    ("bird_reasoning", {"schema", "question", "SQL"}),
    ("messages", {"messages"}),
    ("prompt_response", {"prompt", "response"}),
    ("input_output", {"input", "output"}),
    ("guanaco", {"text"}),
]


def detect_formatter(rows: list[dict], where: str) -> str:
    """Pick a formatter from the first row's columns."""
    cols = set(rows[0]) if rows else set()
    for name, need in _SIGNATURES:
        if need <= cols:
            return name
    raise DataError(f"dataset {where}: cannot tell the format from its columns ({', '.join(sorted(cols))}); "
                    f"name a formatter as '{where}:NAME' with NAME one of {', '.join(FORMATTERS)}")
