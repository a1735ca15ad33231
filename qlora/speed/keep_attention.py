"""Recomputed layers that keep their attention output (config key `recompute_attention: false`).

A recomputed decoder layer runs its whole forward again in backward. Over long rows the attention kernel
is the dearest part of that forward (at 32,768 tokens of Llama-2-7B, ~40% of a layer's recompute), yet its
output is small: hidden_size x 2 bytes per token, plus the kernel's log-sum-exp (heads x 4 bytes), which its
backward needs anyway. This keeps exactly those outputs from the forward and hands them back when the layer
is recomputed; everything else (projections, norms, RoPE, MLP) is recomputed as before, and the attention
backward runs on the recomputed q, k, v with the kept output. The numbers are those of the plain recompute.

It uses torch's selective activation checkpointing: a dispatch-level policy that marks the attention ops
"must save". With torch's checkpoint (non-reentrant) the policy goes in as `context_fn`; the offloaded
checkpoint (qlora/speed/offload.py) enters the same two contexts around its forward and its recompute.
What is kept is what the attention kernel in use returns: SDPA's flash / efficient / cuDNN kernels,
torch's varlen kernel and cuDNN frontend's op; attention that the model computes unfused (logit soft-capping, SDPA's math path)
has no such op and is recomputed.
"""

from __future__ import annotations

from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# attention forward kernels, by their op names without the overload (`aten._x.default` -> `aten._x`)
ATTENTION_OPS = frozenset({
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention",
    "aten._scaled_dot_product_fused_attention_overrideable",
    "aten._flash_attention_forward",
    "aten._efficient_attention_forward",
    "aten._cudnn_attention_forward",
    "torch_attn._varlen_attn",
    "cudnn.sdpa_fwd",  # cuDNN frontend's op (attn_backend cudnn with nvidia-cudnn-frontend installed)
})

_DECISIONS: dict = {}  # op -> policy, so each op's name is read once


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    decision = _DECISIONS.get(op)
    if decision is None:
        name = str(op).rsplit(".", 1)[0]
        decision = CheckpointPolicy.MUST_SAVE if name in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE
        _DECISIONS[op] = decision
    return decision


def keep_attention_contexts():
    """The (forward, recompute) context pair for one checkpointed call: the forward keeps the attention
    outputs, the recompute returns them in place of running the kernel again."""
    return create_selective_checkpoint_contexts(_policy)
