"""FSDP2 pieces: bitsandbytes' 8-bit AdamW on sharded parameters, the fused NF4+LoRA node on gathered
4-bit weights, sharded checkpoints, and the checks that keep a sharded 4-bit base intact.

Under FSDP2 every parameter is a `DTensor` whose local part is this rank's shard (a slice of dim 0).
bitsandbytes' optimizers call their own torch ops (`bitsandbytes::optimizer_update_8bit_blockwise`,
`..._32bit`) on the parameter, its gradient and its state; those ops have no DTensor sharding rule,
so the first `step()` fails ("Operator bitsandbytes.optimizer_update_32bit.default does not have a
sharding strategy registered"). AdamW is element-wise, so it needs no rule: `local_shard_optimizer`
steps each parameter on its local shard, with state of the shard's size (sharded like the
parameters, 1/N per rank). The 8-bit state is quantised in blocks of 256 elements of the flattened
local shard; where a shard does not start on a block boundary of the whole tensor the blocks (and so
the rounding) differ from an unsharded run's, which tests/test_fsdp.py measures.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


# --------------------------------------------------------------------------- 8-bit AdamW on local shards

class LocalShardStep:
    """Mixin for a bitsandbytes `Optimizer2State`/`Optimizer1State` subclass: every DTensor parameter
    is stepped on its local shard (plain parameters as bitsandbytes does). The state is kept under the
    DTensor parameter, so `state_dict`, `load_state_dict`, `param_groups` (lr, Accelerate's swap to the
    sharded parameters) work unchanged; it holds this rank's shard of the state only."""

    def get_config(self, gindex, pindex, group):
        config = super().get_config(gindex, pindex, group)
        p = group["params"][pindex]
        if is_dtensor(p):
            # 8-bit or 32-bit state as for the whole tensor, so a shard never switches precision
            # (bitsandbytes keeps tensors under min_8bit_size elements, e.g. 4096, in 32 bits)
            config["min_8bit_size"] = 0 if p.numel() >= config["min_8bit_size"] else float("inf")
        return config

    def init_state(self, group, p, gindex, pindex):
        with self._on_local_shard(p) as local:
            super().init_state(group, local, gindex, pindex)

    def update_step(self, group, p, gindex, pindex):
        with self._on_local_shard(p) as local:
            if local.numel() == 0:  # a rank past the end of a short dim 0 (e.g. LoRA A's r rows on > r ranks)
                self.state[local]["step"] += 1
            else:
                super().update_step(group, local, gindex, pindex)

    @contextmanager
    def _on_local_shard(self, p):
        """Yield the tensor bitsandbytes should update: `p` itself, or for a DTensor a view of its local
        shard (updates land in FSDP's storage) with the local gradient attached and `p`'s state
        filed under it for the duration."""
        if not is_dtensor(p):
            yield p
            return
        local = p.to_local()
        if not local.is_contiguous():  # bitsandbytes would replace .data by a copy: the update would be lost
            raise RuntimeError(f"8-bit AdamW under FSDP needs contiguous local shards; got a {p.placements} "
                               f"shard with strides {local.stride()}: use optimizer adamw")
        local.grad = p.grad.to_local() if p.grad is not None else None
        self.state[local] = self.state.pop(p, {})
        try:
            yield local
        finally:
            self.state[p] = self.state.pop(local)
            local.grad = None


def local_shard_optimizer(cls: type) -> type:
    """`cls` (a bitsandbytes optimizer class, e.g. `bnb.optim.PagedAdamW8bit`) that also steps FSDP2's
    DTensor parameters, on their local shards. Build it over the plain parameters before
    `accelerator.prepare`, as any optimizer: Accelerate swaps in the sharded ones."""
    return type(f"LocalShard{cls.__name__}", (LocalShardStep, cls), {"__doc__": local_shard_optimizer.__doc__})


# --------------------------------------------------------------------------- fused NF4+LoRA on gathered weights

ABSMAX_CACHE = "_qlora_gathered_absmax"


def fused_forward_gathered(self, x, *args, **kwargs):
    """`qlora.lora_fused._fused_forward` for a peft `lora.Linear4bit` whose base weight FSDP2 shards.

    fully_shard turns each `Params4bit` into a DTensor, which drops its `quant_state`. Around the layer's
    forward (and backward) FSDP2 puts the gathered packed bytes on the module as a plain tensor (shape
    (n, 1), the bytes exactly as quantised); the `QuantState` is no parameter, so FSDP never touches it,
    and bitsandbytes keeps a reference on the module (`Linear4bit.quant_state`). bitsandbytes' own
    forward rebuilds the `Params4bit` from the two (`fix_4bit_weight_quant_state_from_module`, a view:
    no copy); so does this, then runs the fused node. The node keeps that `Params4bit` for backward,
    which shares the gathered tensor's storage: FSDP2 refills it before the layer's backward. The
    dequantised double-quant scales are cached on the module, since the `Params4bit` is new per forward."""
    from .lora_fused import _fused_forward

    base = self.get_base_layer()
    w = base.weight
    if not is_dtensor(w) and getattr(w, "quant_state", None) is None and getattr(base, "quant_state", None) is not None:
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base)
        cached = getattr(base, ABSMAX_CACHE, None)
        if cached is not None:
            base.weight._qlora_absmax = cached
    y = _fused_forward(self, x, *args, **kwargs)
    absmax = getattr(base.weight, "_qlora_absmax", None)
    if absmax is not None:
        setattr(base, ABSMAX_CACHE, absmax)
    return y


def fuse_on_gathered_weights(model) -> int:
    """Let the fused NF4+LoRA linears of `model` (`qlora.lora_fused.fuse_lora`, already applied) run on
    FSDP2-gathered 4-bit weights. Call it after `fuse_lora` and before `accelerator.prepare`. Returns
    how many linears it covers."""
    import types

    from .lora_fused import FUSED_ATTR

    n = 0
    for module in model.modules():
        if getattr(module, FUSED_ATTR, False):
            base = module.get_base_layer()
            if getattr(base, "quant_state", None) is None:  # bitsandbytes sets it when it quantises; make sure
                base.quant_state = getattr(base.weight, "quant_state", None)
            module.forward = types.MethodType(fused_forward_gathered, module)
            n += 1
    return n


# --------------------------------------------------------------------------- sharded checkpoints

def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank}-of-{world}.pt"


def local_training_state(peft_model, optimizer) -> dict:
    """This rank's part of the training state: its shard of every LoRA weight, its shard of the
    optimizer state (DTensors as their local tensors, listed in `dtensor_state` to be rebuilt on
    load) and its RNG state. Every value is a tensor or plain data: `torch.load(weights_only=True)`."""
    from .checkpoint import rng_state

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
    import os

    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([os.getpid()], from_process=0)[0]


def _save_fsynced(obj, path) -> None:
    """torch.save to `path` via `path.partial` + fsync + rename: a shard file is whole or absent."""
    import os

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
    import json
    import os
    import shutil
    import time
    from pathlib import Path

    from .checkpoint import prune, savable_adapter, save_adapter
    from .config import config_hash_fields

    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    step, out = trainer_state["step"], Path(output_dir)
    final, tmp = out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}-{_main_pid(accelerator)}"
    adapter = savable_adapter(accelerator, loss_model)  # all-gathers the LoRA weights: every rank
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
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
    import json
    from pathlib import Path

    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        return None  # the checkpoint's own validation names a missing or broken meta.json
    was_fsdp, was_world = bool(meta.get("fsdp")), int(meta.get("world_size", 1))
    if was_fsdp != fsdp or (was_fsdp and was_world != world):
        how = lambda f, w: f"under FSDP by {w} processes" if f else f"without FSDP by {w} process{'es' * (w > 1)}"
        return (f"it was written {how(was_fsdp, was_world)} and this run is {how(fsdp, world).replace('by', 'with')}: "
                f"resume it {'under FSDP (configs/accelerate/fsdp.yaml)' if was_fsdp else 'without FSDP'} with "
                f"{was_world} processes, or start a new run from its adapter_model.safetensors (a normal peft adapter)")
    return None


def sharded_checkpoint_problem(path) -> str | None:
    """What makes a sharded checkpoint unusable (a shard file missing, empty or not a whole torch.save
    file), or None. Reads the files' structure only, unpickles nothing."""
    import json
    import zipfile
    from pathlib import Path

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    for name in meta.get("shards", []):
        file = path / name
        if not file.is_file() or file.stat().st_size == 0:
            return f"{name} is {'empty (0 bytes)' if file.is_file() else 'missing'}"
        try:
            with zipfile.ZipFile(file) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError):
            return f"{name} is truncated or not a torch.save file"
        if bad:
            return f"{name} fails its checksum (entry {bad}): the file is damaged"
    return None


def restore_sharded_checkpoint(path, cfg, accelerator, peft_model, optimizer, force: bool = False) -> dict:
    """Load this rank's shard of checkpoint `path` into the prepared (sharded) `peft_model` and
    `optimizer` and set this rank's RNG state; returns `trainer_state` (step, data position,
    counters). Every problem is a `CheckpointError` that names the file and what to do."""
    import json
    from pathlib import Path

    from .checkpoint import CheckpointError, set_rng_state
    from .config import config_hash_fields

    path, world, rank = Path(path), accelerator.num_processes, accelerator.process_index
    problem = layout_problem(path, True, world) or sharded_checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: {problem}")
    meta = json.loads((path / "meta.json").read_text())
    mismatch = {k: (v, meta["resume_key"].get(k)) for k, v in config_hash_fields(cfg).items()
                if meta["resume_key"].get(k) != v}
    if mismatch and not force:
        detail = "; ".join(f"{k}: checkpoint {b!r} vs now {a!r}" for k, (a, b) in mismatch.items())
        raise CheckpointError(f"checkpoint {path} was made by a different run ({detail}): use the same "
                              "config, a new output_dir, or --resume_force true")
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
    from .checkpoint import CheckpointError

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
