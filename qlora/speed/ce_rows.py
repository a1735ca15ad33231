"""Softmax cross-entropy over a chunk of logits, in place, one Triton program per row.

The fused head (`LinearCrossEntropy`, qlora/training/loss.py) makes a chunk of logits z = h W^T and needs,
per position, the loss lse(z) - z_y and the gradient softmax(z) - onehot(y) (times 1 - tanh^2 under a
soft-cap) in the compute dtype, to multiply by W. In torch ops that is a cast to fp32 and eight passes over
[positions, vocab] fp32 values (max, subtract, exp, sum, divide, scatter, mask, cast back): about 28 GB of
memory traffic per 4,096 positions of Llama 3's 128k vocabulary, 55 GB for Gemma 3's 262k. Here each row
is read twice in its own dtype (an online max and sum in fp32, then the gradient) and the gradient is
written over the logits: 3 GB. The arithmetic is the torch path's (fp32 from the same bf16 logits, the result
rounded once to bf16), so the two agree to fp32 rounding (tests/test_ce_rows.py runs the kernel in Triton's
interpreter against `reference_`; benchmarks/check_fast_path_cuda.py on the GPU). The kernel is used for
CUDA tensors when Triton is importable; `reference_` is the same contract in torch ops (CPU, or no Triton).
"""

from __future__ import annotations

import os

import torch

IGNORE = -100
BLOCK = 4096  # logits per load: a 128k row is 32 loads, each program streams its row twice

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference runs
    triton = None


def available(t: torch.Tensor) -> bool:
    """Whether the Triton kernel runs for `t` (CUDA, Triton installed; or Triton's CPU interpreter)."""
    return triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def reference_(logits: torch.Tensor, y: torch.Tensor, softcap: float = 0.0, grad: bool = True) -> torch.Tensor:
    """Per-row losses in fp32 (0 where y == IGNORE); with `grad`, d(sum of losses)/d(logits) written over
    `logits` in its dtype. Torch ops on an fp32 copy (the logits themselves when fp32), each in place, so
    the peak is that one tensor (two under a cap)."""
    z = logits.float()
    if not grad and z.data_ptr() == logits.data_ptr():
        z = z.clone()  # no gradient asked: the logits stay as they are
    slope = None
    if softcap:
        z.div_(softcap).tanh_()  # t = tanh(logits / c); z = c t
        slope = z.square().neg_().add_(1) if grad else None  # 1 - t^2
        z.mul_(softcap)
    valid = y != IGNORE
    safe = y.clamp(min=0)[:, None]
    top = z.amax(-1, keepdim=True)
    target = z.gather(1, safe) - top
    norm = z.sub_(top).exp_().sum(-1, keepdim=True)  # exp(z - max), in place
    loss = (norm.log() - target)[:, 0] * valid  # log-sum-exp(z) - z_y
    if grad:
        p = z.div_(norm)  # softmax(z)
        p.scatter_add_(1, safe, -valid[:, None].to(p.dtype))
        p.mul_(valid[:, None])
        if slope is not None:
            p.mul_(slope)
        if p.data_ptr() != logits.data_ptr():
            logits.copy_(p)
    return loss


def loss_and_grad_(logits: torch.Tensor, y: torch.Tensor, softcap: float = 0.0, grad: bool = True,
                   kernel: bool = True) -> torch.Tensor:
    """`reference_`'s contract, through the Triton kernel where `kernel` and `available`: `logits` is
    [positions, vocab] with unit stride along the vocabulary, `y` the target per position."""
    if not (kernel and available(logits)):
        return reference_(logits, y, softcap, grad)
    if logits.stride(-1) != 1:
        raise ValueError("loss_and_grad_: logits must be contiguous along the vocabulary")
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _rows[(n,)](logits, logits.stride(0), y.contiguous(), loss, v, float(softcap or 1.0),
                    HAS_CAP=bool(softcap), GRAD=grad, BLOCK=min(BLOCK, triton.next_power_of_2(v)), num_warps=8)
    return loss


if triton is not None:
    @triton.jit
    def _capped(z, cap):
        """(cap * tanh(z / cap), tanh(z / cap)), tanh as 2 sigmoid(2x) - 1 (no libdevice import)."""
        t = 2.0 * tl.sigmoid(2.0 * z / cap) - 1.0
        return cap * t, t

    @triton.jit
    def _rows(z_ptr, stride, y_ptr, loss_ptr, V, cap, HAS_CAP: tl.constexpr, GRAD: tl.constexpr,
              BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        zr = z_ptr + row * stride
        y = tl.load(y_ptr + row).to(tl.int64)
        valid = y != -100
        ys = tl.where(valid, y, 0)
        lanes = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], -1.0e30, tl.float32)  # per-lane running max and sum of exp(z - max)
        s = tl.zeros([BLOCK], tl.float32)
        for off in range(0, V, BLOCK):
            cols = off + lanes
            inside = cols < V
            z = tl.load(zr + cols, mask=inside, other=-1.0e30).to(tl.float32)
            if HAS_CAP:
                z, _ = _capped(z, cap)
                z = tl.where(inside, z, -1.0e30)
            m_new = tl.maximum(m, z)
            s = s * tl.exp(m - m_new) + tl.where(inside, tl.exp(z - m_new), 0.0)
            m = m_new
        top = tl.max(m, 0)
        lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
        zy = tl.load(zr + ys).to(tl.float32)
        if HAS_CAP:
            zy, _ = _capped(zy, cap)
        tl.store(loss_ptr + row, tl.where(valid, lse - zy, 0.0))
        if GRAD:
            for off in range(0, V, BLOCK):
                cols = off + lanes
                inside = cols < V
                z = tl.load(zr + cols, mask=inside, other=0.0).to(tl.float32)
                if HAS_CAP:
                    z, t = _capped(z, cap)
                p = tl.exp(z - lse)
                p = tl.where(cols == ys, p - 1.0, p)
                if HAS_CAP:
                    p = p * (1.0 - t * t)
                p = tl.where(valid, p, 0.0)
                tl.store(zr + cols, p.to(z_ptr.dtype.element_ty), mask=inside)
