"""Whether a run may start or continue where it is asked to, decided before anything is written.

A fresh run never writes into a folder that holds another run; `--resume auto` with no checkpoint starts the
same run over; a checkpoint is continued only by a run that continues it exactly: the same optimizer kind
(its state would load and fail at the first step), the same micro_batch_size and grad_accum (the saved data
and dropout positions count in them) and the same number of processes (`check_same_run` in checkpoint.py covers
model, LoRA shape, data, row length, packing and seed). What runs but is not the exact run (another compute
dtype) or has nothing to do (a checkpoint at max_steps) is a warning. A continued run's log keeps only the
records its checkpoint stands on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from ..config import Config, config_hash_fields
from .checkpoint import CheckpointError, list_checkpoints
from .optim import STATE_KIND


def check_output_dir(out: Path, resume_from: Path | None, cfg: Config | None = None) -> bool:
    """Refuse, before anything is written, an output_dir that cannot hold this run: a file, a folder
    that cannot be written, or one holding another run (unless that run is being resumed). Returns True
    when `--resume auto` found no checkpoint but `out` holds this same run (same model, LoRA shape, data,
    row length, packing and seed in its config.yaml): it starts over there from step 0."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output_dir {out} is a file, not a folder: choose another --output_dir")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"output_dir {out}: cannot write in {parent} (read-only or not yours): choose "
                              "another --output_dir")
    if resume_from is not None or not out.is_dir():
        return False
    previous = [n for n in ("config.yaml", "log.jsonl", "final") if (out / n).exists()]
    if list_checkpoints(out):
        previous.append("checkpoints")
    if not previous:
        return False
    if cfg is not None and cfg.resume == "auto":  # no checkpoint (resolve_resume found none)
        other = _other_run(out / "config.yaml", cfg)
        if other is None:
            return True
        raise CheckpointError(f"--resume auto: output_dir {out} has no checkpoint to continue and holds another run "
                              f"({', '.join(previous)}; {other}): choose a new --output_dir (nothing was changed)")
    raise CheckpointError(f"output_dir {out} already holds another run ({', '.join(previous)}): pass "
                          "--resume auto to continue it, or choose a new --output_dir (nothing was changed)")


def _other_run(saved: Path, cfg: Config) -> str | None:
    """None when the config.yaml `saved` is of this run (the fields a checkpoint must agree on), else how
    it differs."""
    data = saved_config(saved.parent)
    if data is None:
        return f"its config.yaml is {'unreadable' if saved.exists() else 'missing'}"
    differ = [f"{k}: {data.get(k)!r} there vs {v!r} now" for k, v in config_hash_fields(cfg).items()
              if data.get(k) != v]
    return "; ".join(differ) or None


def saved_config(folder: Path) -> dict | None:
    """The resolved config a run or checkpoint saved in `folder`/config.yaml, or None if it has none
    that reads as a mapping."""
    try:
        data = yaml.safe_load((Path(folder) / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


# what a checkpoint's position is counted in, and what resuming with another value would do
POSITION_KEYS = {"micro_batch_size": "its data position counts micro-batches of that size: another would skip or "
                                     "repeat training rows",
                 "grad_accum": "seeded dropout's position counts steps of that many micro-batches: another would "
                               "draw other dropout masks"}


def resume_problem(path: Path, cfg: Config) -> str | None:
    """Why checkpoint `path` cannot be continued with `cfg`'s optimizer or batch shape (from the config.yaml
    it was saved with), or None. Checked before anything is written: another optimizer's state loads
    without complaint and fails only at the first step."""
    saved = saved_config(path)
    if saved is None:
        return None  # no saved config: restore() checks the optimizer state's own keys
    was = saved.get("optimizer")
    if was in STATE_KIND and STATE_KIND[was] != STATE_KIND.get(cfg.optimizer):
        return (f"its optimizer.pt does not fit optimizer '{cfg.optimizer}' (it holds {STATE_KIND[was]} state, "
                f"saved by optimizer '{was}'): resume with --optimizer {was}, or start a new run without --resume")
    changed = [k for k in POSITION_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        return ("it was saved with " + ", ".join(f"{k} {saved[k]} (this run: {getattr(cfg, k)})" for k in changed)
                + " (" + "; ".join(POSITION_KEYS[k] for k in changed) + "): resume with "
                + " ".join(f"--{k} {saved[k]}" for k in changed) + ", or start a new run without --resume")
    return None


def resume_warnings(path: Path, cfg: Config) -> list[str]:
    """What continuing checkpoint `path` with `cfg` does that the user may not expect, though it runs: another
    compute dtype (the continuation is not the exact run), or a checkpoint already at or past `max_steps`
    (nothing is left to train)."""
    notes = []
    saved = saved_config(path) or {}
    was = saved.get("compute_dtype")
    if was not in (None, "auto", cfg.compute_dtype):
        notes.append(f"checkpoint {path} was saved computing in {was}, this run computes in {cfg.compute_dtype}: it "
                     f"continues, but not as the exact run (--compute_dtype {was} for that)")
    try:
        step = int(json.loads((Path(path) / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, TypeError, KeyError):
        return notes  # load_checkpoint names the problem
    if step >= cfg.max_steps:
        notes.append(f"checkpoint {path} is at step {step} and max_steps is {cfg.max_steps}: nothing is left to "
                     f"train (raise --max_steps to continue)")
    return notes


def saved_world_size(path: Path) -> int | None:
    """The number of processes that wrote checkpoint `path` (its trainer_state.json), or None if unreadable
    (`load_checkpoint` then names the problem)."""
    try:
        return int(json.loads((Path(path) / "trainer_state.json").read_text())["world_size"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def drop_log_after(log: Path, step: int) -> None:
    """Keep in `log` (a run's log.jsonl) only what a run continuing from `step` stands on: the records of
    steps up to `step` (all of them go when it starts over from step 0). Lines that a killed run left
    after its last checkpoint, or half-written, would otherwise mix with the continuation's."""
    log = Path(log)
    if not log.is_file():
        return
    keep = []
    if step > 0:
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and not (isinstance(rec.get("step"), int) and rec["step"] > step):
                keep.append(line)
    tmp = log.with_name(f".{log.name}.{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, log)
