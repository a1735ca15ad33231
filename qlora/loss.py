"""The training objective as a module, so DDP/FSDP see one forward that returns the loss.

`forward` returns the *sum* of token cross-entropies over the micro-batch's supervised positions.
The loop divides by the number of supervised tokens in the whole accumulation window, so the
gradient is the exact token mean over the window, not a mean of micro-batch means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LIGER_FLAG = "_qlora_liger"  # set on the model by qlora.kernels when liger's kernels are in
CE_CHUNK = 8192  # supervised positions per lm_head + cross-entropy chunk: bounds the fp32 logits


class TokenLoss(nn.Module):
    """Wraps a (peft) causal LM: hidden states -> lm_head on supervised positions only -> summed CE."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def _parts(self):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.model, base.lm_head

    def forward(self, input_ids, position_ids, targets, sup_index, **attn_kwargs):
        backbone, lm_head = self._parts()
        hidden = backbone(input_ids=input_ids, position_ids=position_ids,
                          **attn_kwargs).last_hidden_state
        # Only supervised positions reach the vocab projection: prompts and padding cost no logits.
        h = hidden.flatten(0, 1).index_select(0, sup_index)
        y = targets.flatten().index_select(0, sup_index)
        if getattr(self.model, LIGER_FLAG, False) and h.is_cuda and torch.is_grad_enabled() and lm_head.bias is None:
            # liger's fused linear + CE: the logits gradient is made chunk by chunk in forward, so no
            # (positions x vocab) logits are kept for backward (~6 bytes x 32k vocab per position)
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            return LigerFusedLinearCrossEntropyFunction.apply(h, lm_head.weight, y, None, None, -100, 0.0, 0.0,
                                                              "sum")[0].float()
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], CE_CHUNK):
            logits = lm_head(h[s:s + CE_CHUNK]).float()
            total = total + F.cross_entropy(logits, y[s:s + CE_CHUNK], reduction="sum")
        return total



@torch.no_grad()
def mean_token_loss(loss_model, batches, backend: str, device) -> tuple[float, int]:
    """(token-mean response-only cross-entropy, supervised tokens) over prebuilt micro-batches: the
    training objective in eval mode (no dropout). The one eval loss of the project: train.py's eval
    passes and `python -m qlora.evaluate` both call it."""
    from . import attention
    from .packing import to_device

    was_training = loss_model.training
    loss_model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            total += float(loss_model(**to_device(batch, device),
                                      **attention.packing_kwargs(batch["position_ids"], backend, device=device)))
            count += batch["n_supervised"]
    finally:
        loss_model.train(was_training)
    return (total / count if count else float("nan")), count
