"""One autograd node for "NF4 base linear + LoRA": y = x W^T + s * B(A(dropout(x))).

peft's `lora.Linear4bit.forward` runs the base layer (bitsandbytes' own autograd function), clones its
output, then dropout, A, B, a scale and an add, each its own autograd node and kernel, and saves for
backward a dropped copy of the input per projection. Here the same maths is one `autograd.Function`:

  forward   W = dequant(W4);  y = x W^T;  h = (x * m) A^T;  y += s * h B^T       (m: dropout mask / (1-p))
  backward  W = dequant(W4);  g_h = s * g B;  dB = s * g^T h;  dA = g_h^T (x * m)
            dx = g W + (g_h A) * m

It saves the input x itself (shared by q, k and v, which read the same tensor), the small h, and a
one-byte mask only when dropout is on (torch's native dropout: mask and output in one kernel). Fewer nodes means less host time per step, which is what limits
small micro-batches on a fast GPU. The result equals peft's path up to rounding (tests/test_lora_fused.py);
A frozen base bias (Qwen2's q/k/v) is added in the same node; modules it does not cover (several adapters,
DoRA, merged or disabled adapters, a trainable bias, FSDP-sharded weights) keep peft's forward.
"""

from __future__ import annotations

import types

import torch

from . import fp8 as fp8_gemm
from . import nf4_kernel
from . import rebuild as rebuilt
from . import seeded_dropout

FUSED_ATTR = "_qlora_fused"
ABSMAX_ATTR = "_qlora_cache_absmax"
FP8_ATTR = "_qlora_base_fp8"
SEED_ATTR = "_qlora_dropout_seed"
SALT_ATTR = "_qlora_dropout_salt"
KERNEL_ATTR = "_qlora_nf4_kernel"


def dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverted dropout in one kernel: (x * keep / (1 - p), keep mask of one byte per element)."""
    return torch.native_dropout(x, p, True)


def undrop(t: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """t * keep / (1 - p), one kernel: dropout's backward, and the dropped input again from x."""
    return torch.ops.aten.native_dropout_backward(t, keep, 1.0 / (1.0 - p))


def block_absmax(weight, cache_absmax: bool) -> torch.Tensor:
    """The 4-bit weight's per-block scales in fp32. With double quant they are themselves quantised and
    are dequantised first (two more kernels and bitsandbytes' Python per call); `cache_absmax` keeps them
    on the weight after the first call (+4 bytes per 64 weights: 0.4 GiB for a 7B model)."""
    qs = weight.quant_state
    absmax = getattr(weight, "_qlora_absmax", None)
    if absmax is None:
        absmax = qs.absmax
        if qs.nested:
            import bitsandbytes.functional as bnbf

            absmax = (bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
        if cache_absmax:
            weight._qlora_absmax = absmax
    return absmax


def dequantize(weight, cache_absmax: bool, kernel: bool = False) -> torch.Tensor:
    """The 4-bit weight in the dtype it was quantised from: bitsandbytes' kernel, or with `kernel` the tiled
    Triton one (qlora/speed/nf4_kernel.py) where it covers the weight (the same values)."""
    qs = weight.quant_state
    absmax = block_absmax(weight, cache_absmax)
    if kernel and nf4_kernel.covers(weight, qs.dtype):
        return nf4_kernel.dequantize(weight, absmax)
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight.data, absmax, qs.blocksize, qs.quant_type, qs.shape,
                                                          qs.dtype)


class NF4LoRAFunction(torch.autograd.Function):
    """y = x dequant(W4)^T [+ bias] + scale * (dropout(x) A^T) B^T, with gradients for x, A and B only.

    Dropout is torch's (a stored one-byte mask) or, when `seed` is given, `qlora.speed.seeded_dropout`'s
    (the mask recomputed from seed, salt and element index: nothing stored, no RNG state). With `fp8`
    the two GEMMs with the frozen weight run in float8 (qlora/speed/fp8.py). With `recipe`
    (qlora/speed/rebuild.py) it keeps the inputs x was made from instead of x, and rebuilds x in backward."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale: float, p: float, cache_absmax: bool, seed=None,
                salt: int = 0, fp8: bool = False, bias=None, recipe=None, kernel: bool = False):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        seeded = p > 0 and seed is not None
        with torch.autocast(x.device.type, enabled=False):
            if fp8:
                y = fp8_gemm.linear(x2, weight, block_absmax(weight, cache_absmax), owner=x).to(dtype)
            else:
                y = x2 @ dequantize(weight, cache_absmax, kernel).to(dtype).t()
            if bias is not None:  # frozen (Qwen2's q/k/v): no gradient
                y.add_(bias.to(dtype))
            if seeded:
                xd, keep = seeded_dropout.apply(x2, seed, salt, p), None
            else:
                xd, keep = dropout(x2, p) if p > 0 else (x2, None)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            h = xd @ a.t()
            del xd
            y.addmm_(h, b.t(), alpha=scale)
        # the seed is saved (not copied): TokenLoss advances it only at the next micro-batch's forward,
        # after this backward; autograd's version check would catch any other order
        mask = keep if keep is not None else seed
        if recipe is None:
            ctx.save_for_backward(x2, h, mask)
        else:  # x is rebuilt in backward from tensors its maker keeps anyway
            ctx.save_for_backward(None, h, mask, *recipe[1])
        ctx.recipe = None if recipe is None else (recipe[0], recipe[2])
        ctx.weight, ctx.scale, ctx.p, ctx.cache_absmax, ctx.seeded, ctx.salt, ctx.fp8, ctx.kernel = \
            weight, scale, p, cache_absmax, seeded, salt, fp8, kernel
        ctx.ab = (a, b)  # the compute-dtype copies (r x (in + out), small): no second cast in backward
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, h, keep_or_seed, *inputs = ctx.saved_tensors
        if ctx.recipe is not None:
            x2 = rebuilt.rebuild(ctx.recipe[0], inputs, ctx.recipe[1])
            x2 = x2.reshape(-1, x2.shape[-1])
        a, b = ctx.ab
        dtype, scale, p = x2.dtype, ctx.scale, ctx.p
        if ctx.seeded:
            redrop = lambda t: seeded_dropout.apply(t, keep_or_seed, ctx.salt, p)  # noqa: E731
        elif keep_or_seed is not None:
            redrop = lambda t: undrop(t, keep_or_seed, p)  # noqa: E731
        else:
            redrop = None
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        with torch.autocast(x2.device.type, enabled=False):
            gh = (g @ b).mul_(scale)  # (T, r)
            d_b = (g.t() @ h).mul_(scale)  # (out, r)
            d_a = gh.t() @ (redrop(x2) if redrop else x2)  # (r, in)
            dx = None
            if ctx.needs_input_grad[0] and ctx.fp8:  # the LoRA term added in its GEMM's accumulator
                dx = fp8_gemm.grad_input(g, ctx.weight, block_absmax(ctx.weight, ctx.cache_absmax)).to(dtype)
                dx = dx.add_(redrop(gh @ a)) if redrop else dx.addmm_(gh, a)
            elif ctx.needs_input_grad[0]:
                lora_dx = gh @ a
                if redrop:
                    lora_dx = redrop(lora_dx)
                dx = torch.addmm(lora_dx, g, dequantize(ctx.weight, ctx.cache_absmax, ctx.kernel).to(dtype))
            if dx is not None:
                dx = dx.view(grad.shape[:-1] + (dx.shape[-1],))
        # autograd casts d_a, d_b to the (fp32) adapter weights' dtype
        return dx, None, d_a, d_b, None, None, None, None, None, None, None, None, None


def _fused_adapter(module, x, args, kwargs):
    """The one active adapter's name if this call can take the fused node, else None."""
    if args or kwargs or module.disable_adapters or module.merged:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
        return None
    base = module.get_base_layer()
    w = base.weight
    fusable = ((base.bias is None or not base.bias.requires_grad) and getattr(w, "quant_state", None) is not None
               and type(w).__name__ == "Params4bit" and x.dtype.is_floating_point)
    return active[0] if fusable else None


def _fused_forward(self, x, *args, **kwargs):
    name = _fused_adapter(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    drop = self.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and self.training else 0.0
    dtype = base.compute_dtype or x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    xin = x.to(dtype)
    recipe = rebuilt.recipe(x) if xin is x else None  # only a tensor used as it is can be rebuilt
    y = NF4LoRAFunction.apply(xin, base.weight, self.lora_A[name].weight, self.lora_B[name].weight,
                              float(self.scaling[name]), p, getattr(self, ABSMAX_ATTR, False),
                              getattr(self, SEED_ATTR, None), getattr(self, SALT_ATTR, 0),
                              getattr(self, FP8_ATTR, False) and fp8_gemm.usable(base.weight), base.bias, recipe,
                              getattr(self, KERNEL_ATTR, False))
    return y.to(x.dtype)  # as bitsandbytes' Linear4bit: the output in the input's dtype (a no-op under autocast)


def fuse_lora(model, cache_absmax: bool = False, dropout_seed: torch.Tensor | None = None,
              base_fp8: bool = False, fp8_exclude=(), nf4_kernel: bool = False) -> int:
    """Route every peft `lora.Linear4bit` of `model` through `NF4LoRAFunction` (an instance-level
    forward, so the module tree, state dict and saved adapters are untouched). With `dropout_seed`
    (`qlora.speed.seeded_dropout.new_seed`), LoRA dropout is the seeded kind, each module with its own salt;
    with `base_fp8` the frozen weight's GEMMs run in float8 (qlora/speed/fp8.py), except in modules whose
    name ends in one of `fp8_exclude`; with `nf4_kernel` the bf16 GEMMs' weights are dequantised by
    qlora/speed/nf4_kernel.py's Triton kernel where it runs. Returns how many."""
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # peft without bitsandbytes: nothing 4-bit to fuse
        return 0
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit) and not getattr(module, FUSED_ATTR, False):
            module.forward = types.MethodType(_fused_forward, module)
            setattr(module, FUSED_ATTR, True)
            setattr(module, ABSMAX_ATTR, cache_absmax)
            setattr(module, SEED_ATTR, dropout_seed)
            setattr(module, SALT_ATTR, n + 1)
            setattr(module, KERNEL_ATTR, nf4_kernel)
            weight = module.get_base_layer().weight  # no quant_state yet under FSDP: checked per call then
            setattr(module, FP8_ATTR, base_fp8 and name.rsplit(".", 1)[-1] not in fp8_exclude
                    and (getattr(weight, "quant_state", None) is None or fp8_gemm.usable(weight)))
            n += 1
    return n


def dropout_seed(model) -> torch.Tensor | None:
    """The seed counter the fused modules of `model` share (None: torch's own dropout)."""
    return next((getattr(m, SEED_ATTR) for m in model.modules() if getattr(m, SEED_ATTR, None) is not None), None)

