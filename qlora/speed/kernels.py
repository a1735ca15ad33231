"""Fused Triton kernels for the element-wise parts of a decoder block, from `liger-kernel` (CUDA only).

transformers' eager RMSNorm is ~6 kernels (upcast, square, mean, rsqrt, two multiplies), RoPE ~10
(two rotate_half copies, four multiplies, two adds) and SwiGLU's silu(gate) * up keeps three
intermediates for backward. Liger computes each as one kernel forward and one backward, and SwiGLU
recomputes silu in backward instead of storing it. The maths is the same (RMSNorm in fp32 then cast,
"llama" casting mode); benchmarks/check_fast_path_cuda.py compares losses and LoRA gradients.
With liger in, train.py builds `qlora.training.loss.TokenLoss(..., ce="liger")`, its fused linear + cross-entropy.

The patch is per module instance: RMSNorm, MLP and attention forwards. RoPE is a module-level function
in transformers' llama code, so each patched attention module routes it to liger while it runs (also
when its layer recomputes under checkpointing) and puts the previous function back after it; no other
model in the process is affected. CPU runs keep the plain path.

Other families go through liger's own patch for their model_type (`LIGER_PATCHES`: Mistral, Qwen2, Qwen3,
Gemma 3, Phi-3), applied to this model instance only: its RMSNorms (not in place, as above) and its
SwiGLU/GeGLU MLPs; RoPE as for Llama, scoped to each attention module's forward. The loss side is the same
for every family. A model_type without a liger patch trains without kernels, and the start-up line says so.
"""

from __future__ import annotations

import torch

from qlora.config import ConfigError

LIGER_ATTR = "_qlora_liger"  # set on each module whose forward liger's kernels run
NO_PATCH_ATTR = "qlora_no_liger_patch"  # set on a model whose family liger has no patch for: its model_type

# model_type -> liger-kernel's patch (liger_kernel.transformers.monkey_patch); Llama uses `patch_llama` here
LIGER_PATCHES = {
    "llama": "patch_llama",
    "mistral": "apply_liger_kernel_to_mistral",
    "qwen2": "apply_liger_kernel_to_qwen2",
    "qwen3": "apply_liger_kernel_to_qwen3",
    "gemma3_text": "apply_liger_kernel_to_gemma3_text",
    "phi3": "apply_liger_kernel_to_phi3",
}

def liger_available() -> bool:
    try:
        import liger_kernel.ops.rms_norm  # noqa: F401
        import triton  # noqa: F401
    except Exception:  # ImportError, or triton failing to find a GPU driver
        return False
    return True


def resolve_kernels(mode: str, device, fsdp: bool = False) -> str:
    """"liger" or "none" for `mode` ("auto", "liger", "none") on `device`; errors for impossible asks.
    `auto` is liger on CUDA when it is installed (under FSDP2 too: its kernels are per module, and the
    fused linear + cross-entropy reads lm_head's weight inside the root unit's forward, gathered)."""
    on_cuda = torch.device(device).type == "cuda"
    if mode == "none" or (mode == "auto" and not (on_cuda and liger_available())):
        return "none"
    if not on_cuda:
        raise ConfigError("config key 'kernels' = 'liger' needs a CUDA device (use 'auto' or 'none' on CPU)")
    if not liger_available():
        raise ConfigError("config key 'kernels' = 'liger' needs: pip install liger-kernel (and triton)")
    return "liger"


def liger_patch(model_type: str) -> str | None:
    """The name of the liger patch for `model_type` (`LIGER_PATCHES`), None where liger has none."""
    return LIGER_PATCHES.get(model_type)


def use_kernels(model, mode: str, device, fsdp: bool = False) -> str:
    """Apply `mode` to a (peft-wrapped) model; returns what was applied ("liger" or "none"). The loss
    side (liger's fused linear + cross-entropy) is `qlora.training.loss.TokenLoss(..., ce="liger")`."""
    kind = resolve_kernels(mode, device, fsdp)
    if kind == "liger":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        name = liger_patch(base.config.model_type)
        if name is None:
            setattr(model, NO_PATCH_ATTR, base.config.model_type)
            return "none"
        if name == "patch_llama":
            patch_llama(model)
        else:
            patch_family(model, name)
    return kind


def patch_family(model, name: str) -> int:
    """liger's `name` patch (e.g. apply_liger_kernel_to_qwen2) on this model instance: RMSNorm and the
    gated MLP; its RoPE, cross-entropy and forward patches stay off (RoPE: `_patch_rope`, scoped to this
    model; the loss: TokenLoss)."""
    import inspect

    from liger_kernel.transformers import monkey_patch

    apply = getattr(monkey_patch, name)
    params = inspect.signature(apply).parameters
    mlp = {k: True for k in ("swiglu", "geglu") if k in params}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    apply(rope=False, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=True, model=base, **mlp)
    n = 0
    for module in model.modules():
        if "forward" in module.__dict__ and module._get_name().startswith("Liger"):
            if hasattr(module, "in_place"):
                module.in_place = False  # the norm's input gradient must not overwrite the residual's
            setattr(module, LIGER_ATTR, True)
            n += 1
    return n + _patch_rope(model)


def patch_llama(model) -> int:
    """Route RMSNorm, SwiGLU MLP and RoPE of a (peft-wrapped) Llama model through liger's kernels."""
    import types

    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    def rms_forward(self, hidden_states):
        # in_place=False: the norm's input gradient must not overwrite the residual stream's gradient
        return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False, None)

    def mlp_forward(self, x):
        return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))

    n = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(rms_forward, module)
            setattr(module, LIGER_ATTR, True)
            n += 1
        elif name.endswith("MLP") and all(hasattr(module, k) for k in ("gate_proj", "up_proj", "down_proj")):
            if getattr(module.config, "hidden_act", "silu") not in ("silu", "swish"):
                raise ConfigError(f"kernels 'liger': {name} uses {module.config.hidden_act}, not SiLU")
            module.forward = types.MethodType(mlp_forward, module)
            setattr(module, LIGER_ATTR, True)
            n += 1
    return n + _patch_rope(model)


def _patch_rope(model) -> int:
    """Liger's RoPE inside `model`'s attention modules only: each one's forward routes the
    `apply_rotary_pos_emb` of its own modeling file (modeling_llama, modeling_qwen2, ...) to liger while
    it runs (also when a checkpointed layer recomputes) and puts the previous function back after it."""
    import sys
    import types

    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    def scoped(modeling):
        original = modeling.apply_rotary_pos_emb

        def rope(q, k, cos, sin, *args, **kwargs):
            if q.is_cuda:
                return liger_rotary_pos_emb(q, k, cos, sin, *args, **kwargs)
            return original(q, k, cos, sin, *args, **kwargs)

        def attention_forward(self, *args, **kwargs):
            previous, modeling.apply_rotary_pos_emb = modeling.apply_rotary_pos_emb, rope
            try:
                return type(self).forward(self, *args, **kwargs)
            finally:
                modeling.apply_rotary_pos_emb = previous
        return attention_forward

    n, forwards = 0, {}
    for module in model.modules():
        modeling = sys.modules.get(type(module).__module__)
        if (type(module).__name__.endswith("Attention") and hasattr(modeling, "apply_rotary_pos_emb")
                and (hasattr(module, "q_proj") or hasattr(module, "qkv_proj"))):
            if modeling not in forwards:
                forwards[modeling] = scoped(modeling)
            module.forward = types.MethodType(forwards[modeling], module)
            setattr(module, LIGER_ATTR, True)
            n += 1
    return n
