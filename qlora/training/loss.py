"""The training objective as a module, so DDP/FSDP see one forward that returns the loss.

`forward` returns the *sum* of token cross-entropies over the micro-batch's supervised positions.
The loop divides by the number of supervised tokens in the whole accumulation window, so the
gradient is the exact token mean over the window, not a mean of micro-batch means.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..speed import ce_rows

CE_CHUNK = 8192  # at most this many supervised positions per lm_head + cross-entropy chunk
CE_CHUNK_ELEMENTS = 2**26  # and at most this many fp32 logits per chunk (256 MiB: 512 positions of a 128k vocab)
CE_KINDS = ("plain", "fused", "liger")


def chunk_rows(vocab: int, cap: int = CE_CHUNK, buffers: int = 1) -> int:
    """Positions per chunk of the vocab projection: `cap`, fewer where `buffers` fp32 [positions, vocab]
    tensors would exceed CE_CHUNK_ELEMENTS (Llama 3's 128k and Gemma's 262k vocabularies)."""
    return max(64, min(cap, CE_CHUNK_ELEMENTS // (buffers * max(1, vocab))))


class TokenLoss(nn.Module):
    """Wraps a (peft) causal LM: hidden states -> lm_head on supervised positions only -> summed CE.

    `ce` picks how the vocab projection and cross-entropy run when they are trained through (train.py
    passes "fused", or "liger" where liger's kernels are on and no CUDA graph is captured; `ce_kernel`:
    fused's softmax and gradient in Triton on CUDA, else torch ops):
      fused  `LinearCrossEntropy`: the gradient of the hidden states is made chunk by chunk in forward,
             so no (positions x vocab) logits are kept, soft-capped logits included; no host sync, so a
             CUDA graph can capture it
      liger  liger-kernel's fused linear + cross-entropy (the same idea in Triton; one host sync);
             a soft-capped head takes `fused`
      plain  lm_head + cross-entropy per chunk of positions (fp32 logits kept for backward)
    Every kind takes the plain loop without a gradient (eval passes), and for a head that is trained or
    has a bias (`fused` and `liger` need a frozen bias-free `nn.Linear`).
    `dropout_seed` (qlora.speed.seeded_dropout): advanced once per training micro-batch, on the device.
    """

    def __init__(self, model, ce: str = "plain", dropout_seed: torch.Tensor | None = None, ce_kernel: bool = True):
        super().__init__()
        if ce not in CE_KINDS:
            raise ValueError(f"ce must be one of {CE_KINDS}, got {ce!r}")
        self.model, self.ce, self.dropout_seed, self.ce_kernel = model, ce, dropout_seed, ce_kernel

    def _parts(self):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.model, base.lm_head

    def _softcap(self) -> float | None:
        """The model's final-logit soft-cap (Gemma's `final_logit_softcapping`), None for most families."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return getattr(base.config, "final_logit_softcapping", None)

    def _head(self, lm_head, softcap, cuda: bool) -> str:
        """Which head trains ("liger", "fused" or "plain"): liger's and ours need a frozen bias-free `nn.Linear`,
        liger's also CUDA and no soft-cap."""
        frozen = type(lm_head) is nn.Linear and lm_head.bias is None and not lm_head.weight.requires_grad
        if not frozen or self.ce == "plain":
            return "plain"
        return "liger" if self.ce == "liger" and not softcap and cuda else "fused"

    def head_path(self, device: torch.device) -> str:
        """How the head trains, for the start-up line."""
        kind = self._head(self._parts()[1], self._softcap(), device.type == "cuda")
        if kind == "plain":
            return "lm_head + cross-entropy per chunk of positions (fp32 logits kept for backward)"
        if kind == "liger":
            return "liger's fused linear + cross-entropy"
        rows = self.ce_kernel and ce_rows.available(torch.empty(0, device=device))
        return f"fused linear + cross-entropy in chunks, softmax and logits gradient by {'one Triton kernel' if rows else 'torch ops'}"

    def forward(self, input_ids, position_ids, targets, sup_index, **attn_kwargs):
        if self.training and self.dropout_seed is not None:
            self.dropout_seed.add_(1)  # a new dropout mask for every micro-batch (not for recomputes)
        (backbone, lm_head), softcap = self._parts(), self._softcap()
        hidden = backbone(input_ids=input_ids, position_ids=position_ids,
                          **attn_kwargs).last_hidden_state
        # Only supervised positions reach the vocab projection: prompts and padding cost no logits.
        h = hidden.flatten(0, 1).index_select(0, sup_index)
        y = targets.flatten().index_select(0, sup_index)
        self.last_supervised = (h, y)  # for a loss term on the logits: `supervised_logits`
        kind = self._head(lm_head, softcap, h.is_cuda) if torch.is_grad_enabled() else "plain"
        if kind == "liger":
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            return LigerFusedLinearCrossEntropyFunction.apply(h, lm_head.weight, y, None, None, -100, 0.0, 0.0,
                                                              "sum")[0].float()
        if kind == "fused":
            return LinearCrossEntropy.apply(h, lm_head.weight, y, softcap or 0.0, self.ce_kernel)
        total = hidden.new_zeros((), dtype=torch.float32)
        step = chunk_rows(lm_head.weight.shape[0], buffers=2)  # the logits and cross_entropy's log-softmax
        for s in range(0, h.shape[0], step):
            logits = lm_head(h[s:s + step]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            total = total + F.cross_entropy(logits, y[s:s + step], reduction="sum")
        return total


def supervised_logits(loss_model) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, real) of the last forward of `loss_model` (a `TokenLoss`, or DDP's wrapper of one), for a
    loss term in train.py's `micro_batch_loss`: fp32 logits [positions, vocab] of its supervised positions
    (differentiable), and a 0/1 float mask of them that is 0 at the padding positions a CUDA graph adds to
    keep its shapes static. Materialises positions x vocab logits: at a 128k vocabulary and 8k positions
    that is 4 GiB."""
    token_loss = getattr(loss_model, "module", loss_model)
    h, y = token_loss.last_supervised
    logits, softcap = token_loss._parts()[1](h).float(), token_loss._softcap()
    if softcap:  # the logits the cross-entropy sees
        logits = torch.tanh(logits / softcap) * softcap
    return logits, (y != -100).float()


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(z_i, y_i) over positions with y_i != -100, z_i = h_i W^T for a frozen W (the lm_head), or
    with a soft-cap c > 0 (Gemma 2's `final_logit_softcapping`) z_i = c tanh(h_i W^T / c).

    The gradient w.r.t. h is computed in forward, one chunk of positions at a time ((softmax(z) minus
    one-hot) times dz/dlogits = 1 - (z/c)^2 under a cap, times W), and is the only thing kept for
    backward: 2 bytes x hidden size per position instead of fp32 logits (4 bytes x vocab; 8 GiB for
    Gemma's 262k vocabulary at 8k positions, more again for the cap's tanh). Per chunk, the loss and the
    logits' gradient come from `qlora.speed.ce_rows`: on CUDA one Triton kernel reads the bf16 logits twice and
    writes the gradient over them; elsewhere torch ops in place on one fp32 copy. Chunks hold at most
    CE_CHUNK_ELEMENTS logits, so the peak is about one chunk. No `.item()`, so it runs inside a CUDA graph."""

    CHUNK = 4096

    @staticmethod
    def forward(ctx, h, weight, y, softcap: float = 0.0, kernel: bool = True):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        fp32_copy = not (kernel and ce_rows.available(h))  # the torch path's fp32 logits (and a cap's slope)
        step = chunk_rows(weight.shape[0], LinearCrossEntropy.CHUNK, buffers=2 if softcap and fp32_copy else 1)
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(h.dtype)
            for s in range(0, h.shape[0], step):
                logits = h[s:s + step] @ w.t()
                # per-position loss; the logits' gradient written over them (qlora/speed/ce_rows.py)
                total += ce_rows.loss_and_grad_(logits, y[s:s + step], softcap, grad_h is not None, kernel).sum()
                if grad_h is not None:
                    torch.mm(logits, w, out=grad_h[s:s + step])
                del logits  # freed before the next chunk's logits are made, not after
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None, None


@torch.no_grad()
def mean_token_loss(loss_model, batches, loss_of: Callable[[dict], torch.Tensor]) -> tuple[float, int]:
    """(token-mean loss, supervised tokens) over prebuilt micro-batches, with `loss_model` in eval mode
    (no dropout); `loss_of(batch)` is a micro-batch's summed loss: train.py passes its `micro_batch_loss`
    (so an eval pass measures the objective you train), `python -m qlora.evaluate` the plain
    cross-entropy of `TokenLoss`."""
    was_training = loss_model.training
    loss_model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            total += float(loss_of(batch))
            count += batch["n_supervised"]
    finally:
        loss_model.train(was_training)
    return (total / count if count else float("nan")), count
