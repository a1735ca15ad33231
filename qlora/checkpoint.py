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
                    trainer_state: dict, rng: dict | None = None, before_commit=None) -> Path:
    """Write checkpoint-<step> atomically (tmp folder, then rename) and prune to `cfg.keep_last`.
    `before_commit()`, if given, runs after every file but meta.json is written (tests kill the
    process there to show an interrupted write is never resumed from)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tokenizer, cfg, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    if before_commit is not None:
        before_commit()
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


# --------------------------------------------------------------------------- the training run's side

def check_output_dir(out: Path, resume_from: Path | None) -> None:
    """Refuse, before anything is written, an output_dir that cannot hold this run: a file, a folder
    that cannot be written, or one holding another run (unless that run is being resumed)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output_dir {out} is a file, not a folder: choose another --output_dir")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"output_dir {out}: cannot write in {parent} (read-only or not yours): choose "
                              "another --output_dir")
    if resume_from is not None or not out.is_dir():
        return
    previous = [n for n in ("config.yaml", "log.jsonl", "final") if (out / n).exists()]
    if list_checkpoints(out):
        previous.append("checkpoints")
    if previous:
        raise CheckpointError(f"output_dir {out} already holds another run ({', '.join(previous)}): pass "
                              "--resume auto to continue it, or choose a new --output_dir (nothing was changed)")


def savable_adapter(accelerator, loss_model):
    """What `save_adapter` saves: the peft model itself (one process, DDP), or under FSDP2 a stand-in
    whose `save_pretrained` writes the full LoRA tensors, gathered from every rank's shards (a
    collective: all ranks must call this; only the main process then saves)."""
    peft_model = accelerator.unwrap_model(loss_model).model
    if not accelerator.is_fsdp2:
        return peft_model
    from types import SimpleNamespace

    from torch.distributed.tensor import DTensor

    # full_tensor(): a collective all-gather of each LoRA weight (small); then a private CPU copy
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            for n, p in peft_model.named_parameters() if p.requires_grad}
    return SimpleNamespace(save_pretrained=lambda path, **kw: peft_model.save_pretrained(path, state_dict=full, **kw))


def save_training_checkpoint(accelerator, loss_model, optimizer, tokenizer, cfg: Config, output_dir: Path,
                             trainer_state: dict, before_commit=None) -> Path | None:
    """checkpoint-<step> of a training run: the adapter, optimizer, every rank's RNG state and
    `trainer_state` (step, data position, counters). A collective: every rank calls it; the main
    process writes; returns the path there (None on other ranks)."""
    world = accelerator.num_processes
    rngs = accelerator.gather_for_metrics([rng_state()], use_gather_object=True) if world > 1 else [rng_state()]
    adapter = savable_adapter(accelerator, loss_model)
    path = None
    if accelerator.is_main_process:
        state = {**trainer_state, "world_size": world, "fsdp": accelerator.is_fsdp2}
        path = save_checkpoint(output_dir, trainer_state["step"], adapter, tokenizer, optimizer, cfg, state,
                               {f"rank{i}": r for i, r in enumerate(rngs)}, before_commit)
    accelerator.wait_for_everyone()
    return path
