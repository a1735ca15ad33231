"""Bitwise-reproducible runs on a GPU (config key `deterministic`).

On the CPU every kernel this project runs is deterministic. On a GPU several are not by default: they
add partial sums with atomics, in whatever order the threads finish, so two identical runs agree at
step 1 and then drift apart by rounding. `deterministic: true` picks a fixed-order kernel everywhere,
refuses the one setting that has none, and costs speed (README "Reproducibility").

What the mode changes, path by path (a CPU run's numbers do not change):

  path                               by default on CUDA                  with `deterministic: true`
  ---------------------------------  ----------------------------------  -------------------------------------------
  index_select backward (TokenLoss   index_add_ with atomics             torch.use_deterministic_algorithms(True):
  picks supervised positions),                                           torch's sort-based kernels; an op with no
  scatter_add_ (LinearCrossEntropy)                                      deterministic kernel raises, never drifts
  cuBLAS GEMMs (every matmul, liger  split-K workspace per handle,       CUBLAS_WORKSPACE_CONFIG=:4096:8 (set before
  fused linear + cross-entropy)      TF32, reduced-precision reduction   CUDA starts); TF32 and bf16/fp16 reduced-
                                                                         precision reductions off
  attention varlen (flash), and      flash backward adds dQ with         flash's deterministic backward (torch asks
  cudnn's fallback for packed rows   atomics                             for it in this mode)
  attention sdpa (block mask:        atomics in backward                 its deterministic backward, likewise
  memory-efficient kernel)
  attention cudnn on whole rows      cuDNN attention                     refused: torch has no deterministic cuDNN
                                                                         attention; use auto/varlen
  attention flex (Triton, compiled)  each program owns its dQ/dK/dV      unchanged
  cuDNN (no convolutions here)       benchmark picks any algorithm       cudnn.deterministic, benchmark off, no TF32
  liger RMSNorm, RoPE, SwiGLU,       per-row kernels; RMSNorm's weight   unchanged (no atomics); GEMMs as cuBLAS
  fused linear + cross-entropy       gradient summed by torch
  fused NF4+LoRA node, seeded        one program per element/row         unchanged (no atomics)
  dropout, FP8 quantisers (Triton)
  base_fp8 GEMMs (torch._scaled_mm)  per-row-scaled fp8 GEMM             unchanged: no deterministic switch exists;
                                                                         the GPU check compares it bit for bit
  bitsandbytes 8-bit AdamW           blockwise kernel, no atomics        unchanged
  CUDA graphs                        replays the captured kernels        unchanged: the kernels above, captured
  several processes (NCCL)           ring/tree all-reduce                unchanged; NCCL promises no bitwise result
                                                                         (said at start-up)
  torch.empty memory                 uninitialised                       filled (torch's default in this mode)

benchmarks/check_determinism_cuda.py checks the result on a GPU: run vs run, eval on vs off, kill + resume.
"""

from __future__ import annotations

import os

import torch

from ..config import ConfigError

CUBLAS_VAR = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_FIXED = (":4096:8", ":16:8")  # the two settings cuBLAS documents as reproducible
# measured without the mode (train.py, random Llama-2-7B shape, 2 x 4 x 2048, seed 7; README "Reproducibility")
DRIFT = ("note: runs on a GPU are not bitwise reproducible: two identical runs on one H200 drifted by 4.5e-4 "
         "relative in the loss by step 3 (seeded dropout, CUDA graphs, base_fp8; README \"Reproducibility\"); "
         "--deterministic true makes them bitwise equal, at a cost in speed")


def configure(cfg, cuda: bool) -> list[str]:
    """Apply `cfg.deterministic` to torch (and the environment, for cuBLAS) before CUDA starts; returns
    the start-up lines to print. Raises ConfigError for a setting that cannot be deterministic. `cuda`:
    whether this run will use a GPU (nothing is said on a CPU, where runs are reproducible anyway)."""
    if not cfg.deterministic:
        return [DRIFT] if cuda else []
    # what the mode excludes (cuDNN attention) is declared in qlora/speed/switches.py, checked with the other switches
    workspace = os.environ.get(CUBLAS_VAR)
    if workspace is not None and workspace not in CUBLAS_FIXED:
        raise ConfigError(f"config key 'deterministic' needs {CUBLAS_VAR} unset or :4096:8, but it is {workspace!r} "
                          f"(cuBLAS is not reproducible with it): unset it or start with {CUBLAS_VAR}=:4096:8")
    if workspace is None:
        if torch.cuda.is_initialized():  # cuBLAS may already have read it
            raise ConfigError(f"config key 'deterministic': CUDA started in this process before {CUBLAS_VAR} "
                              f"could be set: start the process with {CUBLAS_VAR}=:4096:8")
        os.environ[CUBLAS_VAR] = CUBLAS_FIXED[0]
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    off = "ieee" if _tf32_switches()[0][1] == "fp32_precision" else False
    for owner, name in _tf32_switches():
        setattr(owner, name, off)
    matmul = torch.backends.cuda.matmul
    for flag in ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction"):
        if hasattr(matmul, flag):
            setattr(matmul, flag, False)
    lines = ["deterministic: torch's deterministic kernels on, TF32 and reduced-precision reductions off, "
             f"{CUBLAS_VAR}={os.environ[CUBLAS_VAR]}"]
    if cuda and cfg.base_fp8:
        lines.append("deterministic: base_fp8's GEMMs (torch._scaled_mm) have no deterministic switch; their kernels "
                     "use no atomics, and benchmarks/check_determinism_cuda.py checks them bit for bit")
    if cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        lines.append("deterministic: NCCL's gradient all-reduce has no documented bitwise-reproducible mode; "
                     "each process's own kernels are deterministic")
    return lines


def _tf32_switches() -> list:
    """(owner, attribute) of each TF32 switch: torch's `fp32_precision` where it exists (torch >= 2.9, where
    reading the older `allow_tf32` flags after it was set raises), else `allow_tf32`."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        return [(b.cuda.matmul, "fp32_precision"), (b.cudnn.conv, "fp32_precision"), (b.cudnn.rnn, "fp32_precision")]
    return [(b.cuda.matmul, "allow_tf32"), (b.cudnn, "allow_tf32")]


def settings() -> dict:
    """The process-wide settings `configure` touches, to inspect or to put back with `restore`."""
    matmul = torch.backends.cuda.matmul
    return {"deterministic": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tf32": [getattr(owner, name) for owner, name in _tf32_switches()],
            "bf16_reduction": getattr(matmul, "allow_bf16_reduced_precision_reduction", None),
            "fp16_reduction": getattr(matmul, "allow_fp16_reduced_precision_reduction", None),
            "cublas_workspace": os.environ.get(CUBLAS_VAR)}


def restore(saved: dict) -> None:
    """Put back the settings `settings()` returned."""
    torch.use_deterministic_algorithms(saved["deterministic"], warn_only=saved["warn_only"])
    torch.backends.cudnn.deterministic = saved["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = saved["cudnn_benchmark"]
    for (owner, name), value in zip(_tf32_switches(), saved["tf32"]):
        setattr(owner, name, value)
    matmul = torch.backends.cuda.matmul
    for key, flag in (("bf16_reduction", "allow_bf16_reduced_precision_reduction"),
                      ("fp16_reduction", "allow_fp16_reduced_precision_reduction")):
        if saved[key] is not None:
            setattr(matmul, flag, saved[key])
    if saved["cublas_workspace"] is None:
        os.environ.pop(CUBLAS_VAR, None)
    else:
        os.environ[CUBLAS_VAR] = saved["cublas_workspace"]
