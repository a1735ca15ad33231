"""Exact resume after a hard kill, atomic checkpoints, and clear errors on bad resume input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

TINY = ["--model", "random:tiny", "--max_seq_len", "256", "--micro_batch_size", "2", "--grad_accum", "2",
        "--max_steps", "6", "--save_every", "1", "--keep_last", "3", "--eval_every", "3", "--eval_batches", "1",
        "--sample_prompts", "0", "--tracker", "none", "--lr", "1e-3", "--warmup_steps", "1", "--lora_dropout", "0.1"]
VARIANTS = {
    "fp32": ["--quant", "none", "--compute_dtype", "float32", "--optimizer", "adamw"],
    "nf4_paged8bit": ["--quant", "nf4", "--compute_dtype", "float32", "--optimizer", "paged_adamw_8bit",
                      "--gradient_checkpointing", "true"],
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


def test_kill_during_checkpoint_write_keeps_previous_usable(tmp_path):
    out = tmp_path / "w"
    # every checkpoint write pauses 2 s before meta.json; checkpoint-2's write is killed in that pause
    proc = subprocess.Popen(train_cmd(out, "fp32"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "QLORA_TEST_SAVE_DELAY": "2"})
    deadline = time.time() + 300
    while not list(out.glob(".tmp-checkpoint-2-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline
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
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def error_of(*extra):
        res = run(train_cmd(out, "fp32", *extra))
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        return res.stderr.strip().splitlines()[-1]

    assert "already holds checkpoints of another run" in error_of()
    assert "was made by a different run (lora_r" in error_of("--resume", "auto", "--lora_r", "4")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text("{}")
    assert "incomplete or corrupt (missing trainer_state.json" in error_of("--resume", str(bad))
    ck = out / "checkpoint-2"
    corrupt = tmp_path / "corrupt"
    import shutil
    shutil.copytree(ck, corrupt)
    (corrupt / "optimizer.pt").write_bytes(b"not a checkpoint")
    assert f"checkpoint {corrupt} is corrupt" in error_of("--resume", str(corrupt))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing in output_dir was lost
