"""Optimizer and learning-rate schedule (a pure function of the step, so resuming needs no state)."""

from __future__ import annotations

import math
import warnings

import torch

from ..config import Config, ConfigError
from ..distributed.fsdp import local_shard_optimizer
from ..speed.flat_adam import FlatAdamW8bit


def make_optimizer(params, cfg: Config, fsdp: bool = False) -> torch.optim.Optimizer:
    """Paged 8-bit AdamW (bitsandbytes) by default; `adamw_8bit` unpaged; `adamw_8bit_flat` the same update
    over all tensors at once (qlora/speed/flat_adam.py); `adamw` torch's (one fused kernel for all tensors on
    CUDA). Under
    FSDP2 the bitsandbytes ones step each sharded parameter on its local shard (qlora/distributed/fsdp.py)."""
    params = [p for p in params if p.requires_grad]
    kw = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # on CUDA one fused kernel steps every tensor (fp32 state: 8 bytes per trainable parameter)
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params) and not fsdp
        return torch.optim.AdamW(params, eps=1e-8, fused=fused or None, **kw)
    if cfg.optimizer == "adamw_8bit_flat":
        if fsdp:
            raise ConfigError("config key 'optimizer': adamw_8bit_flat steps whole tensors and cannot step FSDP2's "
                              "shards: use paged_adamw_8bit or adamw")
        return FlatAdamW8bit(params, eps=1e-8, **kw)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    if fsdp:
        cls = local_shard_optimizer(cls)
    with warnings.catch_warnings():
        # on CPU bitsandbytes falls back from paged to unpaged memory; say it once, in our words
        warnings.simplefilter("ignore")
        return cls(params, **kw)


# the optimizer state each choice saves: a checkpoint resumes only with an optimizer of the same kind of state
# (paged and unpaged 8-bit AdamW keep the same state, so either continues the other)
STATE_KIND = {"paged_adamw_8bit": "bitsandbytes 8-bit AdamW", "adamw_8bit": "bitsandbytes 8-bit AdamW",
              "adamw_8bit_flat": "adamw_8bit_flat", "adamw": "torch AdamW"}


def state_kind(state: dict) -> str | None:
    """Which `STATE_KIND` a saved `optimizer.state_dict()` holds, from its keys (None: no per-tensor state
    yet, or one this project does not write)."""
    if not isinstance(state, dict):
        return None
    if state.get("format") == "adamw_8bit_flat":
        return "adamw_8bit_flat"
    for values in (state.get("state") or {}).values():
        if isinstance(values, dict) and "state1" in values:
            return "bitsandbytes 8-bit AdamW"
        if isinstance(values, dict) and "exp_avg" in values:
            return "torch AdamW"
    return None


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `max_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
