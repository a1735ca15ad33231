"""Checkpoints of an FSDP2 run: each rank's shard of the LoRA weights, of the optimizer state and its
RNG state in `shard-<rank>-of-<world>.pt`, beside the gathered peft adapter, written atomically like
`qlora.training.checkpoint.save_checkpoint` (a temporary folder renamed into place, `meta.json` last) and
resumable only by a run with the same layout (FSDP, same number of processes).

    checkpoint-<step>/  adapter_model.safetensors  adapter_config.json  (gathered: a normal peft adapter)
                        shard-0-of-2.pt  shard-1-of-2.pt               (torch.load(weights_only=True))
                        trainer_state.json  config.yaml  tokenizer files  meta.json ("fsdp": true, "shards")
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from .checkpoint import (CheckpointError, check_same_run, prune, rng_state, savable_adapter, save_adapter,
                         set_rng_state, sharded_checkpoint_problem)
from ..config import config_hash_fields
from ..distributed.fsdp import is_dtensor


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank}-of-{world}.pt"


def local_training_state(peft_model, optimizer) -> dict:
    """This rank's part of the training state: its shard of every LoRA weight, its shard of the
    optimizer state (DTensors as their local tensors, listed in `dtensor_state` to be rebuilt on
    load) and its RNG state. Every value is a tensor or plain data: `torch.load(weights_only=True)`."""
    adapter = {n: (p.to_local() if is_dtensor(p) else p).detach().cpu().clone()
               for n, p in peft_model.named_parameters() if p.requires_grad}
    optim = optimizer.state_dict()
    optim["state"] = {pid: dict(values) for pid, values in optim["state"].items()}  # not the live dicts
    dtensor_state = []
    for pid, values in optim["state"].items():
        for key, v in values.items():
            if is_dtensor(v):  # torch AdamW keeps DTensor moments; bitsandbytes here keeps local ones
                values[key] = v.to_local().detach().cpu().clone()
                dtensor_state.append([pid, key])
    return {"adapter": adapter, "optimizer": optim, "dtensor_state": dtensor_state, "rng": rng_state()}


def _main_pid(accelerator) -> int:
    """The main process's pid on every rank: the name of the checkpoint's temporary folder."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([os.getpid()], from_process=0)[0]


def _save_fsynced(obj, path) -> None:
    """torch.save to `path` via `path.partial` + fsync + rename: a shard file is whole or absent."""
    part = path.with_name(path.name + ".partial")
    with open(part, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def save_sharded_checkpoint(accelerator, loss_model, optimizer, tokenizer, cfg, output_dir, trainer_state: dict,
                            before_commit=None):
    """checkpoint-<step> under FSDP2, atomically: every rank writes its `shard-<rank>-of-<world>.pt`
    (LoRA shards, optimizer-state shard, RNG) into `.tmp-checkpoint-<step>-<main pid>/`, then the main
    process adds the gathered peft adapter, `trainer_state.json`, `config.yaml`, `meta.json` last,
    and renames the folder into place. A collective: every rank calls it. Returns the path on the
    main process, None elsewhere. The output_dir must be one filesystem seen by every rank."""
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    step, out = trainer_state["step"], Path(output_dir)
    final, tmp = out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}-{_main_pid(accelerator)}"
    adapter = savable_adapter(accelerator, loss_model)  # all-gathers the LoRA weights: every rank
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # the leftover of an interrupted save of this step
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    tmp.mkdir(parents=True, exist_ok=True)  # a network filesystem may not show another node's new folder yet
    peft_model = accelerator.unwrap_model(loss_model).model
    _save_fsynced({"rank": rank, "world_size": world, **local_training_state(peft_model, optimizer)},
                  tmp / shard_name(rank, world))
    accelerator.wait_for_everyone()  # every shard is on disk before the main process commits
    if main:
        save_adapter(adapter, tokenizer, cfg, tmp)
        state = {**trainer_state, "world_size": world, "fsdp": True}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if before_commit is not None:
            before_commit()
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        meta = {"step": step, "time": time.time(), "complete": True, "resume_key": config_hash_fields(cfg),
                "world_size": world, "fsdp": True, "shards": [shard_name(r, world) for r in range(world)]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the checkpoint complete
        if final.exists():  # the same step saved again (a stop signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(out, cfg.keep_last)
    accelerator.wait_for_everyone()
    return final if main else None


def layout_problem(path, fsdp: bool, world: int) -> str | None:
    """Why checkpoint `path` cannot be resumed by a run with this layout (FSDP or not, `world`
    processes), or None. Sharded optimizer state and RNG streams only fit the same number of ranks."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        return None  # the checkpoint's own validation names a missing or broken meta.json
    was_fsdp, was_world = bool(meta.get("fsdp")), int(meta.get("world_size", 1))
    if was_fsdp == fsdp and (world == was_world or not fsdp):  # DDP's own world-size check is train.py's
        return None
    return (f"it was written {_layout(was_fsdp, was_world, 'by')} and this run is {_layout(fsdp, world, 'with')}: "
            f"resume it {'under FSDP (configs/accelerate/fsdp.yaml)' if was_fsdp else 'without FSDP'} with "
            f"{was_world} process{'es' * (was_world > 1)}, or start a new run from its adapter_model.safetensors "
            "(a normal peft adapter)")


def _layout(fsdp: bool, world: int, by: str) -> str:
    return f"{'under' if fsdp else 'without'} FSDP {by} {world} process{'es' * (world > 1)}"


def restore_sharded_checkpoint(path, cfg, accelerator, peft_model, optimizer, force: bool = False) -> dict:
    """Load this rank's shard of checkpoint `path` into the prepared (sharded) `peft_model` and
    `optimizer` and set this rank's RNG state; returns `trainer_state` (step, data position,
    counters). Every problem is a `CheckpointError` that names the file and what to do."""
    path, world, rank = Path(path), accelerator.num_processes, accelerator.process_index
    problem = layout_problem(path, True, world) or sharded_checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: {problem}")
    check_same_run(path, json.loads((path / "meta.json").read_text()), cfg, force)
    name = shard_name(rank, world)
    try:
        shard = torch.load(path / name, map_location="cpu", weights_only=True)
        state = json.loads((path / "trainer_state.json").read_text())
    except Exception as e:  # unpickling errors have many types; all mean the same to the user
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path} cannot be resumed: {name} or trainer_state.json is unreadable "
                              f"({type(e).__name__}: {first}); resume from an earlier checkpoint") from None
    _load_local_adapter(peft_model, shard["adapter"], path / name)
    optimizer.load_state_dict(_rebuild_dtensor_state(shard["optimizer"], shard["dtensor_state"], optimizer))
    set_rng_state(shard["rng"])
    return state


@torch.no_grad()
def _load_local_adapter(peft_model, saved: dict, file) -> None:
    live = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    if set(live) != set(saved):
        raise CheckpointError(f"{file}: its LoRA tensors do not fit this model (missing "
                              f"{sorted(set(live) - set(saved))[:3]}, unexpected {sorted(set(saved) - set(live))[:3]})")
    for n, p in live.items():
        local = p.to_local() if is_dtensor(p) else p
        if local.shape != saved[n].shape:
            raise CheckpointError(f"{file}: {n} has shape {tuple(saved[n].shape)} here {tuple(local.shape)}: "
                                  "resume with the run's own LoRA config and number of processes")
        local.copy_(saved[n])


def _rebuild_dtensor_state(optim: dict, dtensor_state: list, optimizer) -> dict:
    """The saved optimizer state with the entries that were DTensors (torch AdamW's moments) made
    DTensors again, laid out like their parameter."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, key in dtensor_state:
        p, v = params[int(pid)], optim["state"][pid][key]
        optim["state"][pid][key] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements,
                                                      run_check=False, shape=p.shape, stride=p.stride())
    return optim
