"""Projections that read one input, as one autograd node (config key `group_projections`).

q, k and v read the same normed hidden state, and so do gate and up. As separate fused NF4+LoRA nodes
(qlora/speed/lora_fused.py) each runs its own LoRA GEMMs over that input and returns its own input
gradient, which autograd then adds up: two (q/k/v) and one (gate/up) element-wise adds of tokens x hidden
per layer, in backward and again in every recomputed forward's backward. As one node:

  forward   y_i = x W_i^T [+ bias_i];   h = x [A_q; A_k; A_v]^T   (one GEMM when no member drops out)
            y_i += s_i h_i B_i^T
  backward  g_h = [s_q g_q B_q, s_k g_k B_k, s_v g_v B_v];   dA = g_h^T x (one GEMM);  dB_i = s_i g_i^T h_i
            dx = g_h [A_q; A_k; A_v] + g_q W_q + g_k W_k + g_v W_v   (the sums in the GEMMs' accumulators)

The base GEMMs stay one per projection, so every output is its own contiguous tensor as before and the
attention and gated-activation kernels read them unchanged. With LoRA dropout each member draws its own
mask, as peft does, and keeps its own h. The input (or its rebuild recipe, qlora/speed/rebuild.py) is kept
once per group and rebuilt once.

How it meets the model: the first member (q, gate) computes every member's output; the others, called next
with the very same tensor, take theirs. An output no sibling took is dropped when the parent (attention or
MLP) returns or raises. A model that calls a member with another tensor (cross-attention) or before the
first member ungroups that set for good: its members then run alone, exactly as without grouping, torch's
dropout masks drawn in call order. Training is the same maths: only the order of some additions differs
(tests/test_grouped.py).
"""

from __future__ import annotations

import torch

from . import fp8 as fp8_gemm
from . import rebuild as rebuilt
from . import seeded_dropout
from . import lora_fused
from .lora_fused import (ABSMAX_ATTR, FP8_ATTR, FUSED_ATTR, KERNEL_ATTR, SALT_ATTR, SEED_ATTR, _fused_adapter,
                         _fused_forward, block_absmax, dequantize, undrop)

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
GROUP_ATTR = "_qlora_group"  # on a member: its group's modules, in call order
PENDING_ATTR = "_qlora_pending"  # on a member: (input, output) its group computed for it
PER = 5  # tensors per member passed to the node: weight, lora_a, lora_b, bias, seed


class GroupedNF4LoRAFunction(torch.autograd.Function):
    """The outputs of several NF4+LoRA projections of one input x. `members` holds, per projection,
    (scale, p, cache_absmax, salt, fp8, kernel); `tensors` holds, per projection, (weight, lora_a, lora_b, bias, seed)."""

    @staticmethod
    def forward(ctx, x, members, recipe, *tensors):
        ctx.set_materialize_grads(False)
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        n = len(members)
        shared = all(m[1] == 0 for m in members)  # no dropout: one h for the group
        ys, hs, masks, ab = [], [], [], []
        with torch.autocast(x.device.type, enabled=False):
            for i, (scale, p, cache, salt, fp8, kernel) in enumerate(members):
                weight, lora_a, lora_b, bias, seed = tensors[PER * i:PER * (i + 1)]
                if fp8:
                    y = fp8_gemm.linear(x2, weight, block_absmax(weight, cache), owner=x).to(dtype)
                else:
                    y = x2 @ dequantize(weight, cache, kernel).to(dtype).t()
                if bias is not None:  # frozen: no gradient
                    y.add_(bias.to(dtype))
                ys.append(y)
                ab.append((lora_a.to(dtype), lora_b.to(dtype)))
            if shared:
                a_cat = torch.cat([a for a, _ in ab])
                h = x2 @ a_cat.t()
                hs = list(h.split([a.shape[0] for a, _ in ab], dim=1))
                masks = [None] * n
            else:
                a_cat = h = None
                for i, (scale, p, cache, salt, fp8, kernel) in enumerate(members):
                    seed = tensors[PER * i + 4]
                    if p > 0 and seed is not None:
                        xd, mask = seeded_dropout.apply(x2, seed, salt, p), seed
                    else:
                        xd, mask = lora_fused.dropout(x2, p) if p > 0 else (x2, None)  # the fused node's draw
                    hs.append(xd @ ab[i][0].t())
                    masks.append(mask)
                    del xd
            for i, (scale, *_rest) in enumerate(members):
                ys[i].addmm_(hs[i], ab[i][1].t(), alpha=scale)
        kept = [h] if shared else hs
        inputs = [x2] if recipe is None else [None, *recipe[1]]
        ctx.save_for_backward(*kept, *masks, *inputs)
        ctx.layout = (n, len(kept), shared)
        ctx.recipe = None if recipe is None else (recipe[0], recipe[2])
        ctx.members, ctx.weights, ctx.ab, ctx.a_cat = members, tensors[0::PER], ab, a_cat
        ctx.seeded = [m[1] > 0 and tensors[PER * i + 4] is not None for i, m in enumerate(members)]
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx, *grads):
        n, n_kept, shared = ctx.layout
        saved = ctx.saved_tensors
        kept, masks, (x2, *inputs) = saved[:n_kept], saved[n_kept:n_kept + n], saved[n_kept + n:]
        if ctx.recipe is not None:
            x2 = rebuilt.rebuild(ctx.recipe[0], inputs, ctx.recipe[1])
            x2 = x2.reshape(-1, x2.shape[-1])
        dtype = x2.dtype
        hs = list(kept[0].split([a.shape[0] for a, _ in ctx.ab], dim=1)) if shared else list(kept)
        gs = [None if g is None else g.reshape(-1, g.shape[-1]).to(dtype) for g in grads]
        d_a, d_b, ghs = [None] * n, [None] * n, []
        with torch.autocast(x2.device.type, enabled=False):
            for i, g in enumerate(gs):
                scale, p = ctx.members[i][:2]
                a, b = ctx.ab[i]
                if g is None:  # an output nothing used: its adapter gets no gradient from here
                    ghs.append(torch.zeros(x2.shape[0], a.shape[0], dtype=dtype, device=x2.device))
                    continue
                ghs.append((g @ b).mul_(scale))
                d_b[i] = (g.t() @ hs[i]).mul_(scale)
            dx = _base_grad_input(ctx, gs, dtype) if ctx.needs_input_grad[0] else None
            if shared:
                gh = torch.cat(ghs, dim=1)
                d_a = list((gh.t() @ x2).split([a.shape[0] for a, _ in ctx.ab], dim=0))
                if ctx.needs_input_grad[0]:
                    dx = gh @ ctx.a_cat if dx is None else dx.addmm_(gh, ctx.a_cat)
            else:
                for i, gh in enumerate(ghs):
                    p, salt = ctx.members[i][1], ctx.members[i][3]
                    if ctx.seeded[i]:
                        redrop = lambda t, i=i, p=p, salt=salt: seeded_dropout.apply(t, masks[i], salt, p)  # noqa: E731
                    elif masks[i] is not None:
                        redrop = lambda t, i=i, p=p: undrop(t, masks[i], p)  # noqa: E731
                    else:
                        redrop = None
                    d_a[i] = gh.t() @ (redrop(x2) if redrop else x2)
                    if ctx.needs_input_grad[0]:
                        if redrop is None and dx is not None:
                            dx.addmm_(gh, ctx.ab[i][0])
                            continue
                        lora_dx = gh @ ctx.ab[i][0]
                        lora_dx = redrop(lora_dx) if redrop else lora_dx
                        dx = lora_dx if dx is None else dx.add_(lora_dx)
            if dx is not None:
                dx = dx.view(grads[next(i for i, g in enumerate(grads) if g is not None)].shape[:-1] + (dx.shape[-1],))
        for i, g in enumerate(gs):
            if g is None:
                d_a[i] = None
        out = [dx, None, None]
        for i in range(n):
            out += [None, d_a[i], d_b[i], None, None]
        return tuple(out)


def _base_grad_input(ctx, gs, dtype):
    """sum_i g_i W_i over the members with an output gradient (None if none has one): the FP8 members' as one
    GEMM (qlora/speed/fp8.py `grad_input_group`), the others' added into it in their GEMMs' accumulators."""
    fp8 = [i for i, g in enumerate(gs) if g is not None and ctx.members[i][4]]
    dx = None
    if fp8:
        dx = fp8_gemm.grad_input_group([gs[i] for i in fp8], [ctx.weights[i] for i in fp8],
                                       [block_absmax(ctx.weights[i], ctx.members[i][2]) for i in fp8]).to(dtype)
    for i, g in enumerate(gs):
        if g is None or i in fp8:
            continue
        (_, _, cache, _, _, kernel), weight = ctx.members[i], ctx.weights[i]
        w = dequantize(weight, cache, kernel).to(dtype)
        dx = g @ w if dx is None else dx.addmm_(g, w)
    return dx


def _alone(group, first, x):
    """The first member computes alone this time (adapters off, mixed dtypes): so do its siblings."""
    for m in group:
        if m is not first:
            m.__dict__[PENDING_ATTR] = (x, None)


def _ungroup(group):
    """A model that calls the members with different inputs, or in another order than the group's: every
    member runs on its own from now on, exactly as without grouping (dropout masks drawn in call order)."""
    for m in group:
        m.__dict__.pop(GROUP_ATTR, None)
        m.__dict__.pop(PENDING_ATTR, None)


def _grouped_forward(self, x, *args, **kwargs):
    pending = self.__dict__.pop(PENDING_ATTR, None)
    group = self.__dict__.get(GROUP_ATTR, ())
    if pending is not None and pending[0] is x and not args and not kwargs:
        return pending[1] if pending[1] is not None else _fused_forward(self, x)
    if group and (pending is not None or group[0] is not self):
        _ungroup(group)
    if not self.__dict__.get(GROUP_ATTR):
        return _fused_forward(self, x, *args, **kwargs)
    names = [_fused_adapter(m, x, args, kwargs) for m in group]
    if any(name is None for name in names):
        _alone(group, self, x)
        return _fused_forward(self, x, *args, **kwargs)
    dtype = None
    members, tensors = [], []
    for m, name in zip(group, names):
        base = m.get_base_layer()
        d = base.compute_dtype or x.dtype
        if torch.is_autocast_enabled(x.device.type):
            d = torch.get_autocast_dtype(x.device.type)
        if dtype not in (None, d):  # members that compute in different dtypes: each on its own
            _alone(group, self, x)
            return _fused_forward(self, x, *args, **kwargs)
        dtype = d
        drop = m.lora_dropout[name]
        p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and m.training else 0.0
        fp8 = getattr(m, FP8_ATTR, False) and fp8_gemm.usable(base.weight)
        members.append((float(m.scaling[name]), p, getattr(m, ABSMAX_ATTR, False), getattr(m, SALT_ATTR, 0), fp8,
                        getattr(m, KERNEL_ATTR, False)))
        tensors += [base.weight, m.lora_A[name].weight, m.lora_B[name].weight, base.bias, getattr(m, SEED_ATTR, None)]
    xin = x.to(dtype)
    recipe = rebuilt.recipe(x) if xin is x else None
    ys = GroupedNF4LoRAFunction.apply(xin, tuple(members), recipe, *tensors)
    mine = None
    for m, y in zip(group, ys):
        y = y.to(x.dtype)
        if m is self:
            mine = y
        else:
            m.__dict__[PENDING_ATTR] = (x, y)
    return mine


def _drop_pending(parent, args, output):
    for m in parent.__dict__.get("_qlora_group_members", ()):
        m.__dict__.pop(PENDING_ATTR, None)


def group_projections(model) -> int:
    """Route each q/k/v and gate/up set of fused NF4+LoRA linears (`fuse_lora` already applied) that share a
    parent through one `GroupedNF4LoRAFunction`. Returns how many groups."""
    n = 0
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, name, None) for name in names]
            if not all(getattr(m, FUSED_ATTR, False) and GROUP_ATTR not in m.__dict__ for m in members):
                continue
            if len({m.get_base_layer().in_features for m in members}) > 1:  # not one input after all
                continue
            for m in members:
                m.__dict__[GROUP_ATTR] = tuple(members)
                m.forward = _grouped_forward.__get__(m)
            parent.__dict__["_qlora_group_members"] = parent.__dict__.get("_qlora_group_members", ()) + tuple(members)
            if not getattr(parent, "_qlora_drop_hook", False):
                parent.register_forward_hook(_drop_pending, always_call=True)  # also when the forward raises
                parent._qlora_drop_hook = True
            n += 1
    return n


def count(model) -> int:
    """How many projections of `model` run grouped."""
    return sum(GROUP_ATTR in m.__dict__ for m in model.modules())
