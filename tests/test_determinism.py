"""`deterministic: true` (qlora/training/determinism.py): the flag reaches torch's settings through train.py's setup,
a setting that cannot be deterministic ends in one error line, nothing changes without it, and two runs
(and a kill + resume) give the same adapter bit for bit. The GPU side is benchmarks/check_determinism_cuda.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from badinput import FAST_TRAIN, ROOT, assert_one_error, run_cli
from conftest import tiny_cfg
from qlora.training import determinism
from qlora.config import load_config


@pytest.fixture
def saved_settings(monkeypatch):
    """The process-wide settings as they were, put back after the test (CUBLAS_WORKSPACE_CONFIG unset)."""
    monkeypatch.delenv(determinism.CUBLAS_VAR, raising=False)
    saved = determinism.settings()
    yield saved
    determinism.restore(saved)
    assert determinism.settings() == saved


def test_flag_reaches_torchs_settings_through_setup(tmp_path, saved_settings, capsys):
    assert not saved_settings["deterministic"]  # torch's default, so the change below is the flag's
    train.setup(tiny_cfg(tmp_path, deterministic=True))
    now = determinism.settings()
    assert now["deterministic"] and not now["warn_only"]  # warn_only would let a nondeterministic kernel run
    assert now["cudnn_deterministic"] and not now["cudnn_benchmark"]
    assert all(v in ("ieee", False) for v in now["tf32"])  # fp32 matmuls in fp32, not TF32
    assert now["bf16_reduction"] is False and now["fp16_reduction"] is False
    assert os.environ[determinism.CUBLAS_VAR] == ":4096:8"
    # torch acts on it, on the CPU too: memory it hands out uninitialised is filled (NaN for floats)
    assert torch.isnan(torch.empty(64)).all()
    assert "deterministic: torch's deterministic kernels on" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # setup writes nothing


def test_without_the_flag_nothing_changes(tmp_path, saved_settings, capsys):
    train.setup(tiny_cfg(tmp_path))
    assert determinism.settings() == saved_settings
    assert "not bitwise reproducible" not in capsys.readouterr().err  # the drift note is for GPU runs only
    cfg = tiny_cfg(tmp_path)
    assert determinism.configure(cfg, cuda=False) == []
    note = determinism.configure(cfg, cuda=True)
    assert len(note) == 1 and "4.5e-4" in note[0] and "--deterministic true" in note[0]
    assert determinism.settings() == saved_settings


def test_a_setting_that_cannot_be_deterministic_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    r = run_cli(["train.py", *FAST_TRAIN, "--deterministic", "true", "--attn_backend", "cudnn",
                 "--output_dir", str(out)])
    assert_one_error(r, "config key 'deterministic'", "attn_backend 'cudnn'", "--attn_backend auto")
    # a cuBLAS workspace setting that is not reproducible, given by the user
    r = run_cli(["train.py", *FAST_TRAIN, "--deterministic", "true", "--output_dir", str(out)],
                env={determinism.CUBLAS_VAR: ":0:0"})
    assert_one_error(r, "CUBLAS_WORKSPACE_CONFIG", "':0:0'", ":4096:8")
    assert not out.exists()


RUN = [*FAST_TRAIN, "--quant", "nf4", "--optimizer", "paged_adamw_8bit", "--recompute", "true",
       "--max_steps", "2", "--save_every", "1", "--eval_batches", "1", "--micro_batch_size", "2",
       "--lora_dropout", "0.1", "--seeded_dropout", "true", "--lr", "1e-3", "--warmup_steps", "1",
       "--deterministic", "true"]


def _train(out, *extra):
    return subprocess.run([sys.executable, "train.py", *RUN, "--output_dir", str(out), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _adapter(out) -> dict:
    return load_file(str(out / "final" / "adapter_model.safetensors"))


def _bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_two_runs_and_a_kill_and_resume_give_the_same_adapter_bit_for_bit(tmp_path, saved_settings):
    """With the mode on: a run, the same run again (in this process), and a run SIGKILLed after
    checkpoint-1 then resumed end in the same adapter. Seeded dropout is on, so the resume must also put
    its mask counter back where it was."""
    a, b, cut = tmp_path / "a", tmp_path / "b", tmp_path / "cut"
    r = _train(a)
    assert r.returncode == 0, r.stderr[-3000:]
    train.main(load_config([*RUN, "--output_dir", str(b)]))
    assert _bitwise_equal(_adapter(a), _adapter(b))
    proc = subprocess.Popen([sys.executable, "train.py", *RUN, "--output_dir", str(cut)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoint-1" / "meta.json").exists():
        assert proc.poll() is None and time.time() < deadline, "checkpoint-1 never appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (cut / "final").exists()
    r = _train(cut, "--resume", "auto")
    assert r.returncode == 0 and "resume: from" in r.stderr, r.stderr[-3000:]
    assert _bitwise_equal(_adapter(a), _adapter(cut))
