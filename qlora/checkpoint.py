"""Checkpoints that are never half-written, and everything needed to resume a run exactly.

`<output_dir>/checkpoint-<step>/` holds: the adapter (safetensors, loadable by
`peft.PeftModel.from_pretrained`), `optimizer.pt` (8-bit AdamW state; loaded with
`weights_only=True`, so no code runs on load), `trainer_state.json` (step, data position, counters),
`rng.pt` (python, numpy, torch, CUDA RNG states), `config.yaml` and `meta.json`. A checkpoint is
written into a temporary folder and renamed into place; `meta.json` is written last, so a folder
without it is incomplete and never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .config import Config, config_hash_fields, save_config

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says which and why."""


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_rest": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    name, pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_adapter(model, tokenizer, cfg: Config, path: Path) -> None:
    """Adapter (safetensors) + adapter_config.json + tokenizer + resolved config into `path`."""
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    save_config(cfg, path / "config.yaml")


def save_checkpoint(output_dir: Path, step: int, model, tokenizer, optimizer, cfg: Config,
                    trainer_state: dict, rng: dict | None = None) -> Path:
    """Write checkpoint-<step> atomically (tmp folder, then rename) and prune to `cfg.keep_last`."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tokenizer, cfg, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    if os.environ.get("QLORA_TEST_SAVE_DELAY"):  # tests kill the process here, mid-write
        time.sleep(float(os.environ["QLORA_TEST_SAVE_DELAY"]))
    meta = {"step": step, "time": time.time(), "complete": True, "resume_key": config_hash_fields(cfg),
            "world_size": trainer_state.get("world_size", 1)}
    _fsync_dir_files(tmp)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the checkpoint complete
    if final.exists():  # re-saving the same step (e.g. signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(output_dir, cfg.keep_last)
    return final


def _fsync_dir_files(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first."""
    out = []
    if Path(output_dir).is_dir():
        for p in Path(output_dir).iterdir():
            m = CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / "meta.json").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def prune(output_dir: Path, keep_last: int) -> None:
    for _, p in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(output_dir).glob(".tmp-checkpoint-*"):
        if not p.name.endswith(f"-{os.getpid()}"):  # leftovers of killed runs
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """`""`: none; `auto`: newest complete checkpoint in `output_dir` (or none); else a path."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
    return path


def load_checkpoint(path: Path, cfg: Config, force: bool = False) -> tuple[dict, dict, dict]:
    """Validate and read a checkpoint: (trainer_state, optimizer_state, rng_state). The adapter
    weights are loaded by the caller with `load_adapter_weights`."""
    path = Path(path)
    need = ["meta.json", "trainer_state.json", "optimizer.pt", "rng.pt", "adapter_model.safetensors"]
    missing = [n for n in need if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt (missing {', '.join(missing)}): "
                              "resume from an earlier checkpoint or start a new output_dir")
    try:
        meta = json.loads((path / "meta.json").read_text())
        state = json.loads((path / "trainer_state.json").read_text())
        optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(e).__name__}: {first}): "
                              "resume from an earlier checkpoint") from None
    mismatch = {k: (v, meta["resume_key"].get(k)) for k, v in config_hash_fields(cfg).items()
                if meta["resume_key"].get(k) != v}
    if mismatch and not force:
        detail = "; ".join(f"{k}: checkpoint {b!r} vs now {a!r}" for k, (a, b) in mismatch.items())
        raise CheckpointError(f"checkpoint {path} was made by a different run ({detail}): use the same "
                              "config, a new output_dir, or --resume_force true")
    return state, optim, rng


def load_adapter_weights(model, path: Path) -> None:
    """Copy the saved adapter tensors into the live LoRA parameters (strict: every one must match)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(path) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(f"checkpoint {path}: adapter tensors do not fit this model ({unexpected[:3]})")
