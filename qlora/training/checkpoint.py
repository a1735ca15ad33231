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
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..config import Config, config_hash_fields, save_config
from ..filecheck import safetensors_shapes, torch_file_problem, umask_mode

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
    umask_mode(Path(path).glob("*.safetensors"))


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


_JSON_KEYS = {"meta.json": ("step", "resume_key"), "trainer_state.json": ("step", "data", "world_size")}


def checkpoint_problem(path: Path) -> str | None:
    """What makes checkpoint `path` unusable ("optimizer.pt is truncated ..."), or None: the first file
    that is missing, empty, truncated or unreadable. Reads every file's structure, unpickles nothing."""
    path = Path(path)
    sharded = _is_sharded(path)  # an FSDP2 checkpoint: per-rank shard files instead of optimizer.pt, rng.pt
    for name in ("meta.json", "trainer_state.json", "adapter_config.json", "adapter_model.safetensors",
                 *(() if sharded else ("optimizer.pt", "rng.pt"))):
        file = path / name
        why = None
        if not file.is_file():
            why = "is missing"
        elif file.stat().st_size == 0:
            why = "is empty (0 bytes)"
        elif name.endswith(".json"):
            try:
                data = json.loads(file.read_text())
                lacking = [k for k in _JSON_KEYS.get(name, ()) if k not in data]
                why = f"lacks the keys {lacking}" if lacking else None
            except (ValueError, TypeError):  # TypeError: valid JSON that is not an object
                why = "is not a JSON object"
        elif name.endswith(".safetensors"):
            try:
                safetensors_shapes(file)
            except ValueError as e:
                why = str(e)
        else:
            why = torch_file_problem(file)
        if why:
            return f"{name} {why}"
    if sharded:
        return sharded_checkpoint_problem(path)
    return None


def sharded_checkpoint_problem(path) -> str | None:
    """What makes a sharded checkpoint unusable (a shard file missing, empty or not a whole torch.save
    file), or None. Reads the files' structure only, unpickles nothing."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    for name in meta.get("shards", []):
        file = path / name
        if not file.is_file() or file.stat().st_size == 0:
            return f"{name} is {'empty (0 bytes)' if file.is_file() else 'missing'}"
        why = torch_file_problem(file)
        if why:
            return f"{name} {why}"
    return None


def _is_sharded(path: Path) -> bool:
    try:
        return bool(json.loads((Path(path) / "meta.json").read_text()).get("fsdp"))
    except (OSError, ValueError, AttributeError):
        return False


def resolve_resume(resume: str, output_dir: Path, warn=None) -> Path | None:
    """`""`: none; `auto`: the newest complete *and readable* checkpoint in `output_dir` (or none), each
    damaged newer one skipped with `warn(message)` (default: a `warning:` line on stderr); else a path,
    checked by `load_checkpoint`."""
    if not resume:
        return None
    if resume != "auto":
        if not Path(resume).is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
        return Path(resume)
    found = [p for _, p in reversed(list_checkpoints(output_dir))]
    for k, path in enumerate(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if k == len(found) - 1:
            raise CheckpointError(f"--resume auto: no readable checkpoint in {output_dir} (last tried {path.name}: "
                                  f"{problem}): start a new output_dir")
        (warn or _warn)(f"skipping damaged checkpoint {path} ({problem}); trying {found[k + 1].name}")
    return None


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def load_checkpoint(path: Path, cfg: Config, force: bool = False) -> tuple[dict, dict, dict]:
    """Validate and read a checkpoint: (trainer_state, optimizer_state, rng_state). The adapter
    weights are loaded by the caller with `load_adapter_weights`. Every problem is a CheckpointError
    that names the file."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: {problem}; resume from an earlier "
                              "checkpoint (--resume PATH) or start a new output_dir")
    meta = json.loads((path / "meta.json").read_text())
    state = json.loads((path / "trainer_state.json").read_text())
    loaded = {}
    for name in ("optimizer.pt", "rng.pt"):
        try:
            loaded[name] = torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors have many types; all mean the same to the user
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(f"checkpoint {path} cannot be resumed: {name} is unreadable "
                                  f"({type(e).__name__}: {first}); resume from an earlier checkpoint") from None
    rng = loaded["rng.pt"]
    ranks = ([rng] if "torch" in rng else list(rng.values())) if isinstance(rng, dict) else []
    if not ranks or not all(isinstance(r, dict) and "torch" in r for r in ranks):
        raise CheckpointError(f"checkpoint {path} cannot be resumed: rng.pt holds no RNG state "
                              "(python/numpy/torch); resume from an earlier checkpoint")
    check_same_run(path, meta, cfg, force)
    return state, loaded["optimizer.pt"], rng


def check_same_run(path: Path, meta: dict, cfg: Config, force: bool = False) -> None:
    """Refuse to resume checkpoint `path` (its meta.json `meta`) with another model, LoRA shape, data,
    row length, packing or seed, unless `force`."""
    mismatch = {k: (v, meta["resume_key"].get(k)) for k, v in config_hash_fields(cfg).items()
                if meta["resume_key"].get(k) != v}
    if mismatch and not force:
        detail = "; ".join(f"{k}: checkpoint {b!r} vs now {a!r}" for k, (a, b) in mismatch.items())
        raise CheckpointError(f"checkpoint {path} was made by a different run ({detail}): use the same "
                              "config, a new output_dir, or --resume_force true")


def load_adapter_weights(model, path: Path) -> None:
    """Copy the saved adapter tensors into the live LoRA parameters (strict: every saved tensor must
    fit, and every LoRA parameter of the model must be saved)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(path) / "adapter_model.safetensors"
    try:
        safetensors_shapes(file)
        weights = load_file(str(file))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path}: adapter_model.safetensors {e}; resume from an earlier "
                              "checkpoint") from None
    missing = sorted(set(get_peft_model_state_dict(model)) - set(weights))
    try:
        unexpected = getattr(set_peft_model_state_dict(model, weights), "unexpected_keys", [])
    except RuntimeError as e:  # shape mismatch (a different LoRA shape resumed with --resume_force)
        unexpected = [str(e).strip().splitlines()[-1][:150]]
    if unexpected or missing:
        raise CheckpointError(f"checkpoint {path}: adapter_model.safetensors does not fit this model (unexpected "
                              f"{unexpected[:3]}, missing {missing[:3]}): resume with the run's own LoRA config")


# --------------------------------------------------------------------------- the training run's side

def savable_adapter(accelerator, loss_model):
    """What `save_adapter` saves: the peft model itself (one process, DDP), or under FSDP2 a stand-in
    whose `save_pretrained` writes the full LoRA tensors, gathered from every rank's shards (a
    collective: all ranks must call this; only the main process then saves)."""
    peft_model = accelerator.unwrap_model(loss_model).model
    if not accelerator.is_fsdp2:
        return peft_model
    from torch.distributed.tensor import DTensor

    # full_tensor(): a collective all-gather of each LoRA weight (small); then a private CPU copy
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            for n, p in peft_model.named_parameters() if p.requires_grad}
    return SimpleNamespace(save_pretrained=lambda path, **kw: peft_model.save_pretrained(path, state_dict=full, **kw))


def save_training_checkpoint(accelerator, loss_model, optimizer, tokenizer, cfg: Config, output_dir: Path,
                             trainer_state: dict, before_commit=None) -> Path | None:
    """checkpoint-<step> of a training run: the adapter, optimizer, every rank's RNG state and
    `trainer_state` (step, data position, counters). A collective: every rank calls it; the main
    process writes; returns the path there (None on other ranks). Under FSDP2 each rank writes its own
    shard instead: `qlora.training.fsdp_checkpoint.save_sharded_checkpoint`."""
    if accelerator.is_fsdp2:  # each rank writes its own shard: qlora.training.fsdp_checkpoint
        raise CheckpointError("under FSDP2 save with qlora.training.fsdp_checkpoint.save_sharded_checkpoint")
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
