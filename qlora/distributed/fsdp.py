"""FSDP2 pieces: bitsandbytes' 8-bit AdamW on sharded parameters, the fused NF4+LoRA node on gathered
4-bit weights, and the check that keeps a sharded 4-bit base intact (checkpoints: `qlora.training.fsdp_checkpoint`).

Under FSDP2 every parameter is a `DTensor` whose local part is this rank's shard (a slice of dim 0).
bitsandbytes' optimizers call their own torch ops (`bitsandbytes::optimizer_update_8bit_blockwise`,
`..._32bit`) on the parameter, its gradient and its state (made by `zeros_like(param)`: DTensors too);
those ops have no DTensor sharding rule, so the first `step()` fails: "got mixed torch.Tensor and
DTensor" (8-bit state, whose quantisation maps and block maxima are plain tensors) or "does not have
a sharding strategy registered" (the 32-bit state of tensors under 4096 elements). AdamW is
element-wise, so it needs no rule: `local_shard_optimizer`
steps each parameter on its local shard, with state of the shard's size (sharded like the
parameters, 1/N per rank). The 8-bit state is quantised in blocks of 256 elements of the flattened
local shard; where a shard does not start on a block boundary of the whole tensor the blocks (and so
the rounding) differ from an unsharded run's, which tests/test_fsdp.py measures.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

from ..speed.lora_fused import FUSED_ATTR, _fused_forward


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
    """`qlora.speed.lora_fused._fused_forward` for a peft `lora.Linear4bit` whose base weight FSDP2 shards.

    fully_shard turns each `Params4bit` into a DTensor, which drops its `quant_state`. Around the layer's
    forward (and backward) FSDP2 puts the gathered packed bytes on the module as a plain tensor (shape
    (n, 1), the bytes exactly as quantised); the `QuantState` is no parameter, so FSDP never touches it,
    and bitsandbytes keeps a reference on the module (`Linear4bit.quant_state`). bitsandbytes' own
    forward rebuilds the `Params4bit` from the two (`fix_4bit_weight_quant_state_from_module`, a view:
    no copy); so does this, then runs the fused node. The node keeps that `Params4bit` for backward,
    which shares the gathered tensor's storage: FSDP2 refills it before the layer's backward. The
    dequantised double-quant scales are cached on the module, since the `Params4bit` is new per forward."""
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
    """Let the fused NF4+LoRA linears of `model` (`qlora.speed.lora_fused.fuse_lora`, already applied) run on
    FSDP2-gathered 4-bit weights. Call it after `fuse_lora` and before `accelerator.prepare`. Returns
    how many linears it covers."""
    n = 0
    for module in model.modules():
        if getattr(module, FUSED_ATTR, False):
            base = module.get_base_layer()
            if getattr(base, "quant_state", None) is None:  # bitsandbytes sets it when it quantises; make sure
                base.quant_state = getattr(base.weight, "quant_state", None)
            module.forward = types.MethodType(fused_forward_gathered, module)
            n += 1
    return n
