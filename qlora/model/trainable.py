"""A base model made trainable: LoRA adapters (peft) on the frozen 4-bit base, activation checkpointing
of chosen layers, the fused NF4+LoRA node and liger kernels. `load_model(cfg, device)` is the whole
recipe; where the base comes from is `qlora.model.base`, how it is quantised `qlora.model.quant`.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelLoadError, load_base_model
from ..config import Config
from ..distributed.fsdp import fuse_on_gathered_weights
from ..speed.kernels import LIGER_ATTR, NO_PATCH_ATTR, use_kernels
from .layerwise import decoder_layers
from ..speed import nf4_kernel
from ..speed.lora_fused import FP8_ATTR, FUSED_ATTR, KERNEL_ATTR, dropout_seed, fuse_lora
from ..speed.keep_attention import keep_attention_contexts
from ..speed.offload import offloaded_checkpoint
from ..speed.grouped import count as grouped_count, group_projections
from ..speed.rebuild import count as rebuilt_count, use_rebuilt_inputs
from ..speed.tiled_mlp import TILED_ATTR, tile_mlps
from ..speed.seeded_dropout import new_seed


# Projections some families fuse into one linear (Phi-3): the fused name stands for its parts.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def linear_names(model) -> list[str]:
    """The distinct last names of `model`'s linear layers, in order (e.g. q_proj, ..., lm_head)."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)))


def resolve_lora_targets(targets: list[str], linears: list[str], default: bool, model_name: str) -> list[str]:
    """`targets` as names of linears that exist. The default (all seven projections) becomes what the
    family has: on Phi-3 q/k/v are `qkv_proj` and gate/up `gate_up_proj`. Names given explicitly are
    taken as they are; one that is not a linear layer is an error listing those that are."""
    if default:
        fused = {part: name for name, parts in FUSED_PROJECTIONS.items() if name in linears for part in parts}
        targets = list(dict.fromkeys(fused.get(t, t) for t in targets if t in linears or t in fused))
    missing = [t for t in targets if t not in linears]
    if missing:
        inside = [f"{t} is part of {name}" for t in missing for name, parts in FUSED_PROJECTIONS.items()
                  if t in parts and name in linears]
        raise ModelLoadError(f"config key 'lora_targets': {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                             f"not a linear layer of {model_name}{' (' + '; '.join(inside) + ')' if inside else ''}; "
                             f"its linear layers are {', '.join(linears)}: set --lora_targets to some of these "
                             "(comma-separated)")
    return targets


def add_lora(model, cfg: Config):
    """Wrap the frozen base with peft LoRA adapters on `cfg.lora_targets` (fp32 adapter weights)."""
    from peft import LoraConfig, get_peft_model

    default = list(cfg.lora_targets) == Config().lora_targets
    targets = resolve_lora_targets(list(cfg.lora_targets), linear_names(model), default, cfg.model)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)  # LoRA A init is random: same seed, same adapter at step 0
    return get_peft_model(model, lora)


def untrained_adapters(model_or_tensors) -> list[str]:
    """Names of the LoRA B weights that are still exactly zero, i.e. never moved from their init: no
    gradient ever reached those adapters. Takes a peft model or a {name: tensor} mapping (a loaded
    adapter_model.safetensors). An FSDP-sharded weight is judged by this rank's shard (no collective,
    so the main process alone may call it): Adam moves every element that ever had a non-zero
    gradient, so a trained B has no all-zero shard in practice."""
    if hasattr(model_or_tensors, "named_parameters"):
        items = [(n, p) for n, p in model_or_tensors.named_parameters() if p.requires_grad]
    else:
        items = list(model_or_tensors.items())
    frozen = []
    for name, t in items:
        if "lora_B" not in name:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard
        if local.numel() and not bool(local.detach().any()):
            frozen.append(name)
    return frozen


def enable_checkpointing(model, layers: int = -1, preserve_rng: bool = True, offload: bool = False,
                         keep_attention: bool = False) -> int:
    """Non-reentrant activation checkpointing (no need for inputs that require grad; composes with DDP
    without the unused-parameter search) of the first `layers` decoder layers (-1: all). The others
    keep their activations: faster (no recompute) at the cost of memory. `preserve_rng` stashes and
    restores the RNG state for the recompute (needed only when the layer draws random numbers: torch's
    dropout); `offload` keeps the checkpointed inputs in host memory (qlora/speed/offload.py);
    `keep_attention` keeps each recomputed layer's attention output instead of running the kernel again
    (qlora/speed/keep_attention.py). Returns how many layers recompute."""
    # transformers >= 5.24 names it activation checkpointing; the old name warns there
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    context_fn = keep_attention_contexts if keep_attention else None
    enable({"use_reentrant": False, "preserve_rng_state": preserve_rng,
            **({"context_fn": context_fn} if context_fn else {})})
    blocks = decoder_layers(model)
    keep = len(blocks) if layers < 0 else min(layers, len(blocks))
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i < keep
        block._qlora_keeps_attention = keep_attention and i < keep
        if offload and i < keep:
            block._gradient_checkpointing_func = offloaded_checkpoint(preserve_rng, context_fn)
    return keep


UNGROUPED_ATTR = "qlora_nothing_grouped"  # set on a model where group_projections found no set to group


def describe_speedups(model) -> str:
    """One line: how many layers recompute, how many linears are fused, which kernels are in."""
    blocks = decoder_layers(model)
    ckpt = sum(bool(getattr(b, "gradient_checkpointing", False)) for b in blocks)
    kept = sum(bool(getattr(b, "gradient_checkpointing", False) and getattr(b, "_qlora_keeps_attention", False))
               for b in blocks)
    fused = sum(bool(getattr(m, FUSED_ATTR, False)) for m in model.modules())
    liger = sum(bool(getattr(m, LIGER_ATTR, False)) for m in model.modules())
    fp8 = sum(bool(getattr(m, FP8_ATTR, False)) for m in model.modules())
    norms, mlps = rebuilt_count(model)
    extras = (", seeded LoRA dropout" if dropout_seed(model) is not None else "") + \
        (f", FP8 base GEMMs in {fp8}" if fp8 else "") + \
        nf4_kernel_note(model) + \
        (f", inputs rebuilt in backward from {norms} norms and {mlps} MLPs" if norms or mlps else "") + \
        (f", {grouped} projections grouped by shared input" if (grouped := grouped_count(model)) else "") + \
        (f", MLPs in tiles of {tiled[0]} tokens" if (tiled := [m._qlora_tile for m in model.modules()
                                                           if hasattr(m, TILED_ATTR)]) else "")
    if getattr(model, UNGROUPED_ATTR, False):
        extras += (", group_projections on but no q/k/v or gate/up set whose every member is a fused NF4+LoRA "
                   "linear (fused projections such as Phi-3's, or LoRA targets without the whole set)")
    unpatched = getattr(model, NO_PATCH_ATTR, None)
    off = f"off (liger-kernel has no patch for model type '{unpatched}')" if unpatched else "off"
    kept_note = f" (attention output kept in {kept})" if kept else ""
    return (f"checkpointing {ckpt}/{len(blocks)} layers{kept_note}, fused NF4+LoRA linears {fused}{extras}, "
            f"liger kernels {f'on ({liger} modules)' if liger else off}")


def nf4_kernel_note(model) -> str:
    """Where `nf4_kernel` is on: how many fused linears with bf16 base GEMMs dequantise by qlora/speed/nf4_kernel.py's
    kernel, or that bitsandbytes' kernel does it on this device (under FSDP2 the quant_state waits on the module)."""
    asked = covered = 0
    for m in model.modules():
        if getattr(m, KERNEL_ATTR, False) and not getattr(m, FP8_ATTR, False):
            base = m.get_base_layer()
            qs = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
            asked += 1
            covered += qs is not None and nf4_kernel.covers(base.weight, qs.dtype, qs)
    if covered:
        return f", 4-bit weights dequantised by the Triton kernel in {covered}"
    return ", 4-bit weights dequantised by bitsandbytes' kernel (nf4_kernel: no Triton on this device)" if asked else ""


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting 4-bit weights by their logical element count."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") and p.quant_state is not None:
            n = int(torch.Size(p.quant_state.shape).numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def load_model(cfg: Config, device: torch.device, fsdp: bool = False):
    """Base (4-bit unless `quant=none`) + LoRA + checkpointing + the fused paths, ready to train. Under
    FSDP2 with `fsdp_low_memory_load` the base is read one decoder layer at a time and, on an accelerator,
    each layer waits in host memory: `fully_shard` (in `accelerator.prepare`) then moves one layer at a
    time to the GPU and keeps this rank's shard, so the GPU never holds the whole model."""
    low = fsdp and cfg.fsdp_low_memory_load
    park = torch.device("cpu") if low and device.type != "cpu" else None
    return prepare_for_training(load_base_model(cfg, device, layerwise=low, park=park), cfg, device, fsdp)


def prepare_for_training(base, cfg: Config, device: torch.device, fsdp: bool = False):
    """LoRA, checkpointing of `cfg.recompute_layers`, fused NF4+LoRA linears and kernels on a loaded
    base. Under FSDP2 the fused node runs on each layer's gathered 4-bit weights (qlora/distributed/fsdp.py)."""
    model = add_lora(base, cfg)
    fused = cfg.fused_lora
    seeded = fused and cfg.lora_dropout > 0 and (cfg.seeded_dropout or cfg.cuda_graphs)
    if cfg.recompute:
        # only torch's dropout draws random numbers in a layer; a seeded mask needs no RNG state
        enable_checkpointing(model, cfg.recompute_layers, preserve_rng=cfg.lora_dropout > 0 and not seeded,
                             offload=cfg.offload_recompute, keep_attention=not cfg.recompute_attention)
    if fused:
        fuse_lora(model, cfg.absmax_cache, new_seed(cfg.seed, device) if seeded else None, cfg.base_fp8,
                  cfg.fp8_exclude, cfg.nf4_kernel)
        if fsdp:  # FSDP2 hands each layer its gathered 4-bit bytes without their quant_state
            fuse_on_gathered_weights(model)
        elif cfg.group_projections and not group_projections(model):
            setattr(model, UNGROUPED_ATTR, True)  # asked for, applies to nothing: said at start-up
    use_kernels(model, cfg.kernels, device, fsdp)
    if cfg.rebuild_inputs and fused:  # after the kernels: it wraps the forwards they set
        use_rebuilt_inputs(decoder_layers(model))
    if cfg.mlp_tile_tokens:  # last: it wraps whatever MLP forward is in place
        tile_mlps(decoder_layers(model), cfg.mlp_tile_tokens, preserve_rng=cfg.lora_dropout > 0 and not seeded)
    return model
