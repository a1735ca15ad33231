"""Bad input to generate.py, qlora.evaluation.evaluate, qlora.evaluation.merge and to resuming: one `error:` line each.

Every case checks the project's failure rule through tests/badinput.py: exit code 2, exactly one
`error:` line (the last line of stderr), no traceback, the words that name the file or flag, and that
nothing already in the output folder changed. Most cases call the CLI's `main(argv)` in this process
(the same code a user's command runs; ~1 s each instead of ~5 s of interpreter start-up); one case per
entry point and the resume cases run the real command line in a subprocess with `run_cli`.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from badinput import FAST_TRAIN, assert_one_error, run_cli, snapshot

import generate
from conftest import tiny_cfg
from helpers import randomise_lora_
from qlora.evaluation import evaluate, merge
from qlora.training.checkpoint import save_adapter


def call(main, argv: list[str]) -> subprocess.CompletedProcess:
    """`main(argv)` in this process, reported as `run_cli` reports a command (exit code, stdout, stderr).
    An exception that escapes `main` fails the test with its traceback."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse usage errors
            rc = e.code
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    """A tiny NF4 adapter saved as train.py saves it (non-zero LoRA weights), a plain model directory,
    a data file and a finished 1-step run with checkpoint-1."""
    import train
    from qlora.config import load_config
    from qlora.model.base import load_base_model
    from qlora.model.trainable import load_model

    root = tmp_path_factory.mktemp("bad_inference")
    cfg = tiny_cfg(quant="nf4")
    model = load_model(cfg, torch.device("cpu"))
    randomise_lora_(model)
    save_adapter(model, tok, cfg, root / "adapter")
    load_base_model(tiny_cfg(), torch.device("cpu")).save_pretrained(root / "modeldir")
    tok.save_pretrained(root / "modeldir")
    run_cfg = load_config(FAST_TRAIN + ["--save_every", "1", "--output_dir", str(root / "run")])
    train.main(run_cfg)
    assert (root / "run" / "checkpoint-1" / "meta.json").is_file()
    return root


def adapter_copy(files: Path, tmp_path: Path, edit=None) -> Path:
    """A copy of the good adapter, changed by `edit(folder)`."""
    folder = tmp_path / "adapter"
    shutil.copytree(files / "adapter", folder)
    if edit:
        edit(folder)
    return folder


def set_adapter_key(key, value):
    def edit(folder):
        conf = json.loads((folder / "adapter_config.json").read_text())
        conf[key] = value
        (folder / "adapter_config.json").write_text(json.dumps(conf))
    return edit


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_the_good_adapter_passes_the_checks(files):
    """The control: the intact adapter and model dir pass every check the cases below trip."""
    from qlora.evaluation.inference import base_shapes, check_adapter, check_model_dir, inference_config

    cfg, adapter_cfg = inference_config(str(files / "adapter"))
    check_adapter(str(files / "adapter"), adapter_cfg, base_shapes(cfg), cfg.model)
    cfg, _ = inference_config(None, str(files / "modeldir"))
    check_model_dir(str(files / "modeldir"), base_shapes(cfg))


# (case id, edit of the adapter copy, extra generate.py args, words the error line must hold)
ADAPTER_CASES = [
    ("adapter_config_not_json", lambda f: (f / "adapter_config.json").write_text("{r: 8,"),
     ["adapter_config.json is not valid JSON"]),
    ("adapter_config_missing", lambda f: (f / "adapter_config.json").unlink(), ["adapter_config.json is missing"]),
    ("adapter_config_not_lora", lambda f: (f / "adapter_config.json").write_text('{"peft_type": "IA3"}'),
     ["adapter_config.json has no 'r'"]),
    ("wrong_r", set_adapter_key("r", 16), ["says r=16 but adapter_model.safetensors holds rank-8"]),
    ("wrong_target_names", set_adapter_key("target_modules", ["q_proj", "qkv_proj"]),
     ["target_modules ['qkv_proj'] are not modules of random:tiny"]),
    ("no_weights_file", lambda f: (f / "adapter_model.safetensors").unlink(),
     ["adapter_model.safetensors is missing", "has no weights"]),
    ("pickle_weights_only", lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"),
     ["adapter_model.bin, a pickle", "only safetensors"]),
    ("truncated_weights", lambda f: truncate(f / "adapter_model.safetensors"),
     ["adapter_model.safetensors is", "truncated"]),
    ("garbage_weights", lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100),
     ["adapter_model.safetensors is not a safetensors file"]),
]


@pytest.mark.parametrize("edit,needles", [c[1:] for c in ADAPTER_CASES], ids=[c[0] for c in ADAPTER_CASES])
def test_generate_bad_adapter(files, tmp_path, edit, needles):
    folder = adapter_copy(files, tmp_path, edit)
    before = snapshot(folder)
    assert_one_error(call(generate.main, ["--adapter", str(folder), "--prompt", "hi"]), *needles)
    assert snapshot(folder) == before


def test_generate_adapter_of_another_base(files):
    """The adapter (random:tiny shapes) on random:small: shapes do not fit, named before loading."""
    r = call(generate.main, ["--adapter", str(files / "adapter"), "--model", "random:small", "--prompt", "hi"])
    assert_one_error(r, "adapter_model.safetensors", "pass the adapter's own base model with --model")


@pytest.mark.parametrize("args,needles", [
    (["--adapter", "{missing}", "--prompt", "hi"], ["adapter folder", "does not exist"]),
    (["--adapter", "{adapter}/config.yaml", "--prompt", "hi"], ["is a file"]),
    (["--adapter", "{adapter}", "--prompts_file", "{missing}"], ["--prompts_file", "does not exist"]),
    (["--adapter", "{adapter}"], ["no prompts: give --prompt"]),
    (["--adapter", "{adapter}", "--prompt", "hi", "--max_new_tokens", "0"], ["--max_new_tokens", ">= 1"]),
    (["--adapter", "{adapter}", "--prompt", "hi", "--max-new-tokens", "0"], ["--max_new_tokens", ">= 1"]),
    (["--adapter", "{adapter}", "--prompt", "hi", "--max-new-token", "4"],
     ["unrecognized arguments: --max-new-token", "did you mean --max_new_tokens?"]),
    (["--adapter", "{adapter}", "--prompt", "hi", "--max_new_tokns=4"], ["did you mean --max_new_tokens?"]),
], ids=["missing_adapter_dir", "adapter_is_a_file", "missing_prompts_file", "no_prompts", "zero_max_new_tokens",
        "dash_spelling_is_the_same_flag", "misspelt_dash_flag", "misspelt_flag"])
def test_generate_bad_arguments(files, tmp_path, args, needles):
    args = [a.format(missing=tmp_path / "nope", adapter=files / "adapter") for a in args]
    assert_one_error(call(generate.main, args), *needles)


def model_dir_copy(files: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "modeldir"
    shutil.copytree(files / "modeldir", folder)
    edit(folder)
    return folder


@pytest.mark.parametrize("edit,needles", [
    (lambda f: (f / "model.safetensors").write_bytes(b"\x17" * 4096), ["model.safetensors is not a safetensors file"]),
    (lambda f: truncate(f / "model.safetensors"), ["model.safetensors is", "truncated"]),
    (lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"), ["pytorch_model.bin is a pickle"]),
    (lambda f: (f / "config.json").write_text(
        (f / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 96')),
     ["model.embed_tokens.weight has shape [49152, 64], config.json implies [49152, 96]"]),
], ids=["garbage_weights", "truncated_weights", "pickle_weights", "weights_do_not_fit_config"])
def test_evaluate_bad_model_dir(files, tmp_path, edit, needles):
    folder = model_dir_copy(files, tmp_path, edit)
    before = snapshot(folder)
    assert_one_error(call(evaluate.main, ["--model", str(folder), "--limit", "2", "--progress", "false"]), *needles)
    assert snapshot(folder) == before


def test_evaluate_bad_arguments(files, tmp_path):
    adapter = str(files / "adapter")
    bad_rows = tmp_path / "rows.jsonl"
    bad_rows.write_text(json.dumps({"sql_prompt": "q", "sql_context": "CREATE TABLE t (a INT);", "sql": "SELECT 1"})
                        + "\n" + json.dumps({"sql_prompt": "q", "sql_context": "CREATE TABLE t (a INT);"}) + "\n")
    (tmp_path / "a_file").write_text("x")
    report = tmp_path / "kept" / "report.json"
    report.parent.mkdir()
    report.write_text('{"old": "report"}')
    before = snapshot(report.parent)
    cases = [
        (["--adapter", adapter, "--data", str(tmp_path / "nope.jsonl")], ["data file", "nope.jsonl not found"]),
        (["--adapter", adapter, "--data", f"{bad_rows}:gretel_sql"], ["rows.jsonl line 2", "sql"]),
        (["--adapter", adapter, "--limit", "-1"], ["--limit", "not an integer >= 0"]),
        (["--adapter", adapter, "--limit", "ten"], ["--limit"]),
        (["--adapter", adapter, "--out", str(tmp_path / "a_file" / "r.json")], ["--out", "cannot write in", "a file"]),
        (["--adapter", adapter, "--out", str(report.parent)], ["--out", "is a folder"]),
        (["--limit", "2"], ["give --adapter FOLDER or --model NAME"]),
        (["--adapter", adapter, "--compute-dtype", "float64"], ["--compute_dtype", "invalid choice"]),
        (["--adapter", adapter, "--computedtype", "float32"], ["did you mean --compute_dtype?"]),
        (["--model", "random:nosuchshape", "--limit", "2", "--out", str(report)], ["unknown random shape 'nosuchshape'"]),
    ]
    for args, needles in cases:
        assert_one_error(call(evaluate.main, args + ["--progress", "false"]), *needles)
    assert snapshot(report.parent) == before  # the existing report was not touched by any failed run


def test_merge_bad_input_changes_nothing(files, tmp_path):
    adapter = files / "adapter"
    run = files / "run"
    before_run, before_adapter = snapshot(run), snapshot(adapter)
    quant_none = tmp_path / "fp_adapter"
    shutil.copytree(adapter, quant_none)
    conf = (quant_none / "config.yaml").read_text()
    (quant_none / "config.yaml").write_text(conf.replace("quant: nf4", "quant: none"))
    cases = [
        (["--adapter", str(adapter), "--out", str(run)], ["--out", "already exists and is not a merged model"]),
        (["--adapter", str(adapter), "--out", str(adapter)], ["is (or holds) the adapter folder"]),
        (["--adapter", str(quant_none), "--out", str(tmp_path / "m")], ["quant=none", "nothing to dequantise"]),
        (["--adapter", str(adapter), "--out", str(tmp_path / "m"), "--dtype", "auto"], ["--dtype", "invalid choice"]),
        (["--adapter", str(adapter), "--out", str(tmp_path / "m"), "--check_rows", "0"], ["--check_rows", ">= 1"]),
        (["--adapter", str(adapter), "--out", str(tmp_path / "m"), "--check-rows", "0"], ["--check_rows", ">= 1"]),
        (["--adapter", str(adapter), "--out", str(tmp_path / "m"), "--check-row", "2"],
         ["did you mean --check_rows?"]),
        (["--adapter", str(adapter), "--out", str(tmp_path / "m"), "--check_data", str(tmp_path / "x.jsonl")],
         ["data file", "not found"]),
        (["--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "m")], ["adapter folder", "does not exist"]),
    ]
    for args, needles in cases:
        assert_one_error(call(merge.main, args), *needles)
    assert snapshot(run) == before_run and snapshot(adapter) == before_adapter
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- the real command lines

@pytest.mark.parametrize("cli", [["generate.py"], ["-m", "qlora.evaluate"], ["-m", "qlora.merge", "--out", "{out}"]],
                         ids=["generate", "evaluate", "merge"])
def test_command_line_wrong_r(files, tmp_path, cli):
    """One case per entry point as a user runs it: nothing but the one line reaches stderr's end."""
    folder = adapter_copy(files, tmp_path, set_adapter_key("r", 4))
    args = [a.format(out=tmp_path / "merged") for a in cli] + ["--adapter", str(folder)]
    r = run_cli(args + (["--prompt", "hi"] if cli == ["generate.py"] else []))
    assert_one_error(r, "adapter_config.json says r=4")


def _resume_case(files, tmp_path, damage) -> tuple[Path, list[str]]:
    out = tmp_path / "run"
    shutil.copytree(files / "run", out)
    damage(out / "checkpoint-1")
    return out, FAST_TRAIN + ["--save_every", "1", "--max_steps", "2", "--output_dir", str(out)]


@pytest.mark.parametrize("resume,damage,needles", [
    ("auto", lambda ck: truncate(ck / "adapter_model.safetensors"),
     ["--resume auto: no readable checkpoint", "adapter_model.safetensors is", "truncated"]),
    ("path", lambda ck: (ck / "trainer_state.json").write_text("{}"),
     ["trainer_state.json lacks the keys ['step', 'data', 'world_size']", "earlier checkpoint"]),
    ("path", lambda ck: (ck / "rng.pt").write_bytes(b""), ["rng.pt is empty (0 bytes)"]),
    ("path", lambda ck: truncate(ck / "optimizer.pt"), ["optimizer.pt is truncated or not a torch.save file"]),
], ids=["auto_truncated_adapter", "trainer_state_empty_object", "empty_rng", "truncated_optimizer"])
def test_resume_from_damaged_checkpoint(files, tmp_path, resume, damage, needles):
    out, args = _resume_case(files, tmp_path, damage)
    before = snapshot(out)
    where = "auto" if resume == "auto" else str(out / "checkpoint-1")
    assert_one_error(run_cli(["train.py", *args, "--resume", where]), *needles)
    assert snapshot(out) == before
