"""FP8 GEMMs for the frozen 4-bit base path (config key `base_fp8`; opt-in, Ada and Hopper GPUs).

In the fused NF4+LoRA node (qlora/speed/lora_fused.py) two GEMMs per linear touch the frozen weight W:
y = x W^T in forward and dx = g W in backward, two thirds of a LoRA step's FLOPs. With `base_fp8` both
run as float8 e4m3 GEMMs (`torch._scaled_mm`: twice bf16's tensor-core rate on Hopper) with one scale
per row of each operand, the output in bf16:

  forward   y  = (x / sx) (W / sw)^T  * sx sw^T       sx: one per token, sw: one per output feature
  backward  dx = (g / sg) (W^T / sv)^T * sg sv^T      sg: one per token, sv: one per input feature

The weight goes from its 4-bit codes straight to e4m3 in one kernel (one byte written per weight, not
bf16's two), for backward written transposed: Hopper's fp8 GEMM wants both operands contiguous along the
summed dimension. Its scales cost nothing: an NF4 (or FP4) block holds its absmax exactly (the codebook
spans [-1, 1]), so a row's largest |w| is the largest absmax of its blocks, and a column's is at most the
largest absmax of the blocks that cover it. Activations and gradients are scaled per token (one kernel:
amax, divide, cast). The LoRA path and everything outside the node stay in the compute dtype.

The cost is precision: e4m3 keeps 3 mantissa bits (<= 6.25% relative rounding per operand element, ~2%
RMS), added to the NF4 weight's own quantisation error. RESULTS.md reports the loss deviation next to
the speed. On CPU the same arithmetic runs as torch ops (torch's CPU `_scaled_mm`), which the tests
check; on CUDA Triton kernels quantise (qlora/speed/fp8_kernels.py), and benchmarks/check_fast_path_cuda.py
compares them with the torch ops bit for bit.

A grouped node's members (q/k/v, gate/up: qlora/speed/grouped.py) read one input, so their input gradients
sum: `grad_input_group` makes that sum one GEMM over the members side by side, with one scale per token
across their gradients and one per input feature across their weights.
"""

from __future__ import annotations

import weakref

import torch

from . import fp8_kernels, nf4_kernel

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
INV_MAX = 1.0 / E4M3_MAX  # scales are amax * this, in torch and in Triton alike (bit-identical)
TINY = 1e-12  # an all-zero row gets this amax, so its scale is not 0 (its values stay 0)
SCALES_ATTR = "_qlora_fp8_scales"
JOINT_ATTR = "_qlora_fp8_joint_scales"  # on a group's first weight: (the group's weights' ids, their joint column scales)


def unsupported_reason(device: torch.device) -> str | None:
    """None if this GPU and torch build run what `base_fp8` needs (a per-row scaled e4m3 GEMM, and the
    Triton quantiser where Triton is present), else why not: measured on Hopper only, refused early."""
    try:
        t = torch.ones(16, 32, device=device, dtype=torch.bfloat16)
        t8, s = quantize_rows(t)
        scaled_mm(t8, s, t8[:16], s[:16])
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - any failure means: not on this GPU/build
        return f"per-row scaled FP8 GEMMs, which fail here ({type(e).__name__}: {str(e)[:160]})"
    return None


def usable(weight) -> bool:
    """Whether this 4-bit weight's GEMMs can run in FP8 (`_scaled_mm` wants both sizes divisible by 16)."""
    n, k = weight.quant_state.shape
    return n % 16 == 0 and k % 16 == 0


def weight_scales(weight, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per output feature, per input feature) dequantisation scales of a frozen 4-bit weight, from its
    block absmax (fp32); kept on the weight after the first call (the weight never changes)."""
    cached = getattr(weight, SCALES_ATTR, None)
    if cached is not None:
        return cached
    qs = weight.quant_state
    n, k = qs.shape
    bs = qs.blocksize
    if k % bs == 0:  # blocks never straddle rows: the bounds come from absmax alone
        blocks = absmax.float().view(n, k // bs)
        rows, cols = blocks.amax(1), blocks.amax(0).repeat_interleave(bs)
    else:
        w = _dequantize_f32(weight, absmax).abs()
        rows, cols = w.amax(1), w.amax(0)
    scales = (rows.clamp(min=TINY) * INV_MAX, cols.clamp(min=TINY) * INV_MAX)
    setattr(weight, SCALES_ATTR, scales)
    return scales


def _dequantize_f32(weight, absmax: torch.Tensor) -> torch.Tensor:
    qs = weight.quant_state
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight.data, absmax, qs.blocksize, qs.quant_type,
                                                          qs.shape, torch.float32)


def quantize_weight(weight, absmax: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-bit weight as e4m3 with one scale per row: (W / sw, sw) of shape (out, in), or with
    `transpose` (W^T / sv, sv) of shape (in, out), each contiguous."""
    rows, cols = weight_scales(weight, absmax)
    scale = cols if transpose else rows
    if fp8_kernels.available(weight.data):
        return fp8_kernels.weight(weight, absmax, scale, transpose), scale
    return quantize_weight_torch(weight, absmax, scale, transpose), scale


def quantize_weight_torch(weight, absmax: torch.Tensor, scale: torch.Tensor, transpose: bool) -> torch.Tensor:
    """`quantize_weight`'s e4m3 tensor as torch ops (the CPU path, and the reference for the kernel)."""
    w = _dequantize_f32(weight, absmax)
    return _to_e4m3((w.t() if transpose else w) * scale.reciprocal()[:, None]).contiguous()


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / s, s) for a 2-D tensor, s = max |row| / 448 per row (fp32), the quotient in e4m3."""
    if fp8_kernels.available(t) and t.stride(-1) == 1:
        return fp8_kernels.rows([t], INV_MAX)
    return quantize_rows_torch(t)


def quantize_rows_torch(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` as torch ops (the CPU path, and the reference for the kernel)."""
    scale = t.abs().amax(dim=1).float().clamp(min=TINY) * INV_MAX
    return _to_e4m3(t.float() * scale.reciprocal()[:, None]).contiguous(), scale


def _to_e4m3(t: torch.Tensor) -> torch.Tensor:
    # the quotients are <= 448 up to rounding; a cast above 448 would give NaN (e4m3fn has no inf).
    # Both paths multiply by the fp32 reciprocal of the scale (one division per row, not per element)
    return t.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def scaled_mm(a8: torch.Tensor, sa: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """(a8 * sa) @ (b8 * sb)^T in bf16, for e4m3 a8 (M, K) and b8 (N, K) with per-row scales."""
    return torch._scaled_mm(a8, b8.t(), scale_a=sa.view(-1, 1), scale_b=sb.view(1, -1), out_dtype=torch.bfloat16)


_last_input: list = [None]  # (weakref to the input, its version and shape, its e4m3 form)


def quantize_input(x2: torch.Tensor, owner: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` of a linear's input `x2` (a 2-D view of `owner`, the tensor the linear was called
    with), reused while the next linear reads the very same tensor: q, k and v read one, gate and up
    another. Only a weak reference to `owner` is kept (it lives no longer for this), so a live reference
    means the same memory; an in-place change bumps its version and misses. At most one quantised input
    outlives its tensor, until the next call replaces it."""
    owner = x2 if owner is None else owner
    if owner.is_inference():  # inference tensors have no version counter
        return quantize_rows(x2)
    last = _last_input[0]
    key = (owner._version, x2.shape, x2.stride(), x2.storage_offset())
    if last is not None and last[0]() is owner and last[1] == key:
        return last[2]
    out = quantize_rows(x2)
    _last_input[0] = (weakref.ref(owner), key, out)
    return out


def linear(x2: torch.Tensor, weight, absmax: torch.Tensor, owner: torch.Tensor | None = None) -> torch.Tensor:
    """x2 W^T for a (tokens, in) input and a frozen 4-bit weight, as one FP8 GEMM (bf16 out); `owner`: the
    tensor x2 is a view of (see `quantize_input`)."""
    x8, sx = quantize_input(x2, owner)
    w8, sw = quantize_weight(weight, absmax, transpose=False)
    return scaled_mm(x8, sx, w8, sw)


def grad_input(g: torch.Tensor, weight, absmax: torch.Tensor) -> torch.Tensor:
    """g W for a (tokens, out) output gradient: the input gradient of `linear`, as one FP8 GEMM."""
    g8, sg = quantize_rows(g)
    wt8, sv = quantize_weight(weight, absmax, transpose=True)
    return scaled_mm(g8, sg, wt8, sv)


def grad_input_group(gs: list[torch.Tensor], weights: list, absmaxes: list[torch.Tensor]) -> torch.Tensor:
    """sum_i g_i W_i over the members of a grouped node (qlora/speed/grouped.py) that read one input, as one FP8
    GEMM: [g_1 | .. | g_n] [W_1; ..; W_n] with one scale per token over all the g_i and one per input feature
    (the largest of the members' column scales), so the sum is in the GEMM's accumulator: no product per member
    written and added. One member: `grad_input`."""
    if len(gs) == 1:
        return grad_input(gs[0], weights[0], absmaxes[0])
    sv = joint_column_scales(weights, absmaxes)
    if all(fp8_kernels.available(g) and g.stride(-1) == 1 for g in gs) and len(gs) <= fp8_kernels.MAX_PARTS:
        g8, sg = fp8_kernels.rows(gs, INV_MAX)
    else:
        g8, sg = quantize_rows_torch(torch.cat(gs, dim=1))
    k = weights[0].quant_state.shape[1]
    wt8 = torch.empty((k, g8.shape[1]), dtype=E4M3, device=g8.device)
    col = 0
    for weight, absmax in zip(weights, absmaxes):
        n = weight.quant_state.shape[0]
        if fp8_kernels.available(weight.data):
            fp8_kernels.weight(weight, absmax, sv, True, out=wt8[:, col:col + n])
        else:
            wt8[:, col:col + n] = quantize_weight_torch(weight, absmax, sv, True)
        col += n
    return scaled_mm(g8, sg, wt8, sv)


def joint_column_scales(weights: list, absmaxes: list[torch.Tensor]) -> torch.Tensor:
    """The per-input-feature scale shared by weights that read one input: the largest of their own (kept on the
    first weight for this set after the first call)."""
    key = tuple(id(w) for w in weights)
    cached = getattr(weights[0], JOINT_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    cols = weight_scales(weights[0], absmaxes[0])[1]
    for weight, absmax in zip(weights[1:], absmaxes[1:]):
        cols = torch.maximum(cols, weight_scales(weight, absmax)[1])
    setattr(weights[0], JOINT_ATTR, (key, cols))
    return cols
