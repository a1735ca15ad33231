"""Formatters, rendering and response-only labels (qlora/formatters.py, qlora/data.py).

The central property: for every formatter, the decoded supervised tokens are exactly each
assistant response followed by EOS, and nothing else.
"""

import copy
import json

import pytest

from qlora.data import IGNORE, DataStats, Source, build_examples, encode, load_datasets, mix, parse_source, supervised_text
from qlora.formatters import FORMATTERS, DataError, detect_formatter

from conftest import shared_file

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


@pytest.mark.parametrize("rows, suffix, needle", [
    ([{"prompt": "q", "response": "a"}, {"prompt": "q"}], "", "row 1: missing required field 'response'"),
    ([{"text": "no inst markers"}], ":guanaco", "row 0: field 'text' has no '[INST] ... [/INST] ...' turn"),
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
