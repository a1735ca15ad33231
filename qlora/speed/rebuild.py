"""Projection inputs rebuilt in backward instead of kept (config key `rebuild_inputs`).

In a decoder layer that does not recompute, each fused NF4+LoRA node (qlora/speed/lora_fused.py) keeps
its input x for the adapter's gradient dA = g_h^T x. Three of those inputs are cheap functions of
tensors the layer keeps anyway:

  q, k, v      read the attention norm's output;  the norm keeps its own input for its backward
  gate, up     read the MLP norm's output;         likewise
  down         reads act(gate) * up;              the gated activation keeps gate and up

With the switch on, each such output carries a recipe (the function that made it and that function's
inputs); a fused node that reads it keeps the inputs instead and runs the function again, without
autograd and under the same autocast state, in its own backward: one element-wise kernel. Same kernel,
same inputs, so the rebuilt tensor is bitwise the one of forward and training is unchanged bit for bit
(tests/test_rebuild.py). Per token and layer it saves (2 x hidden + intermediate) x 2 bytes in bf16: 180 MB
per 4,096 tokens on Llama-3-8B, a third of what a layer that does not recompute keeps, so at a given
memory fewer layers need to recompute. Layers that recompute keep only their input anyway and are left
as they are. The recipe's inputs go through the node's `save_for_backward`, so an in-place change to them
before backward is caught by autograd as for any saved tensor.
"""

from __future__ import annotations

import torch

from .kernels import LIGER_ATTR

RECIPE_ATTR = "_qlora_recipe"  # on a tensor: (function, inputs, autocast state) that made it
REBUILD_ATTR = "_qlora_rebuild"  # on a module whose output carries a recipe: "norm" or "mlp"

# decoder-layer norms whose output feeds 4-bit projections (Gemma 3: pre_feedforward; its
# post_attention_layernorm normalises the attention output, which feeds no projection)
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm")


def recipe(x: torch.Tensor):
    """The recipe `x` carries, or None."""
    return getattr(x, RECIPE_ATTR, None)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def tag(out, fn, *inputs):
    """Mark `out` (made by `fn(*inputs)`) as rebuildable; returns it."""
    if isinstance(out, torch.Tensor) and out.requires_grad:
        setattr(out, RECIPE_ATTR, (fn, inputs, _autocast_state(out.device.type)))
    return out


def rebuild(fn, inputs, state) -> torch.Tensor:
    """Run a recipe again: no autograd, the autocast state it was made under."""
    autocast, dtype = state
    with torch.no_grad(), torch.autocast(inputs[0].device.type, dtype=dtype, enabled=autocast):
        return fn(*inputs)


def gated(mlp):
    """act(gate) * up as `mlp`'s forward computes it: liger's kernel where liger patched the module
    (SiLU, or GELU-tanh for Gemma's GeGLU), else the module's own activation (exact transformers code)."""
    if getattr(mlp, LIGER_ATTR, False):
        if "GEGLU" in mlp._get_name():
            from liger_kernel.ops.geglu import LigerGELUMulFunction

            return LigerGELUMulFunction.apply
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    return None if act is None else (lambda g, u: act(g) * u)


def _wrap_norm(norm) -> None:
    previous = norm.forward  # transformers' or liger's

    def forward(x, *args, **kwargs):
        out = previous(x, *args, **kwargs)
        return out if args or kwargs else tag(out, previous, x)

    norm.forward = forward
    setattr(norm, REBUILD_ATTR, "norm")


def _wrap_mlp(mlp, fn) -> None:
    fused = hasattr(mlp, "gate_up_proj")  # Phi-3: one linear, then chunked

    def forward(x):
        if fused:
            g, u = mlp.gate_up_proj(x).chunk(2, dim=-1)
        else:
            g, u = mlp.gate_proj(x), mlp.up_proj(x)
        return mlp.down_proj(tag(fn(g, u), fn, g, u))

    mlp.forward = forward
    setattr(mlp, REBUILD_ATTR, "mlp")


def use_rebuilt_inputs(blocks) -> tuple[int, int]:
    """Tag the projection-feeding norms and the gated MLP of every decoder block in `blocks` that does not
    recompute. Call after the kernels are in (it wraps the forward they set). Returns (norms, MLPs)."""
    norms = mlps = 0
    for block in blocks:
        if getattr(block, "gradient_checkpointing", False):
            continue
        for name in NORMS:
            if name == "post_attention_layernorm" and hasattr(block, "pre_feedforward_layernorm"):
                continue  # Gemma 3: it normalises the attention output
            norm = getattr(block, name, None)
            if norm is not None and not hasattr(norm, REBUILD_ATTR):
                _wrap_norm(norm)
                norms += 1
        mlp = getattr(block, "mlp", None)
        gate_up = hasattr(mlp, "gate_up_proj") or (hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"))
        if gate_up and hasattr(mlp, "down_proj") and not hasattr(mlp, REBUILD_ATTR):
            fn = gated(mlp)
            if fn is not None:
                _wrap_mlp(mlp, fn)
                mlps += 1
    return norms, mlps


def count(model) -> tuple[int, int]:
    """(norms, MLPs) of `model` whose outputs carry a recipe."""
    kinds = [getattr(m, REBUILD_ATTR, None) for m in model.modules()]
    return kinds.count("norm"), kinds.count("mlp")
