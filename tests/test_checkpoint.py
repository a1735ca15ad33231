"""Exact resume after a hard kill, atomic checkpoints, and clear errors on bad resume input."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from badinput import assert_one_error, snapshot
from safetensors.torch import load_file

from conftest import ROOT, tiny_cfg
from qlora.training.checkpoint import (CheckpointError, list_checkpoints, load_adapter_weights, load_checkpoint,
                                       resolve_resume)
from qlora.training.resume import drop_log_after, resume_warnings

TINY = ["--model", "random:tiny", "--max_seq_len", "256", "--micro_batch_size", "2", "--grad_accum", "2",
        "--max_steps", "6", "--save_every", "1", "--keep_last", "3", "--eval_every", "3", "--eval_batches", "1",
        "--sample_prompts", "0", "--tracker", "none", "--lr", "1e-3", "--warmup_steps", "1", "--lora_dropout", "0.1"]
VARIANTS = {
    "fp32": ["--quant", "none", "--compute_dtype", "float32", "--optimizer", "adamw"],
    "nf4_paged8bit": ["--quant", "nf4", "--compute_dtype", "float32", "--optimizer", "paged_adamw_8bit",
                      "--recompute", "true"],
    # rank 64 on hidden 64: most LoRA tensors take 8-bit state, k/v's B (2,048 elements) 32-bit
    "nf4_flat8bit": ["--quant", "nf4", "--compute_dtype", "float32", "--optimizer", "adamw_8bit_flat",
                     "--lora_r", "64"],
}


def train_cmd(out, variant, *extra):
    return [sys.executable, "train.py", *TINY, *VARIANTS[variant], "--output_dir", str(out), *extra]


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def losses(out):
    by_step = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            by_step[rec["step"]] = rec["loss"]  # a resumed run re-logs steps after its checkpoint
    return by_step


def train_steps(out):
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


def kill_after(cmd, out, marker: str, sig=signal.SIGKILL, env=None):
    """Start training, wait until `marker` exists under out, then send `sig`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not (out / marker).exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "marker never appeared"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigkill_then_resume_is_bit_identical(tmp_path, variant):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    r = run(train_cmd(ref, variant))
    assert r.returncode == 0, r.stderr[-3000:]
    kill_after(train_cmd(cut, variant), cut, "checkpoint-3/meta.json")
    assert not (cut / "final").exists()
    r = run(train_cmd(cut, variant, "--resume", "auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resume: from" in r.stderr
    want, got = losses(ref), losses(cut)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    assert got == want  # bit-identical per-step losses (CPU, same shapes, same order)
    # what the killed run logged after checkpoint-3 is dropped: each step is in the log once
    assert train_steps(cut) == list(range(1, 7))
    a = load_file(str(ref / "final" / "adapter_model.safetensors"))
    b = load_file(str(cut / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_at_step_boundary_and_resumes(tmp_path):
    out = tmp_path / "term"
    cmd = train_cmd(out, "fp32", "--save_every", "0", "--max_steps", "50")
    proc = kill_after(cmd, out, "log.jsonl", sig=signal.SIGTERM)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    ckpts = sorted(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "meta.json").is_file()
    step = json.loads((ckpts[0] / "meta.json").read_text())["step"]
    r = run(cmd[:-2] + ["--max_steps", str(step + 1), "--resume", "auto"])
    assert r.returncode == 0 and f"at step {step}" in r.stderr


def test_resume_auto_without_a_checkpoint_starts_this_run_over(tmp_path):
    """A run killed before its first checkpoint (or finished with --save_every 0) leaves config.yaml and
    log.jsonl but no checkpoint: --resume auto starts it over from step 0, with a log that is the fresh
    run's alone; another run's folder is refused without being told to pass the flag it already has."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    cmd = train_cmd(out, "fp32", "--save_every", "0", "--max_steps", "50", "--eval_every", "0")
    kill_after(cmd, out, "log.jsonl")  # the eval baseline at step 0 is logged before any step
    assert not list_checkpoints(out) and (out / "config.yaml").is_file()
    before = snapshot(out)
    line = assert_one_error(run(train_cmd(out, "fp32", "--save_every", "0", "--resume", "auto", "--lora_r", "4")),
                            f"output_dir {out} has no checkpoint to continue", "lora_r: 8 there vs 4 now")
    assert "pass --resume auto" not in line
    assert snapshot(out) == before  # refused: nothing changed
    r = run(train_cmd(ref, "fp32", "--save_every", "0", "--max_steps", "2"))
    assert r.returncode == 0, r.stderr[-2000:]
    for again in range(2):  # the killed run, then the finished one (final/, no checkpoint)
        r = run(train_cmd(out, "fp32", "--save_every", "0", "--max_steps", "2", "--resume", "auto"))
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"resume: no checkpoint in {out}, starting from step 0" in r.stderr
        assert ("final/ is replaced" in r.stderr) == bool(again)
        assert train_steps(out) == [1, 2] and losses(out) == losses(ref)
    assert (out / "final" / "adapter_model.safetensors").read_bytes() == \
        (ref / "final" / "adapter_model.safetensors").read_bytes()


def test_drop_log_after_keeps_what_the_continuation_stands_on(tmp_path):
    log = tmp_path / "log.jsonl"
    recs = [{"kind": "eval", "step": 0}, {"kind": "setup"}] + [{"kind": "train", "step": s} for s in range(1, 6)]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "tra')  # a kill mid-line
    drop_log_after(log, 3)
    assert [json.loads(line) for line in log.read_text().splitlines()] == recs[:5]
    drop_log_after(log, 0)
    assert log.read_text() == ""
    drop_log_after(tmp_path / "none.jsonl", 2)  # no log: nothing to do
    assert not (tmp_path / "none.jsonl").exists()


# every checkpoint write pauses 2 s before meta.json (save_checkpoint's before_commit), so a kill can land there
SLOW_COMMIT = """
import runpy, sys, time
import qlora.training.checkpoint as c
orig = c.save_checkpoint
c.save_checkpoint = lambda *a, **k: orig(*a[:8], before_commit=lambda: time.sleep(2))
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_kill_during_checkpoint_write_keeps_previous_usable(tmp_path):
    out = tmp_path / "w"
    cmd = [sys.executable, "-c", SLOW_COMMIT, *train_cmd(out, "fp32")[2:]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.glob(".tmp-checkpoint-2-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else ""
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert (out / "checkpoint-1" / "meta.json").is_file() and not (out / "checkpoint-2").exists()
    r = run(train_cmd(out, "fp32", "--resume", "auto", "--max_steps", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 1" in r.stderr and (out / "checkpoint-2" / "meta.json").is_file()
    assert not list(out.glob(".tmp-checkpoint-*"))  # the half-written folder was cleaned up


def test_resume_errors_are_clear_and_lose_nothing(tmp_path):
    out = tmp_path / "e"
    r = run(train_cmd(out, "fp32", "--max_steps", "2"))
    assert r.returncode == 0, r.stderr[-2000:]
    before = snapshot(out)

    def error_of(*extra):
        return assert_one_error(run(train_cmd(out, "fp32", *extra)))

    assert "already holds another run" in error_of()
    assert "was made by a different run (lora_r" in error_of("--resume", "auto", "--lora_r", "4")
    # torch AdamW's state into the flat 8-bit one: one line, the checkpoint untouched (checked below)
    assert "its optimizer.pt does not fit optimizer 'adamw_8bit_flat'" in error_of(
        "--resume", "auto", "--optimizer", "adamw_8bit_flat")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text('{"step": 1, "resume_key": {}}')
    assert f"checkpoint {bad} cannot be resumed: trainer_state.json is missing" in error_of("--resume", str(bad))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(out / "checkpoint-2", corrupt)
    (corrupt / "optimizer.pt").write_bytes(b"not a checkpoint")
    line = error_of("--resume", str(corrupt))
    assert f"checkpoint {corrupt} cannot be resumed: optimizer.pt is truncated or not a torch.save file" in line
    assert snapshot(out) == before  # nothing in output_dir was changed


# --------------------------------------------------------------------------- damaged files, in process

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A real 2-step tiny run with checkpoint-1 and checkpoint-2 (fp32, plain AdamW)."""
    import train

    out = tmp_path_factory.mktemp("ck") / "run"
    cfg = tiny_cfg(output_dir=str(out), max_steps=2, save_every=1, keep_last=3, eval_every=0)
    train.main(cfg)
    assert (out / "checkpoint-1" / "meta.json").is_file() and (out / "checkpoint-2" / "meta.json").is_file()
    return out, cfg


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_middle_byte(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


DAMAGE = {  # file -> (how it is damaged, the words the error must contain)
    "adapter_model.safetensors": (_truncate, "adapter_model.safetensors is"),
    "optimizer.pt": (_truncate, "optimizer.pt is truncated or not a torch.save file"),
    "rng.pt": (lambda f: f.write_bytes(b""), "rng.pt is empty (0 bytes)"),
    "trainer_state.json": (lambda f: f.write_text("{}"), "trainer_state.json lacks the keys ['step', 'data', 'world_size']"),
    "meta.json": (lambda f: f.write_text('{"step": 2'), "meta.json is not a JSON object"),
    "adapter_config.json": (lambda f: f.unlink(), "adapter_config.json is missing"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_file_is_named(two_checkpoints, tmp_path, name):
    """Each damaged file gives a CheckpointError that names the checkpoint, the file and what to do."""
    out, cfg = two_checkpoints
    ck = tmp_path / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", ck)
    damage, words = DAMAGE[name]
    damage(ck / name)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ck, cfg)
    assert f"checkpoint {ck} cannot be resumed: {words}" in str(e.value) and "earlier checkpoint" in str(e.value)


def test_corrupt_byte_in_optimizer_state_is_caught(two_checkpoints, tmp_path):
    """A flipped byte inside optimizer.pt (same length, zip structure intact) fails its CRC check."""
    out, cfg = two_checkpoints
    ck = tmp_path / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", ck)
    assert load_checkpoint(ck, cfg)[0]["step"] == 2  # intact first
    _flip_middle_byte(ck / "optimizer.pt")
    with pytest.raises(CheckpointError, match="optimizer.pt (fails its checksum|is truncated)"):
        load_checkpoint(ck, cfg)


def test_resume_auto_falls_back_past_a_damaged_checkpoint(two_checkpoints, tmp_path):
    out, _ = two_checkpoints
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    assert resolve_resume("auto", run_dir) == run_dir / "checkpoint-2"
    _truncate(run_dir / "checkpoint-2" / "adapter_model.safetensors")
    warnings = []
    assert resolve_resume("auto", run_dir, warn=warnings.append) == run_dir / "checkpoint-1"
    assert len(warnings) == 1 and str(run_dir / "checkpoint-2") in warnings[0]
    assert "adapter_model.safetensors" in warnings[0] and "checkpoint-1" in warnings[0]
    (run_dir / "checkpoint-1" / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no readable checkpoint .* trainer_state.json lacks"):
        resolve_resume("auto", run_dir, warn=warnings.append)


def resume_cli(ck, out, *extra):
    """train.py resuming `ck` (of the two_checkpoints run: tiny_cfg, fp32, AdamW) into `out`."""
    return [sys.executable, "train.py", "--model", "random:tiny", "--quant", "none", "--compute_dtype", "float32",
            "--lora_dropout", "0", "--max_seq_len", "256", "--micro_batch_size", "2", "--grad_accum", "1",
            "--recompute", "false", "--optimizer", "adamw", "--warmup_steps", "0", "--tracker", "none",
            "--sample_prompts", "0", "--max_steps", "3", "--output_dir", str(out), "--resume", str(ck), *extra]


@pytest.mark.parametrize("extra,words", [
    (["--optimizer", "paged_adamw_8bit"],
     "its optimizer.pt does not fit optimizer 'paged_adamw_8bit' (it holds torch AdamW state, saved by optimizer "
     "'adamw'): resume with --optimizer adamw"),
    (["--micro_batch_size", "4"], "saved with micro_batch_size 2 (this run: 4)"),
    (["--grad_accum", "2"], "saved with grad_accum 1 (this run: 2)"),
])
def test_resume_with_another_optimizer_or_batch_shape_is_refused(two_checkpoints, tmp_path, extra, words):
    """Another optimizer's state loads without complaint and fails at the first step; another micro-batch
    size or accumulation would skip or repeat rows: each is one error line before anything is written."""
    out, _ = two_checkpoints
    before = snapshot(out)
    line = assert_one_error(run(resume_cli(out / "checkpoint-2", tmp_path / "new", *extra)),
                            f"checkpoint {out / 'checkpoint-2'} cannot be resumed", words)
    assert line.count("resume with") == 1
    assert not (tmp_path / "new").exists() and snapshot(out) == before


def test_optimizer_state_of_another_kind_is_refused_without_a_saved_config(two_checkpoints, tmp_path):
    """A checkpoint without config.yaml: the optimizer state's own keys tell, before any step runs."""
    import train

    out, cfg = two_checkpoints
    ck = tmp_path / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", ck)
    (ck / "config.yaml").unlink()
    new = tmp_path / "new"
    with pytest.raises(CheckpointError, match=r"does not fit optimizer 'adamw_8bit' \(it holds torch AdamW state\)"):
        train.main(replace(cfg, output_dir=str(new), resume=str(ck), optimizer="adamw_8bit"))
    assert not new.exists()


def test_resume_warns_of_another_compute_dtype_and_of_nothing_left_to_train(two_checkpoints, capsys):
    """Resuming in another compute dtype runs but is not the exact run; a checkpoint at max_steps has nothing left
    to train: each says so in a warning line (train.py prints them at start-up); the same run gets none."""
    import train

    out, cfg = two_checkpoints
    ck = out / "checkpoint-2"  # step 2, saved in float32
    assert resume_warnings(ck, replace(cfg, max_steps=4)) == []
    notes = resume_warnings(ck, replace(cfg, compute_dtype="bfloat16", max_steps=2))
    assert len(notes) == 2
    assert "saved computing in float32, this run computes in bfloat16" in notes[0] and "--compute_dtype float32" in notes[0]
    assert "is at step 2 and max_steps is 2: nothing is left to train" in notes[1]
    capsys.readouterr()
    train.main(replace(cfg, output_dir=str(out.parent / "again"), resume=str(ck)))  # max_steps 2: at once
    assert "warning: checkpoint" in capsys.readouterr().err


def test_adapter_of_another_shape_is_refused(two_checkpoints, tmp_path):
    """load_adapter_weights on a model of another LoRA rank (as --resume_force would allow) is a
    CheckpointError naming the file, not a size-mismatch traceback."""
    from qlora.model.trainable import load_model

    out, cfg = two_checkpoints
    model = load_model(tiny_cfg(lora_r=4), torch.device("cpu"))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors does not fit this model"):
        load_adapter_weights(model, out / "checkpoint-2")


def test_saved_safetensors_get_the_umask_mode(two_checkpoints):
    """safetensors writes a private temp file (0600) and renames it; saved files get the umask's mode."""
    out, _ = two_checkpoints
    mask = os.umask(0o022)
    os.umask(mask)
    for f in [out / "final" / "adapter_model.safetensors", out / "checkpoint-2" / "adapter_model.safetensors"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, (f, oct(f.stat().st_mode))


def test_checkpoint_of_another_world_size_is_refused_before_loading(two_checkpoints, tmp_path):
    """Each rank's data shard and RNG stream only fit the same number of processes: refused in setup."""
    import train

    out, cfg = two_checkpoints
    ck = tmp_path / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", ck)
    state = json.loads((ck / "trainer_state.json").read_text())
    (ck / "trainer_state.json").write_text(json.dumps({**state, "world_size": 2}))
    new = tmp_path / "new"
    with pytest.raises(CheckpointError, match="was written by 2 processes, this run has 1: resume with the same"):
        train.main(replace(cfg, output_dir=str(new), resume=str(ck)))
    assert not new.exists()
