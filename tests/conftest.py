"""Shared fixtures: the embedded tokenizer (real SmolLM2 chat template), tiny configs, shared data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Under pytest-xdist (`-n auto`) the cores are split between the workers, and the processes a test starts
# inherit the split: N workers x all cores each would oversubscribe the CPU and run slower than one worker.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, _cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

MAX_WORKERS = 4  # a worker holds a few GiB at its peak (a real model, two FSDP ranks); more rarely pays


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most MAX_WORKERS and one per 6 GiB of memory."""
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 6 * MAX_WORKERS
    return max(1, min(_cores(), MAX_WORKERS, int(mem_gib // 6)))


@pytest.fixture(scope="session")
def tok():
    from qlora.config import load_config
    from qlora.model.base import load_tokenizer

    return load_tokenizer(load_config([]))


def shared_file(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} not available (../shared/data is absent here)")
    return path


def tiny_cfg(tmp_path=None, **kw):
    """A fast CPU config: random:tiny in fp32, full precision unless quant is given."""
    from qlora.config import load_config

    base = dict(model="random:tiny", quant="none", compute_dtype="float32", lora_dropout=0.0,
                max_seq_len=256, micro_batch_size=2, grad_accum=1, tracker="none", sample_prompts=0,
                recompute=False, optimizer="adamw", warmup_steps=0)
    if tmp_path is not None:
        base["output_dir"] = str(tmp_path / "run")
    base.update(kw)
    return load_config([], **base)
