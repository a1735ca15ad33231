"""Harness for bad-input cases: run a CLI as a user would and check the project's failure rule.

The rule: exit code 2, exactly one `error: ...` line on stderr, no traceback, and every file that
was in the output folder before the run is byte-identical afterwards (nothing lost or overwritten).

    from badinput import run_cli, assert_one_error, snapshot
    before = snapshot(out_dir)
    r = run_cli(["train.py", "--lr", "nan", "--output_dir", str(out_dir)])
    line = assert_one_error(r, "lr")
    assert snapshot(out_dir) == before
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a 1-step CPU run of the tiny random model: cheap, and fp32 on every CPU
FAST_TRAIN = ["--model", "random:tiny", "--quant", "none", "--compute_dtype", "float32", "--max_steps", "1",
              "--tracker", "none", "--sample_prompts", "0", "--max_seq_len", "256", "--micro_batch_size", "1"]


def run_cli(args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: int = 300,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python *args` (a script path or `-m module` first) offline, capturing text output."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env, input=stdin)


def assert_one_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The failure rule; returns the error line. Each needle must appear in it (case-sensitive)."""
    tail = r.stderr[-3000:]
    assert r.returncode == 2, f"exit code {r.returncode}, expected 2\n{tail}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, tail
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected exactly one 'error:' line, got {len(errors)}\n{tail}"
    assert r.stderr.rstrip().splitlines()[-1] == errors[0], f"the error line must be the last line\n{tail}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes); {} when it does not exist."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    if folder.is_file():
        return {".": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
