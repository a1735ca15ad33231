"""Bad input to train.py, as a user would type it: each case ends in exactly one `error:` line (exit 2,
no traceback) that names the file, row, field or key, and every file already in output_dir is
byte-identical afterwards (tests/badinput.py holds the rule).

The output_dir of most cases holds a previous run with a checkpoint. Cases that fail while the config
is parsed run against it as it is; cases that fail later (data, model) resume it (`--resume auto`),
since another run's output_dir is refused before the data is read, while a resumed one is reopened
and its config.yaml rewritten once the run starts: a bad input must stop the run before that.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from badinput import FAST_TRAIN, assert_one_error, run_cli, snapshot

GRETEL = {"sql_prompt": "How many rows?", "sql_context": "CREATE TABLE t (x INT);", "sql": "SELECT COUNT(*) FROM t;"}


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def prompt_rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} + {i}?", "response": f"{2 * i}"} for i in range(n)]


def chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(n)]


# id, extra arguments ({d} = a folder of the case's files), files to write there, the needles the error line
# must hold, and which output_dir the case runs against: "previous" (a previous run with a checkpoint),
# "resume" (the same, resumed with --resume auto), "fresh" (none: none may appear)
CASES = [
    # --- the config (parsed before anything else)
    ("lr-nan", ["--lr", "nan"], {}, ["config key 'lr' from the command line", "finite"], "previous"),
    ("max-grad-norm-negative", ["--max_grad_norm", "-1"], {},
     ["config key 'max_grad_norm' from the command line must be >= 0"], "previous"),
    ("adam-betas-out-of-range", ["--adam_betas", "0.9,1.5"], {}, ["'adam_betas'", "[0, 1)"], "previous"),
    ("duplicate-yaml-key", ["--config", "{d}/c.yaml"], {"c.yaml": b"lr: 1.0e-4\nmax_steps: 3\nlr: 2.0e-4\n"},
     ["c.yaml", "key 'lr' is set twice (again on line 3)"], "previous"),
    ("yaml-parse-error", ["--config", "{d}/c.yaml"], {"c.yaml": b"lr: 1.0e-4\nlora_targets: [q_proj\nseed: 1\n"},
     ["c.yaml is not valid YAML at line 3, column 5: expected ',' or ']'"], "previous"),
    ("unknown-key-cli", ["--learning_rate", "1e-4"], {}, ["unknown config key 'learning_rate'", "did you mean 'lr'"],
     "previous"),
    ("unknown-key-yaml", ["--config", "{d}/c.yaml"], {"c.yaml": b"batch_size: 4\n"},
     ["unknown config key 'batch_size' in config file", "c.yaml", "did you mean 'micro_batch_size'"], "previous"),
    ("wrong-type", ["--micro_batch_size", "two"], {}, ["'micro_batch_size'", "expected an integer"], "previous"),
    ("formatter-typo", ["--datasets", "{d}/g.jsonl:gretel"], {"g.jsonl": jsonl(GRETEL)},
     ["unknown formatter 'gretel' (did you mean gretel_sql?)"], "previous"),
    # --- the output folder
    ("another-runs-output-dir", [], {}, ["already holds another run", "--resume auto"], "previous"),
    # --- the data
    ("non-utf8-jsonl", ["--datasets", "{d}/d.jsonl"],
     {"d.jsonl": jsonl(*prompt_rows(3)) + b'{"prompt": "caf\xe9", "response": "x"}\n'},
     ["d.jsonl line 4 is not valid UTF-8 (byte 0xe9)"], "resume"),
    ("invalid-json-line", ["--datasets", "{d}/d.jsonl"], {"d.jsonl": jsonl(*prompt_rows(3)) + b'{"prompt": "a",\n'},
     ["d.jsonl line 4 is not valid JSON"], "resume"),
    ("gretel-sql-a-number", ["--datasets", "{d}/g.jsonl"], {"g.jsonl": jsonl(GRETEL, {**GRETEL, "sql": 42})},
     ["g.jsonl line 2: field 'sql' must be a string, found a number (42)"], "resume"),
    ("missing-field", ["--datasets", "{d}/d.jsonl"],
     {"d.jsonl": jsonl(*prompt_rows(2), {"prompt": "no answer"}, *prompt_rows(30))},
     ["d.jsonl line 3: missing field 'response'; this row has only: prompt"], "resume"),
    ("unknown-mapped-column", ["--datasets", "{d}/qa.csv:prompt_response?prompt=question&response=answr"],
     {"qa.csv": b"question,answer\nWhat is 1+1?,2\n"},
     ["column 'answr' (mapped to field 'response') is not in the file", "its columns are: answer, question"],
     "resume"),
    ("unrecognised-columns", ["--datasets", "{d}/qa.csv"], {"qa.csv": b"question,answer\nWhat is 1+1?,2\n"},
     ["qa.csv: cannot tell the format from its columns (answer, question)", "prompt=COL&response=COL"], "resume"),
    ("empty-file", ["--datasets", "{d}/empty.jsonl"], {"empty.jsonl": b""}, ["empty.jsonl has no rows"], "resume"),
    ("empty-file-fresh-dir", ["--datasets", "{d}/empty.jsonl"], {"empty.jsonl": b""}, ["empty.jsonl has no rows"],
     "fresh"),
    ("missing-file", ["--datasets", "{d}/nope.jsonl"], {}, ["nope.jsonl not found"], "resume"),
    ("micro-batch-larger-than-data", ["--datasets", "{d}/two.csv:prompt_response?prompt=q&response=a",
                                      "--micro_batch_size", "4"], {"two.csv": b"q,a\nWhat is 1+1?,2\nAnd 2+2?,4\n"},
     ["fills 1 packed row(s) of max_seq_len 256", "micro_batch_size 4", "lower --micro_batch_size to 1"], "fresh"),
    ("messages-null-content", ["--datasets", "{d}/chat.jsonl"],
     {"chat.jsonl": jsonl(*chat_rows(2), {"messages": [{"role": "user", "content": None},
                                                      {"role": "assistant", "content": "x"}]}, *chat_rows(30))},
     ["chat.jsonl line 3: messages[0] 'content' is empty (null)"], "resume"),
    ("messages-image-part", ["--datasets", "{d}/chat.jsonl"],
     {"chat.jsonl": jsonl(*chat_rows(2), {"messages": [
         {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
         {"role": "assistant", "content": "x"}]}, *chat_rows(30))},
     ["chat.jsonl line 3: messages[0] 'content' part 0 is a part of type 'image_url', not a text part"], "resume"),
    ("lone-surrogate-escape", ["--datasets", "{d}/d.jsonl"],
     {"d.jsonl": jsonl(*prompt_rows(3)) + b'{"prompt": "bad \\ud800 x", "response": "r"}\n'
      + jsonl(*prompt_rows(30))},
     ["d.jsonl line 4: field 'prompt' holds the escape \\ud800", "fix or remove that escape"], "resume"),
    ("json-top-level-object", ["--datasets", "{d}/d.json"],
     {"d.json": json.dumps({"data": prompt_rows(30)}, indent=2).encode()},
     ["d.json: the top level is one JSON object (keys: data), not a list of records",
      "save that list alone as the file"], "resume"),
    ("truncate-leaves-no-response", ["--datasets", "{d}/long.jsonl", "--overlong", "truncate"],
     {"long.jsonl": jsonl(*[{"prompt": "word " * 400, "response": "x"}] * 30)},
     ["with --overlong truncate, every prompt alone takes max_seq_len (256 tokens) or more",
      "raise --max_seq_len"], "resume"),
    # --- the model
    ("lora-target-not-in-model", ["--lora_targets", "q_proj,qkv_proj"], {}, ["qkv_proj"], "resume"),
    ("random-model-vocab-mismatch", ["--model", "random:llama2-7b"], {}, ["has only 32000 embeddings", "--tokenizer"],
     "resume"),
    # --- the device: GPU-only choices on a CPU
    ("varlen-on-cpu", ["--attn_backend", "varlen"], {}, ["'attn_backend' = 'varlen' needs a CUDA device"], "resume"),
    ("flex-training-on-cpu", ["--attn_backend", "flex"], {}, ["'attn_backend' = 'flex' needs a CUDA device"], "resume"),
    ("cuda-graphs-on-cpu", ["--cuda_graphs", "true"], {}, ["'cuda_graphs' = True needs a CUDA device"], "resume"),
    ("liger-on-cpu", ["--kernels", "liger"], {}, ["'kernels' = 'liger' needs a CUDA device"], "resume"),
]


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory) -> Path:
    """A real 1-step run of the tiny model: config.yaml, log.jsonl, checkpoint-1 and final/."""
    out = tmp_path_factory.mktemp("previous") / "run"
    data = out.parent / "data.jsonl"
    data.write_bytes(jsonl(*prompt_rows(16)))
    r = run_cli(["train.py", *FAST_TRAIN, "--output_dir", str(out), "--datasets", str(data), "--save_every", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"config.yaml", "log.jsonl", "checkpoint-1", "final"} <= {p.name for p in out.iterdir()}
    return out


def output_dir(kind: str, previous: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    if kind != "fresh":
        shutil.copytree(previous, out)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_to_train(case, previous_run, tmp_path):
    _, args, files, needles, kind = case
    d = tmp_path / "in"
    d.mkdir()
    for name, content in files.items():
        (d / name).write_bytes(content)
    out = output_dir(kind, previous_run, tmp_path)
    before = snapshot(out)
    resume = ["--resume", "auto"] if kind == "resume" else []
    r = run_cli(["train.py", *FAST_TRAIN, "--output_dir", str(out), *resume, *(a.replace("{d}", str(d)) for a in args)])
    assert_one_error(r, *needles)
    assert snapshot(out) == before
    assert out.exists() == (kind != "fresh")


def test_output_dir_that_is_a_file(tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("someone's notes\n")
    r = run_cli(["train.py", *FAST_TRAIN, "--output_dir", str(out)])
    assert_one_error(r, str(out), "output_dir")
    assert out.read_text() == "someone's notes\n"


def test_output_dir_in_a_read_only_folder(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        probe = parent / "probe"
        try:
            probe.mkdir()
        except PermissionError:
            pass
        else:
            pytest.skip(f"chmod does not stop this user (uid {os.geteuid()}) from writing: cannot test here")
        r = run_cli(["train.py", *FAST_TRAIN, "--output_dir", str(parent / "run")])
        assert_one_error(r, str(parent / "run"), "output_dir")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)
