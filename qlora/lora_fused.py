"""One autograd node for "NF4 base linear + LoRA": y = x W^T + s * B(A(dropout(x))).

peft's `lora.Linear4bit.forward` runs the base layer (bitsandbytes' own autograd function), clones its
output, then dropout, A, B, a scale and an add, each its own autograd node and kernel, and saves for
backward a dropped copy of the input per projection. Here the same maths is one `autograd.Function`:

  forward   W = dequant(W4);  y = x W^T;  h = (x * m) A^T;  y += s * h B^T       (m: dropout mask / (1-p))
  backward  W = dequant(W4);  g_h = s * g B;  dB = s * g^T h;  dA = g_h^T (x * m)
            dx = g W + (g_h A) * m

It saves the input x itself (shared by q, k and v, which read the same tensor), the small h, and a
one-byte mask only when dropout is on. Fewer nodes means less host time per step, which is what limits
small micro-batches on a fast GPU. The result equals peft's path up to rounding (tests/test_lora_fused.py);
modules it does not cover (several adapters, DoRA, merged or disabled adapters, a bias, FSDP-sharded
weights) keep peft's forward.
"""

from __future__ import annotations

import types

import torch

FUSED_ATTR = "_qlora_fused"


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Keep-mask of inverted dropout, one byte per element (kept where True)."""
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)


def _dequant(weight) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, weight.quant_state)


class NF4LoRAFunction(torch.autograd.Function):
    """y = x dequant(W4)^T + scale * ((x * mask) A^T) B^T, with gradients for x, A and B only."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale: float, p: float):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            w = _dequant(weight).to(dtype)
            y = x2 @ w.t()
            del w
            mask = dropout_mask(x2, p) if p > 0 else None
            xd = x2 * mask * (1.0 / (1.0 - p)) if mask is not None else x2
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            h = xd @ a.t()
            del xd
            y.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x2, h, mask) if mask is not None else ctx.save_for_backward(x2, h)
        ctx.weight, ctx.scale, ctx.p = weight, scale, p
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        ctx.lora = (lora_a, lora_b)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, h, *rest = ctx.saved_tensors
        mask = rest[0] if rest else None
        lora_a, lora_b = ctx.lora
        dtype, scale = x2.dtype, ctx.scale
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        with torch.autocast(x2.device.type, enabled=False):
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            gh = (g @ b) * scale  # (T, r)
            d_b = (g.t() @ h) * scale  # (out, r)
            xd = x2 * mask * (1.0 / (1.0 - ctx.p)) if mask is not None else x2
            d_a = gh.t() @ xd  # (r, in)
            del xd
            dx = None
            if ctx.needs_input_grad[0]:
                w = _dequant(ctx.weight).to(dtype)
                dx = g @ w
                del w
                lora_dx = gh @ a
                if mask is not None:
                    lora_dx = lora_dx * mask * (1.0 / (1.0 - ctx.p))
                dx += lora_dx
                dx = dx.view(grad.shape[:-1] + (dx.shape[-1],))
        return dx, None, d_a.to(ctx.a_dtype), d_b.to(ctx.b_dtype), None, None


def _fusable(module, x, args, kwargs) -> bool:
    if args or kwargs or module.disable_adapters or module.merged:
        return False
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
        return False
    base = module.get_base_layer()
    w = base.weight
    return (base.bias is None and getattr(w, "quant_state", None) is not None
            and type(w).__name__ == "Params4bit" and x.dtype.is_floating_point)


def _fused_forward(self, x, *args, **kwargs):
    if not _fusable(self, x, args, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    name = next(a for a in self.active_adapters if a in self.lora_A)
    drop = self.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and self.training else 0.0
    dtype = self.get_base_layer().compute_dtype or x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return NF4LoRAFunction.apply(x.to(dtype), self.get_base_layer().weight, self.lora_A[name].weight,
                                 self.lora_B[name].weight, float(self.scaling[name]), p)


def fuse_lora(model) -> int:
    """Route every peft `lora.Linear4bit` of `model` through `NF4LoRAFunction` (an instance-level
    forward, so the module tree, state dict and saved adapters are untouched). Returns how many."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft without bitsandbytes: nothing 4-bit to fuse
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and not getattr(module, FUSED_ATTR, False):
            module.forward = types.MethodType(_fused_forward, module)
            setattr(module, FUSED_ATTR, True)
            n += 1
    return n


def unfuse_lora(model) -> None:
    """Undo `fuse_lora` (peft's own forward again), e.g. before merging or under FSDP."""
    for module in model.modules():
        if getattr(module, FUSED_ATTR, False):
            del module.forward
            setattr(module, FUSED_ATTR, False)
