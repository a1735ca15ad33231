"""Logging helpers kept out of the loop: memory probes, throughput, the per-step log line, and
the JSON-lines run log that `python -m qlora.curves` plots."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated memory: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def allocated_per_rank_gib(accelerator, device: torch.device) -> list[float]:
    """CUDA memory allocated now on every rank (a collective: all ranks call it); [] off CUDA."""
    if device.type != "cuda":
        return []
    mine = torch.tensor([torch.cuda.memory_allocated(device) / 2**30], device=device)
    return accelerator.gather(mine).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RunLog:
    """Appends one JSON object per event to `<output_dir>/log.jsonl` (main process only)."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.path = Path(output_dir) / "log.jsonl"
        self.enabled = enabled

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Throughput:
    """Tokens per second between log points (wall clock, after a device sync)."""

    def __init__(self):
        self.t0, self.tokens, self.supervised = time.perf_counter(), 0, 0

    def add(self, tokens: int, supervised: int) -> None:
        self.tokens += tokens
        self.supervised += supervised

    def read(self) -> tuple[float, float, float]:
        """(tokens/s, supervised tokens/s, seconds) since the last read; resets the window."""
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        out = (self.tokens / dt, self.supervised / dt, dt)
        self.t0, self.tokens, self.supervised = now, 0, 0
        return out


def format_step(rec: dict) -> str:
    return (f"step {rec['step']:>5} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f}"
            f" | tok/s {rec['tokens_per_s']:,.0f} (sup {rec['supervised_tokens_per_s']:,.0f})"
            f" | pack {rec['packing_efficiency']:.0%} | mem {rec['peak_mem_gib']:.2f} GiB")


def say(msg: str) -> None:
    """A message on stderr that never lands inside an active tqdm progress bar's line."""
    tqdm.write(msg, file=sys.stderr)
    sys.stderr.flush()
