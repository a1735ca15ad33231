"""The MLP of each decoder layer in tiles along the sequence (config key `mlp_tile_tokens`), for rows too
long for the GPU.

Over one long row the MLP's intermediates dominate what a layer holds in backward: gate, up and
act(gate) * up are each tokens x intermediate_size (three 7 GiB tensors for one 262,144-token row of
Llama-3-8B), and their gradients as many again. Here an MLP call over more than `tile` tokens runs as
one autograd node that keeps only its input: forward computes the output tile by tile without autograd;
backward runs each tile again with autograd, back-propagates that tile's slice of the output gradient,
and frees it before the next. So the intermediates of one tile exist at a time, for one more MLP forward
per layer. Within a layer that recomputes (`recompute`), that is the same trade again, one level down.

The maths is the MLP's own: each token's output reads only that token's input. LoRA weight gradients are
summed tile by tile, so they differ from the untiled sum by rounding only (tests/test_tiled_mlp.py).
Dropout in the fused LoRA node draws from the RNG; the tiles' backward restores the RNG state the forward
started from, so each tile draws the masks its forward drew. One process only: the LoRA gradients
accumulate inside this node's backward, where DDP's hooks would fire once per tile.
"""

from __future__ import annotations

import types

import torch

from .offload import replayed_rng, rng_state

TILED_ATTR = "_qlora_tiled_mlp"


def _tiles(run, x, tile: int) -> torch.Tensor:
    """run(x) computed `tile` tokens at a time (no autograd): what one tile's intermediates hold, at a time."""
    flat = x.reshape(-1, x.shape[-1])
    out = None
    for i in range(0, flat.shape[0], tile):
        y = run(flat[i:i + tile].unsqueeze(0)).squeeze(0)
        if out is None:
            out = y.new_empty(flat.shape[0], y.shape[-1])
        out[i:i + tile] = y
    return out.view(*x.shape[:-1], out.shape[-1])


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, tile: int, preserve_rng: bool, anchor, x):
        ctx.run, ctx.tile = run, tile
        ctx.rng = rng_state(x.device) if preserve_rng else None
        ctx.save_for_backward(x)
        with torch.no_grad():
            return _tiles(run, x, tile)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        flat, g = x.detach().reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        dx = torch.empty_like(flat) if ctx.needs_input_grad[4] else None
        with replayed_rng(ctx.rng, x.device):
            for i in range(0, flat.shape[0], ctx.tile):
                xt = flat[i:i + ctx.tile].unsqueeze(0).detach().requires_grad_(dx is not None)
                with torch.enable_grad():
                    yt = ctx.run(xt)
                if yt.requires_grad:
                    torch.autograd.backward(yt, g[i:i + ctx.tile].unsqueeze(0))
                if dx is not None:
                    dx[i:i + ctx.tile] = xt.grad.squeeze(0)
                del xt, yt
        return None, None, None, None, None if dx is None else dx.view(x.shape)


def _tiled_forward(self, x):
    inner, tile = getattr(self, TILED_ATTR), self._qlora_tile
    if x.shape[:-1].numel() <= tile:
        return inner(x)
    if not torch.is_grad_enabled():  # a checkpointed layer's first forward, evaluation
        return _tiles(inner, x, tile)
    return _TiledMLP.apply(inner, tile, self._qlora_preserve_rng, self._qlora_anchor, x)


def tile_mlps(blocks, tile: int, preserve_rng: bool = True) -> int:
    """Route the MLP of every decoder block in `blocks` through `_TiledMLP` when a call holds more than
    `tile` tokens. Call last: it wraps whatever forward the kernels and rebuilt inputs set. `preserve_rng`:
    keep the RNG state for the tiles' backward (needed only when the MLP draws random numbers: torch's
    dropout). Returns how many."""
    n = 0
    # an input that requires grad, so backward reaches the MLP's LoRA weights even when x does not
    anchor = torch.empty(0, requires_grad=True)
    for block in blocks:
        mlp = getattr(block, "mlp", None)
        if mlp is None or hasattr(mlp, TILED_ATTR):
            continue
        setattr(mlp, TILED_ATTR, mlp.forward)
        mlp._qlora_tile, mlp._qlora_anchor, mlp._qlora_preserve_rng = tile, anchor, preserve_rng
        mlp.forward = types.MethodType(_tiled_forward, mlp)
        n += 1
    return n
