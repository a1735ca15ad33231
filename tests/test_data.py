"""Formatters, rendering and response-only labels (qlora/data/formatters.py, qlora/data/examples.py).

The central property: for every formatter, the decoded supervised tokens are exactly each
assistant response followed by EOS (with the whitespace between them), and nothing else.
"""

import copy
import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qlora.data.examples import IGNORE, DataStats, Source, build_examples, encode, load_datasets, load_rows, mix, parse_source
from qlora.data.formatters import FIELDS, FORMATTERS, DataError, detect_formatter

from conftest import shared_file
from helpers import supervised_text

BIRD_ROWS = [  # written in the schema of meowterspace45/bird-sql-train-with-reasoning
    {"db_id": "shop", "schema": "CREATE TABLE orders (id INT, amount REAL);", "question": "Total order amount?",
     "evidence": "amount is in dollars", "reasoning_trace": "Sum the amount column over all orders.",
     "SQL": "SELECT SUM(amount) FROM orders;"},
    {"db_id": "hr", "schema": "CREATE TABLE emp (name TEXT, dept TEXT);", "question": "How many in Sales?",
     "evidence": "", "reasoning_trace": "Count rows where dept is Sales.",
     "SQL": "SELECT COUNT(*) FROM emp WHERE dept = 'Sales';"},
]

ROWS = {
    "guanaco": [{"text": "<s>[INST] What is 2+2? [/INST] It is 4. </s>"},
                {"text": "<s>[INST] Hi [/INST] Hello! How can I help? </s><s>[INST] Tell a joke [/INST] "
                         "Why did the chicken cross the road? </s>"}],
    "gretel_sql": [{"sql_prompt": "Count users", "sql_context": "CREATE TABLE u (id INT);",
                    "sql": "SELECT COUNT(*) FROM u;", "sql_explanation": "counts"}],
    "bird_reasoning": BIRD_ROWS,
    "prompt_response": [{"prompt": "Say hi", "response": "hi"}, {"prompt": "x", "response": "y", "system": "Be brief."}],
    "input_output": [{"instruction": "Translate", "input": "bonjour", "output": "hello"}],
    "messages": [{"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b."},
                               {"role": "user", "content": "c?"}, {"role": "assistant", "content": "d."}]}],
}


def expected_responses(messages):
    return [m["content"].strip() for m in messages if m["role"] == "assistant"]


def no_template(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


@pytest.mark.parametrize("template", [True, False], ids=["chat_template", "llama2_inst"])
@pytest.mark.parametrize("name", sorted(ROWS))
def test_supervised_tokens_are_exactly_response_plus_eos(tok, name, template):
    tk = tok if template else no_template(tok)
    for row in ROWS[name]:
        msgs = FORMATTERS[name](row)
        ex, why = encode(msgs, tk, 1024)
        assert ex is not None, why
        got = supervised_text(tk, ex)
        assert got.endswith(tk.eos_token)
        # BPE tokens carry their leading space, so a response's first token may start with one
        assert [s.strip() for s in got.split(tk.eos_token)[:-1]] == expected_responses(msgs)
        assert got.count(tk.eos_token) == len(expected_responses(msgs))
        assert ex.labels[0] == IGNORE
        # labels are either ignored or the token itself (no shifting in the dataset)
        assert all(lab in (IGNORE, tid) for lab, tid in zip(ex.labels, ex.input_ids))


@pytest.mark.parametrize("template", [True, False], ids=["chat_template", "llama2_inst"])
@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_response_is_supervised_without_a_gap_through_its_eos(tok, name, template):
    """From a response's first token through the EOS that closes it, every token is supervised. In the
    Llama-2 rendering (`answer </s>`) the space before EOS is a token of its own; left unsupervised, the
    model never learns to write it, so at inference it never reaches EOS and runs on to max_new_tokens."""
    tk = tok if template else no_template(tok)
    for row in ROWS[name]:
        msgs = FORMATTERS[name](row)
        ex, why = encode(msgs, tk, 1024)
        assert ex is not None, why
        runs, run = [], []
        for tid, label in zip(ex.input_ids, ex.labels):
            if label != IGNORE:
                run.append(tid)
            elif run:
                runs, run = runs + [run], []
        runs += [run] if run else []
        assert len(runs) == len(expected_responses(msgs)), [tk.decode(r) for r in runs]
        assert all(r[-1] == tk.eos_token_id and tk.eos_token_id not in r[:-1] for r in runs)


def test_chat_template_render_is_what_the_model_sees(tok):
    ex, _ = encode(FORMATTERS["guanaco"](ROWS["guanaco"][0]), tok, 1024)
    text = tok.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\nIt is 4.<|im_end|>\n")


def test_exactly_one_bos_when_the_tokenizer_adds_one(tok):
    from tokenizers import processors

    tk = no_template(tok)
    tk._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tk.bos_token} $A", special_tokens=[(tk.bos_token, tk.bos_token_id)])
    assert tk("a")["input_ids"][0] == tk.bos_token_id
    ex, _ = encode(FORMATTERS["guanaco"](ROWS["guanaco"][1]), tk, 1024)
    assert ex.input_ids[0] == tk.bos_token_id and ex.input_ids.count(tk.bos_token_id) == 1
    ex2, _ = encode(FORMATTERS["guanaco"](ROWS["guanaco"][1]), no_template(tok), 1024)
    assert ex2.input_ids.count(tok.bos_token_id) == 0  # SmolLM2 adds no BOS of its own: none is invented


def test_pad_is_never_eos(tok):
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_guanaco_multiturn_and_system():
    msgs = FORMATTERS["guanaco"]({"text": "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST] A2 </s>"})
    assert msgs == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q1"},
                    {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                    {"role": "assistant", "content": "A2"}]


def test_bird_answer_is_reasoning_then_sql():
    msgs = FORMATTERS["bird_reasoning"](BIRD_ROWS[0])
    assert msgs[1]["content"] == "Sum the amount column over all orders.\n\nSQL: SELECT SUM(amount) FROM orders;"
    assert "Hint: amount is in dollars" in msgs[0]["content"] and "CREATE TABLE orders" in msgs[0]["content"]
    assert "Hint" not in FORMATTERS["bird_reasoning"](BIRD_ROWS[1])[0]["content"]


def test_real_guanaco_file(tok):
    path = shared_file("guanaco-llama2-1k.parquet")
    stats = DataStats()
    import pandas as pd
    rows = pd.read_parquet(path).to_dict("records")
    assert detect_formatter(rows, str(path)) == "guanaco"
    exs = build_examples(rows, Source(str(path)), tok, 4096, "drop", stats)
    assert stats.rows == 1000 and stats.kept == len(exs) and stats.kept + stats.dropped_overlong == 1000
    n_turns = sum(len(FORMATTERS["guanaco"](r)) // 2 for r in rows)
    assert n_turns > 1000  # multi-turn rows exist and every turn is parsed
    for ex, row in list(zip(exs, rows))[:50]:
        want = "".join(r + tok.eos_token for r in expected_responses(FORMATTERS["guanaco"](row)))
        assert supervised_text(tok, ex) == want


def test_real_gretel_rows(tok):
    path = shared_file("gretel-synthetic-text-to-sql-25.jsonl")
    train, evals, stats = load_datasets([str(path)], tok, 2048, "drop", 0.2, seed=0)
    assert len(train) == 20 and len(evals) == 5 and stats.per_source[str(path)]["formatter"] == "gretel_sql"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    sql = {r["sql"].strip() + tok.eos_token for r in rows}
    assert {supervised_text(tok, ex) for ex in train} <= sql


def test_builtin_sql_has_a_held_out_split(tok):
    train, evals, _ = load_datasets(["builtin:sql"], tok, 1024, "drop", 0.05, seed=0)
    assert len(train) == 400 and len(evals) == 100
    assert not {tuple(e.input_ids) for e in train} & {tuple(e.input_ids) for e in evals}


def test_overlong_policies_are_counted(tok):
    rows = [{"prompt": "p " * 10, "response": "r " * 200}, {"prompt": "short", "response": "ok"}]
    s_drop, s_trunc = DataStats(), DataStats()
    kept = build_examples(rows, Source("x", "prompt_response"), tok, 64, "drop", s_drop)
    assert len(kept) == 1 and s_drop.dropped_overlong == 1
    kept = build_examples(rows, Source("x", "prompt_response"), tok, 64, "truncate", s_trunc)
    assert len(kept) == 2 and s_trunc.truncated == 1 and len(kept[0].input_ids) == 64
    long_prompt = [{"prompt": "p " * 300, "response": "r"}]
    s = DataStats()
    assert build_examples(long_prompt, Source("x", "prompt_response"), tok, 64, "truncate", s) == []
    assert s.dropped_overlong == 1  # truncation that leaves no response token drops the example


def test_all_overlong_is_a_clear_error(tok, tmp_path):
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"prompt": "word " * 400, "response": "x"}) + "\n")
    with pytest.raises(DataError, match="every example is longer than max_seq_len"):
        load_datasets([str(p)], tok, 64, "drop", 0.0, seed=0)


def test_truncation_that_leaves_no_response_says_the_prompts_are_too_long(tok, tmp_path):
    """With --overlong truncate already on, the advice is not to turn it on: the prompts alone fill
    max_seq_len, so it must be raised."""
    p = tmp_path / "long.jsonl"
    p.write_text("".join(json.dumps({"prompt": "word " * 400, "response": "x"}) + "\n" for _ in range(3)))
    with pytest.raises(DataError) as e:
        load_datasets([str(p)], tok, 64, "truncate", 0.0, seed=0)
    msg = str(e.value)
    assert msg.startswith("no training examples left after filtering (3 rows -> 0 examples; dropped 3 over-long")
    assert "with --overlong truncate, every prompt alone takes max_seq_len (64 tokens) or more" in msg
    assert "raise --max_seq_len" in msg and "use --overlong truncate" not in msg
    train, _, _ = load_datasets([str(p)], tok, 1024, "truncate", 0.0, seed=0)  # room for the response
    assert len(train) == 3


def test_every_row_skipped_says_why(tok, tmp_path):
    """A Spider file without its databases: every row is skipped, and the error says so (not that no row has a
    supervised token)."""
    p = tmp_path / "dev.json"
    p.write_text(json.dumps([{"question": "How many?", "query": "SELECT 1", "db_id": "nowhere"}] * 2))
    msg = error_of([str(p)], tok, eval_fraction=0.0)
    assert "skipped 2 (Spider database missing)" in msg
    assert msg.endswith("every row was skipped (Spider database missing); a Spider file needs its databases "
                        "beside it, as database/<db_id>/<db_id>.sqlite")


@pytest.mark.parametrize("rows, suffix, needle", [
    ([{"prompt": "q", "response": "a"}, {"prompt": "q"}], "",
     "line 2: missing field 'response'; this row has only: prompt (this format needs prompt, response)"),
    ([{"text": "no inst markers"}], ":guanaco", "line 1: field 'text' has no '[INST] ... [/INST] ...' turn"),
    ([{"foo": 1}], "", "cannot tell the format from its columns (foo)"),
])
def test_bad_rows_name_the_file_row_and_field(tok, tmp_path, rows, suffix, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        load_datasets([str(p) + suffix], tok, 256, "drop", 0.0, seed=0)
    assert needle in str(e.value) and "bad.jsonl" in str(e.value)


def test_source_specs():
    assert parse_source("data/x.jsonl:gretel_sql") == Source("data/x.jsonl", "gretel_sql")
    assert parse_source("builtin:sql") == Source("builtin:sql")
    assert parse_source("org/name") == Source("org/name")
    assert parse_source({"path": "a.csv", "weight": 2}).weight == 2
    with pytest.raises(DataError, match="unknown formatter 'nope'"):
        parse_source({"path": "a.csv", "formatter": "nope"})
    with pytest.raises(DataError, match="data file missing.jsonl not found"):
        load_datasets(["missing.jsonl"], None, 10, "drop", 0, 0)


def test_mixing_weights_repeat_and_subsample():
    items = list(range(10))
    assert mix(items, 2.0, 0) == items * 2
    half = mix(items, 0.5, 0)
    assert len(half) == 5 and set(half) <= set(items) and half == mix(items, 0.5, 0)
    assert len(mix(items, 1.3, 0)) == 13


# --------------------------------------------------------------------------- errors name the row as it is in the file

def error_of(specs, tok, **kw):
    with pytest.raises(DataError) as e:
        load_datasets(specs, tok, kw.pop("max_len", 256), "drop", kw.pop("eval_fraction", 0.2), seed=0, **kw)
    return str(e.value)


def test_a_bad_row_is_named_by_its_line_not_its_place_after_the_shuffle(tok, tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(30)]
    del rows[3]["response"]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert error_of([str(p)], tok).startswith(f"{p} line 4: missing field 'response'")
    p.write_text("\n" + p.read_text())  # a blank line counts as a line of the file
    assert error_of([str(p)], tok).startswith(f"{p} line 5: missing field 'response'")
    rows[3]["response"] = None  # parquet has no "missing": a null is named as such, by its 0-based row
    q = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), q)
    assert error_of([str(q)], tok).startswith(f"{q} row 3 (0-based): field 'response' is empty (null)")


def test_csv_rows_are_named_by_the_line_they_start_on(tok, tmp_path):
    p = tmp_path / "d.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "response"])
        w.writerows([["two\nlines", "a"]] + [[f"q{i}", f"a{i}"] for i in range(20)])
    with p.open("a") as f:
        f.write("q_only\n")  # header on line 1, a two-line record on 2-3, 20 rows on 4-23, this one on 24
    assert error_of([str(p)], tok).startswith(f"{p} line 24: field 'response' is empty (null)")


def test_a_field_of_the_wrong_type_names_the_field_and_the_type(tok, tmp_path):
    p = tmp_path / "g.jsonl"
    row = {"sql_prompt": "How many?", "sql_context": "CREATE TABLE t (x INT);", "sql": 42}
    p.write_text(json.dumps(row) + "\n")
    assert error_of([str(p)], tok, eval_fraction=0.0) == (
        f"{p} line 1: field 'sql' must be a string, found a number (42): write it as text in the file")
    p.write_text(json.dumps({"prompt": ["a"], "response": "b"}) + "\n")
    assert "field 'prompt' must be a string, found a list" in error_of([str(p)], tok, eval_fraction=0.0)
    p.write_text(json.dumps({"prompt": "a", "response": "b", "system": {"x": 1}}) + "\n")
    assert "field 'system' must be a string, found an object" in error_of([str(p)], tok, eval_fraction=0.0)


@pytest.mark.parametrize("content, needle", [
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n',
     "line 2 is not valid UTF-8 (byte 0xe9): save the file as UTF-8"),
    (b'{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": }\n',
     "line 3 is not valid JSON (Expecting value, column 29): each line must be one JSON object"),
    (b'{"prompt": "a", "response": "b"}\n["a", "b"]\n', "line 2 is a list, not a JSON object"),
    (b"", "has no rows"),
    (b"\n  \n", "has no rows"),
], ids=["non-utf8", "invalid-json", "not-an-object", "empty", "blank-lines"])
def test_unreadable_jsonl_names_the_line(tok, tmp_path, content, needle):
    p = tmp_path / "x.jsonl"
    p.write_bytes(content)
    msg = error_of([str(p)], tok)
    assert str(p) in msg and needle in msg


def test_unreadable_csv_and_json(tok, tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("prompt,response\n")
    assert error_of([str(p)], tok) == f"dataset {p} has no rows: check the file, or drop it from the datasets"
    p.write_bytes(b"prompt,response\nok,fine\nbad,\x92quote\n")
    assert f"data file {p} line 3 is not valid UTF-8 (byte 0x92)" in error_of([str(p)], tok)
    p.write_text("prompt,response\na,b,c\n")
    assert "line 2 has more cells than the header (prompt, response)" in error_of([str(p)], tok)
    j = tmp_path / "a.json"
    j.write_text(json.dumps([{"prompt": "a", "response": "b"}, "oops"]))
    assert "item 1 (0-based) is a string, not an object" in error_of([str(j)], tok)


def test_json_files_hold_a_list_or_one_object_per_line(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    j = tmp_path / "a.json"
    j.write_text(json.dumps(rows, indent=2))
    got = load_rows(parse_source(str(j)), "train")
    assert list(got) == rows and got.where(1) == f"{j} row 1 (0-based)"
    j.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_rows(parse_source(str(j)), "train")
    assert list(got) == rows and got.where(1) == f"{j} line 2"


def chat(user_content, assistant_content="fine") -> dict:
    return {"messages": [{"role": "user", "content": user_content},
                         {"role": "assistant", "content": assistant_content}]}


@pytest.mark.parametrize("content, needle", [
    (None, "messages[0] 'content' is empty (null): give every message its text as a string"),
    (42, "messages[0] 'content' must be a string (or a list of {\"type\": \"text\", \"text\": ...} parts), "
         "found a number (42)"),
    ({"text": "hi"}, "messages[0] 'content' must be a string (or a list of"),
    ([], "messages[0] 'content' must be a string (or a list of"),
    ([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x.png"}}],
     "messages[0] 'content' part 1 is a part of type 'image_url', not a text part"),
    (["hi"], "messages[0] 'content' part 0 is a string, not a text part"),
    ([{"type": "text", "text": None}], "messages[0] 'content' part 0 'text' must be a string, found null"),
], ids=["null", "number", "object", "empty-list", "image-part", "bare-string-part", "null-text"])
def test_a_message_content_that_is_not_text_names_the_line_and_message(tok, tmp_path, content, needle):
    """A message content that is not text is an error naming the line, the message and what was found
    (it used to be trained on as the text 'None' or a Python repr)."""
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [chat("hi"), chat("hello"), chat(content)]))
    msg = error_of([str(p)], tok, eval_fraction=0.0)
    assert msg.startswith(f"{p} line 3: ") and needle in msg, msg
    p.write_text("".join(json.dumps(r) + "\n" for r in [chat("hi"), chat("hello", content)]))
    assert error_of([str(p)], tok, eval_fraction=0.0).startswith(f"{p} line 2: messages[1] 'content' ")
    q = tmp_path / "conv.jsonl"  # a mapped column is named as it is in the file
    q.write_text(json.dumps({"conv": chat(content)["messages"]}) + "\n")
    assert f"{q} line 1: conv[0] 'content'" in error_of([f"{q}:messages?messages=conv"], tok, eval_fraction=0.0)


def test_a_message_role_that_is_not_a_string_is_named(tok, tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": [{"role": ["user"], "content": "hi"}]}) + "\n")
    assert error_of([str(p)], tok, eval_fraction=0.0) == (
        f"{p} line 1: messages[0] 'role' must be a string (system, user or assistant), found a list")


def test_text_parts_content_is_joined(tok, tmp_path):
    """The OpenAI list-of-text-parts content trains as its texts joined by newlines, the same tokens as
    that string written out."""
    parts = [{"type": "text", "text": "What is 2+2?"}, {"type": "text", "text": "Answer briefly."}]
    answer = [{"type": "text", "text": "4"}]
    assert FORMATTERS["messages"](chat(parts, answer)) == FORMATTERS["messages"](
        chat("What is 2+2?\nAnswer briefly.", "4"))
    p, q = tmp_path / "parts.jsonl", tmp_path / "plain.jsonl"
    p.write_text(json.dumps(chat(parts, answer)) + "\n")
    q.write_text(json.dumps(chat("What is 2+2?\nAnswer briefly.", "4")) + "\n")
    assert encoded([str(p)], tok) == encoded([str(q)], tok)


def test_a_json_file_holding_one_object_is_named_as_such(tmp_path):
    """A pretty-printed .json whose top level is an object is not read line by line as JSONL: the error says
    what the top level is and what is expected; a one-line object is still one record."""
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    j = tmp_path / "wrapped.json"
    j.write_text(json.dumps({"data": rows}, indent=2))
    with pytest.raises(DataError) as e:
        load_rows(parse_source(str(j)), "train")
    msg = str(e.value)
    assert msg.startswith(f"data file {j}: the top level is one JSON object (keys: data), not a list of records")
    assert "write a list [{...}, ...] at the top level, or one record per line (.jsonl)" in msg
    assert "the list under 'data'" in msg and "not valid JSON" not in msg
    j.write_text(json.dumps({"meta": {"v": 1}, "rows": rows, "more": rows}, indent=2))  # two candidate lists
    with pytest.raises(DataError, match=r"\(keys: meta, rows, more\), not a list of records") as e:
        load_rows(parse_source(str(j)), "train")
    assert "the list under" not in str(e.value)
    j.write_text(json.dumps(rows[0]))  # one record on one line: still read
    assert list(load_rows(parse_source(str(j)), "train")) == rows[:1]


@pytest.mark.parametrize("suffix, text, needle", [
    (".jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "bad \\ud800 x", "response": "b"}\n',
     "line 2: field 'prompt' holds the escape \\ud800"),
    (".jsonl", '{"prompt": "a", "response": "b"}\n\n{"messages": [{"role": "user", "content": "hi"}, '
     '{"role": "assistant", "content": "\\udc00"}]}\n',
     "line 3: field 'messages[1].content' holds the escape \\udc00"),
    (".json", '[{"prompt": "a", "response": "b"},\n {"prompt": "a", "response": "x\\udfff"}]',
     "item 1 (0-based): field 'response' holds the escape \\udfff"),
], ids=["jsonl", "jsonl-nested", "json-list"])
def test_a_lone_surrogate_escape_names_the_line_and_field(tok, tmp_path, suffix, text, needle):
    """JSON can spell half of a UTF-16 surrogate pair, which is not text and no tokenizer takes: the file,
    line and field are named (it used to reach the tokenizer and end in a TypeError)."""
    p = tmp_path / f"s{suffix}"
    p.write_text(text)
    msg = error_of([str(p)], tok, eval_fraction=0.0)
    assert msg.startswith(f"data file {p}") and needle in msg and "fix or remove that escape" in msg


def test_a_surrogate_pair_and_an_escaped_backslash_are_text(tok, tmp_path):
    p = tmp_path / "ok.jsonl"
    p.write_text('{"prompt": "smile \\ud83d\\ude00", "response": "a \\\\ud800 b"}\n')
    (row,) = load_rows(parse_source(str(p)), "train")
    assert row == {"prompt": "smile \U0001F600", "response": "a \\ud800 b"}
    train, _, _ = load_datasets([str(p)], tok, 256, "drop", 0.0, seed=0)
    assert supervised_text(tok, train[0]) == "a \\ud800 b" + tok.eos_token


def test_a_system_prompt_that_is_not_text_is_named(tok):
    with pytest.raises(DataError, match=r"^config key 'system_prompt' holds a lone UTF-16 surrogate"):
        build_examples([{"prompt": "a", "response": "b"}], Source("x", "prompt_response"), tok, 256, "drop",
                       DataStats(), system_prompt="bad \udcff")


def test_a_formatter_typo_is_not_file_not_found():
    with pytest.raises(DataError) as e:
        parse_source("data.jsonl:gretel")
    assert str(e.value).startswith("dataset data.jsonl:gretel: unknown formatter 'gretel' (did you mean gretel_sql?)")
    with pytest.raises(DataError, match=r"unknown formatter 'promt_response' \(did you mean prompt_response\?\)"):
        parse_source({"path": "x.csv", "formatter": "promt_response"})
    assert parse_source("eval:gretel_sql") == Source("eval", "gretel_sql")  # a name, not a file: kept as is
    assert parse_source("org/name") == Source("org/name")
    with pytest.raises(DataError, match="unknown built-in dataset 'builtin:sqll'"):
        parse_source("builtin:sqll")


# --------------------------------------------------------------------------- column mapping

def encoded(specs, tok):
    train, _, _ = load_datasets(specs, tok, 512, "drop", 0.0, seed=0)
    return [(e.input_ids, e.labels) for e in train]


def test_a_question_answer_csv_trains_through_a_column_mapping(tok, tmp_path):
    pairs = [("What is 2+2?", "4"), ("Capital of France?", "Paris, of course"), ("Say, hi", "hi")]
    c = tmp_path / "qa.csv"
    with c.open("w", newline="") as f:
        csv.writer(f).writerows([("question", "answer")] + pairs)
    with pytest.raises(DataError, match=r"cannot tell the format from its columns \(answer, question\)"):
        encoded([str(c)], tok)  # without a mapping the file is rejected, with a hint at the mapping
    j = tmp_path / "pr.jsonl"
    j.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in pairs))
    want = encoded([str(j)], tok)
    assert encoded([f"{c}:prompt_response?prompt=question&response=answer"], tok) == want
    assert encoded([f"{c}?prompt=question&response=answer"], tok) == want  # detected after mapping
    assert encoded([{"path": str(c), "formatter": "prompt_response",
                     "columns": {"prompt": "question", "response": "answer"}}], tok) == want
    train, _, _ = load_datasets([f"{c}:prompt_response?prompt=question&response=answer"], tok, 512, "drop", 0.0, 0)
    assert sorted(supervised_text(tok, e) for e in train) == sorted(a + tok.eos_token for _, a in pairs)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_column_mapping_works_for_every_formatter(tok, tmp_path, name):
    required, optional = FIELDS[name]
    renamed = [{f"my_{k}": v for k, v in row.items()} for row in ROWS[name]]
    p, q = tmp_path / "plain.jsonl", tmp_path / "renamed.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS[name]))
    q.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    present = {k for row in ROWS[name] for k in row}
    query = "&".join(f"{k}=my_{k}" for k in required + optional if k in present)
    assert encoded([f"{q}:{name}?{query}"], tok) == encoded([f"{p}:{name}"], tok)


def test_mapping_errors_name_the_column(tok, tmp_path):
    c = tmp_path / "qa.csv"
    c.write_text("question,answer\nWhat?,That\nWho?\n")
    assert error_of([f"{c}:prompt_response?prompt=question&response=answr"], tok) == (
        f"dataset {c}: column 'answr' (mapped to field 'response') is not in the file (did you mean 'answer'?); "
        "its columns are: answer, question")
    assert error_of([f"{c}:prompt_response?prompt=question&response=answer"], tok, eval_fraction=0.0) == (
        f"{c} line 3: column 'answer' (mapped to field 'response') is empty (null); "
        "this format needs text in prompt, response")
    j = tmp_path / "m.jsonl"
    j.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    assert error_of([f"{j}:prompt_response?prompt=question&response=answer"], tok, eval_fraction=0.0).startswith(
        f"{j} line 2: missing column 'answer' (mapped to field 'response'); this row has only: question")
    with pytest.raises(DataError, match=r"columns maps 'question', which is not a field of prompt_response "
                                        r"\(prompt, response, system\)"):
        parse_source("x.csv:prompt_response?question=prompt")
    with pytest.raises(DataError, match=r"after '\?' give field=column pairs"):
        parse_source("x.csv:prompt_response?prompt")
    with pytest.raises(DataError, match="'columns' maps the formatter's fields"):
        parse_source({"path": "x.csv", "columns": ["question"]})


def test_source_entries_are_checked(tmp_path):
    with pytest.raises(DataError, match=r"weight must be a number > 0 \(got nan\)"):
        parse_source({"path": "x.jsonl", "weight": float("nan")})
    with pytest.raises(DataError, match="eval_split names a split of a hub dataset"):
        parse_source({"path": "x.jsonl", "eval_split": "test"})
    with pytest.raises(DataError, match=r"needs 'path' and only the keys .* \(unknown: \['formater'\]\)"):
        parse_source({"path": "x.jsonl", "formater": "guanaco"})
    d = tmp_path / "dir.jsonl"
    d.mkdir()
    with pytest.raises(DataError, match="is a directory"):
        load_rows(parse_source(str(d)), "train")
