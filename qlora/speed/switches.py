"""The speed and memory switches: one table of what each does, what it needs and what it excludes, and the
one validator that reads it.

Every switch is a `Config` key. `check_switches` runs in train.py's setup (and in benchmarks/bench.py)
before any model is loaded: the first requirement that a switch in use does not meet stops the run with
one line, `config key 'X' needs Y; set --X Z or change that`. The README's switch table is this table
(`python -m qlora.speed.switches` prints it; tests/test_config.py checks that they agree).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

from . import attention, fp8
from ..config import Config, ConfigError
from .kernels import liger_available


@dataclass(frozen=True)
class Where:
    """What the validator knows besides the config: the device and how many processes run."""
    device: torch.device
    processes: int = 1
    fsdp: bool = False


@dataclass(frozen=True)
class Need:
    what: str  # completes "config key 'X' needs ..."
    met: Callable[[Config, Where], bool | str]  # True, or False / a reason string when not met


@dataclass(frozen=True)
class Switch:
    key: str
    on: Callable[[Config], bool]  # whether the config uses the switch (only then are its needs checked)
    off: str  # the value that turns it off, for the error line (formatted with the config's fields)
    does: str  # one line for the README table
    module: str  # where it lives
    needs: tuple[Need, ...] = ()


def _cuda(c: Config, w: Where) -> bool:
    return w.device.type == "cuda"


def _fp8_gpu(c: Config, w: Where) -> bool | str:
    """FP8 needs e4m3 GEMMs: the CPU (torch's), or an NVIDIA GPU of compute capability 8.9+ whose torch runs them."""
    if w.device.type == "cpu":
        return True
    if w.device.type != "cuda" or torch.version.hip:
        return False
    cap = torch.cuda.get_device_capability(w.device)
    if cap < (8, 9):
        return f"{torch.cuda.get_device_name(w.device)} is compute capability {cap[0]}.{cap[1]}"
    return fp8.unsupported_reason(w.device) or True


def _fsdp_storage(c: Config, w: Where) -> bool | str:
    if not w.fsdp or c.quant_storage == c.compute_dtype:
        return True
    if c.quant_storage == "uint8":
        return "FSDP shards only floating-point tensors, so every rank would hold the whole 4-bit model"
    return (f"FSDP casts parameters to the compute dtype ({c.compute_dtype}), which would rewrite the packed "
            f"4-bit bytes stored as {c.quant_storage}")


CUDA = Need("a CUDA device", _cuda)
FUSED = Need("fused_lora true (it lives in the fused NF4+LoRA node)", lambda c, w: c.fused_lora)
RECOMPUTE = Need("recompute true (it acts on the layers that recompute)", lambda c, w: c.recompute)

SWITCHES: tuple[Switch, ...] = (
    Switch("recompute", lambda c: c.recompute, "false",
           "recompute each layer's activations in backward (non-reentrant activation checkpointing)", "qlora/model/trainable.py"),
    Switch("recompute_layers", lambda c: c.recompute_layers >= 0, "-1",
           "recompute only the first N decoder layers: fewer = faster, more memory", "qlora/model/trainable.py", (RECOMPUTE,)),
    Switch("fused_lora", lambda c: c.fused_lora, "false",
           "each 4-bit linear + its LoRA as one autograd node (a 16-bit base keeps peft's path)",
           "qlora/speed/lora_fused.py"),
    Switch("absmax_cache", lambda c: c.absmax_cache and c.fused_lora, "false",
           "keep the double-quant scales dequantised (+0.4 GiB at 7B, 2 fewer kernels per 4-bit matmul)",
           "qlora/speed/lora_fused.py"),
    Switch("nf4_kernel", lambda c: c.nf4_kernel and c.fused_lora, "false",
           "fused path: 4-bit weights dequantised by a tiled Triton kernel (CUDA with Triton; elsewhere bitsandbytes' "
           "kernel, the same values, named at start-up)", "qlora/speed/nf4_kernel.py"),
    Switch("kernels", lambda c: c.kernels == "liger", "auto",
           "liger-kernel RMSNorm, RoPE, SwiGLU and fused linear + cross-entropy (`auto`: on CUDA when installed)",
           "qlora/speed/kernels.py", (CUDA, Need("liger-kernel and triton: pip install -e '.[gpu]'",
                                           lambda c, w: liger_available()))),
    Switch("ce_kernel", lambda c: c.ce_kernel, "false",
           "the fused loss head's softmax, loss and logits gradient in one Triton kernel per chunk of positions (CUDA "
           "with Triton; elsewhere the same arithmetic in torch ops, named at start-up)", "qlora/speed/ce_rows.py"),
    Switch("seeded_dropout", lambda c: c.seeded_dropout and c.lora_dropout > 0, "false",
           "LoRA dropout mask recomputed from a seed: no stored mask, no RNG state", "qlora/speed/seeded_dropout.py",
           (FUSED,)),
    Switch("mlp_tile_tokens", lambda c: c.mlp_tile_tokens > 0, "0",
           "each MLP over more tokens than this runs in tiles of this many: one tile's intermediates at a time, one "
           "more MLP forward per layer (very long rows)", "qlora/speed/tiled_mlp.py",
           (Need("one process (the LoRA gradients accumulate inside its backward, where DDP's hooks would fire once "
                 "per tile)", lambda c, w: w.processes == 1),
            Need("cuda_graphs false (a long row is not captured)", lambda c, w: not c.cuda_graphs))),
    Switch("cuda_graphs", lambda c: c.cuda_graphs, "false",
           "each micro-batch's forward + backward (train.py's micro_batch_loss) as one CUDA graph",
           "qlora/speed/cuda_graphs.py",
           (CUDA, Need("one process (DDP/FSDP all-reduce gradients inside backward)", lambda c, w: w.processes == 1),
            Need("fused_lora true when lora_dropout > 0 (the seeded dropout lives in the fused node)",
                 lambda c, w: c.fused_lora or c.lora_dropout == 0),
            Need("attn_backend varlen, sdpa or auto, or cudnn with cuDNN's frontend installed (flex builds its block "
                 "mask per micro-batch; torch's own cuDNN attention fails inside a capture: pip install --no-deps "
                 "nvidia-cudnn-frontend)", lambda c, w: c.attn_backend != "flex" and
                 (c.attn_backend != "cudnn" or attention.cudnn_frontend() is not None)),
            Need("offload_recompute false (host copies cannot be captured)", lambda c, w: not c.offload_recompute))),
    Switch("offload_recompute", lambda c: c.offload_recompute, "false",
           "recomputed layers keep their inputs in pinned host memory (very long rows)", "qlora/speed/offload.py",
           (RECOMPUTE,)),
    Switch("recompute_attention", lambda c: not c.recompute_attention, "true",
           "false: recomputed layers keep their attention output and log-sum-exp instead of running the attention kernel "
           "again (long rows: the kernel is the dearest part of a recompute)", "qlora/speed/keep_attention.py",
           (RECOMPUTE, Need("cuda_graphs false (not verified inside a capture)", lambda c, w: not c.cuda_graphs),
            Need("attn_backend other than flex (flex attention is not one op whose output can be kept)",
                 lambda c, w: c.attn_backend != "flex"),
            Need("no FSDP (its gathers run inside the recomputed region)", lambda c, w: not w.fsdp))),
    Switch("rebuild_inputs", lambda c: c.rebuild_inputs, "false",
           "layers that do not recompute rebuild their projections' inputs (norm outputs, gated MLP activation) in "
           "backward instead of keeping them: bitwise the same, 1/3 less memory per such layer", "qlora/speed/rebuild.py",
           (FUSED, Need("recompute false or recompute_layers >= 0 (it acts on the layers that do not recompute)",
                        lambda c, w: not c.recompute or c.recompute_layers >= 0))),
    Switch("group_projections", lambda c: c.group_projections, "false",
           "q/k/v and gate/up as one autograd node each: input gradients summed inside the GEMMs, one LoRA-A GEMM "
           "per group (same maths, another order of additions)", "qlora/speed/grouped.py",
           (FUSED, Need("no FSDP (each layer's gathered 4-bit weights reach the projections one by one)",
                        lambda c, w: not w.fsdp))),
    Switch("base_fp8", lambda c: c.base_fp8, "false",
           "the frozen 4-bit weight's GEMMs in float8 e4m3 with per-row scales (changes the numbers)", "qlora/speed/fp8.py",
           (FUSED, Need("a 4-bit base (quant nf4 or fp4)", lambda c, w: c.quant in ("nf4", "fp4")),
            Need("FP8 tensor cores (an NVIDIA GPU of compute capability 8.9 or newer: Ada, Hopper) or the CPU",
                 _fp8_gpu))),
    Switch("fp8_exclude", lambda c: c.base_fp8, "''",
           "projections that stay bf16 under base_fp8", "qlora/speed/fp8.py"),
    Switch("deterministic", lambda c: c.deterministic, "false",
           "bitwise-reproducible GPU runs: deterministic kernels only (what it changes and costs: qlora/training/determinism.py)",
           "qlora/training/determinism.py",
           (Need("no attn_backend 'cudnn' (torch has no deterministic cuDNN attention backward, and the frontend's is "
                 "not verified here; --attn_backend auto runs flash, deterministic in this mode)",
                 lambda c, w: c.attn_backend != "cudnn"),)),
    Switch("attn_backend", lambda c: c.attn_backend in ("varlen", "flex", "cudnn"), "auto",
           "packed attention: sdpa (any device); varlen (flash), flex, cudnn on CUDA (cudnn: packed rows and CUDA "
           "graphs need cuDNN's frontend, `nvidia-cudnn-frontend`)", "qlora/speed/attention.py",
           (CUDA, Need("torch built with cuDNN", lambda c, w: c.attn_backend != "cudnn" or
                       torch.backends.cudnn.is_available()))),
    Switch("quant_storage", lambda c: c.quant != "none", "{compute_dtype}",
           "dtype that holds the packed 4-bit bytes; FSDP2 shards only floating-point tensors", "qlora/distributed/fsdp.py",
           (Need("quant_storage equal to the compute dtype under FSDP2", _fsdp_storage),)),
    Switch("fsdp_low_memory_load", lambda c: c.fsdp_low_memory_load, "false",
           "FSDP2: read the base one decoder layer at a time, so no GPU holds the whole model", "qlora/model/layerwise.py"),
)


def check_switches(cfg: Config, where: Where) -> None:
    """Stop, with one line, at the first need of a switch in use that `cfg` or the machine does not meet."""
    for s in SWITCHES:
        if not s.on(cfg):
            continue
        for need in s.needs:
            met = need.met(cfg, where)
            if met is not True:
                why = f" ({met})" if isinstance(met, str) else ""
                raise ConfigError(f"config key '{s.key}' = {getattr(cfg, s.key)!r} needs {need.what}{why}; set "
                                  f"--{s.key} {s.off.format(**vars(cfg))} or change that")


def markdown_table() -> str:
    """The README's switch table."""
    rows = ["| switch | what it does | needs | module |", "| --- | --- | --- | --- |"]
    for s in SWITCHES:
        needs = "; ".join(n.what for n in s.needs) or "-"
        rows.append(f"| `{s.key}` | {s.does} | {needs} | `{s.module}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
