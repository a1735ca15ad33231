"""bitsandbytes' 8-bit blockwise AdamW, stepped over all LoRA tensors at once (`optimizer: adamw_8bit_flat`).

bitsandbytes steps one tensor at a time: for a 7-8B model with LoRA on all 7 projections that is 448 tensors,
each with its own Python call and kernel launches: 39 ms of a 1.3 s step in a profile, for ~1 ms of GPU work
(stepping them at once saved 28 ms a step on an H100: benchmarks/NOTES.md, section 16). This
optimizer keeps bitsandbytes' state and arithmetic (each tensor's two moments quantised in blocks of 256 with
bitsandbytes' signed and unsigned dynamic maps, tensors under `min_8bit_size` elements kept in 32 bits; the
update formulas of its CPU kernels, weight decay before the step) but lays the tensors end to end in buckets
of about 4M elements, each tensor padded to whole blocks so that no block spans two tensors, and runs one set
of torch kernels per bucket: ~35 launches per bucket, 6 buckets for Llama-3-8B.

One difference: a moment is rounded to the nearest code of the map. bitsandbytes' kernels find the code by
their own search, which sometimes takes the second nearest (bitsandbytes' CPU kernel, on random blocks: 0.15%
of first and 3% of second moments); after 50 steps the two optimizers' weights differ by under 1% of how far
they moved, and both stay as close to 32-bit AdamW as each other.

The states live in device memory (bitsandbytes' paged ones live in CUDA managed memory, outside torch's
allocator): 2 bytes per trainable parameter plus 8 bytes per block of 256, and the step's temporaries are
bounded by the bucket size. One parameter group; not under FSDP. Every tensor needs a gradient: a step where one
has none stops with one line before anything changes.
"""

from __future__ import annotations

import math

import torch

from ..config import ConfigError

BLOCK = 256
BUCKET = 1 << 22  # elements per bucket: bounds the step's fp32 temporaries to ~16 MiB each


def dynamic_maps(device) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' signed (first moment) and unsigned (second moment) 8-bit dynamic maps."""
    from bitsandbytes.functional import create_dynamic_map

    return (create_dynamic_map(signed=True).to(device, torch.float32),
            create_dynamic_map(signed=False).to(device, torch.float32))


def _span(n: int) -> int:
    """Elements a tensor of n takes in an 8-bit bucket: whole blocks, so no block spans two tensors."""
    return math.ceil(n / BLOCK) * BLOCK


class _Bucket:
    """Tensors laid end to end; `offsets[i]` is where tensor i starts, `sizes[i]` its element count."""

    def __init__(self, params: list, pad: bool):
        self.params, self.sizes = params, [p.numel() for p in params]
        spans = [_span(n) if pad else n for n in self.sizes]
        self.offsets = [sum(spans[:i]) for i in range(len(spans))]
        self.n = sum(spans)
        self.padded = any(s != n for s, n in zip(spans, self.sizes))

    def views(self, flat: torch.Tensor) -> list:
        return [flat[o:o + n] for o, n in zip(self.offsets, self.sizes)]


class FlatAdamW8bit(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 min_8bit_size: int = 4096):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        if len(self.param_groups) != 1:
            raise ValueError("adamw_8bit_flat takes one parameter group")
        self.min_8bit_size, self.step_count, self._layout = min_8bit_size, 0, None

    # ----------------------------------------------------------------- layout and state
    def _build(self) -> None:
        params = self.param_groups[0]["params"]
        dev = params[0].device
        big = [p for p in params if p.numel() >= self.min_8bit_size]
        small = [p for p in params if p.numel() < self.min_8bit_size]
        buckets, cur, size = [], [], 0
        for p in big:
            span = _span(p.numel())
            if cur and size + span > BUCKET:
                buckets.append(_Bucket(cur, pad=True))
                cur, size = [], 0
            cur.append(p)
            size += span
        if cur:
            buckets.append(_Bucket(cur, pad=True))
        self.code1, self.code2 = dynamic_maps(dev)
        self.bounds1 = (self.code1[:-1] + self.code1[1:]) / 2
        self.bounds2 = (self.code2[:-1] + self.code2[1:]) / 2
        zero1, zero2 = int(self.code1.abs().argmin()), int(self.code2.abs().argmin())
        self.buckets = buckets
        self.small = _Bucket(small, pad=False) if small else None
        self.flat = [dict(state1=torch.full((b.n,), zero1, dtype=torch.uint8, device=dev),
                          state2=torch.full((b.n,), zero2, dtype=torch.uint8, device=dev),
                          absmax1=torch.zeros(b.n // BLOCK, device=dev), absmax2=torch.zeros(b.n // BLOCK, device=dev))
                     for b in buckets]
        if self.small is not None:
            self.flat.append(dict(state1=torch.zeros(self.small.n, device=dev),
                                  state2=torch.zeros(self.small.n, device=dev)))
        width = max([b.n for b in buckets] + [self.small.n if self.small else 0])
        self.ws_g = torch.zeros(width, device=dev)  # gradient and parameter of one bucket, in fp32
        self.ws_p = torch.zeros(width, device=dev)
        self._layout = [p.numel() for p in params]
        for b, st in zip(buckets, self.flat):  # optimizer.state keyed by each bucket's first tensor (for reports)
            self.state[b.params[0]] = st
        if self.small is not None:
            self.state[self.small.params[0]] = self.flat[-1]

    def state_dict(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        buckets = [b.n for b in self.buckets] if self._layout else None
        return {"format": "adamw_8bit_flat", "step": self.step_count, "layout": self._layout, "buckets": buckets,
                "min_8bit_size": self.min_8bit_size, "flat": self.flat if self._layout else [], "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != "adamw_8bit_flat":
            raise ValueError("the checkpoint's optimizer state is not adamw_8bit_flat's: resume with the optimizer "
                             "it was saved with")
        if state["layout"] is not None:  # None: saved before its first step (accelerate's prepare round-trips it)
            self._build()
            if state["layout"] != self._layout or state["min_8bit_size"] != self.min_8bit_size:
                raise ValueError("the checkpoint's adamw_8bit_flat state was saved for other trainable tensors")
            if state.get("buckets") != [b.n for b in self.buckets] or len(state["flat"]) != len(self.flat) or any(
                    saved[k].shape != t.shape for mine, saved in zip(self.flat, state["flat"]) for k, t in mine.items()):
                raise ValueError("the checkpoint's adamw_8bit_flat state was laid out in other buckets")
            for mine, saved in zip(self.flat, state["flat"]):
                for k, t in mine.items():
                    t.copy_(saved[k])
        for g, saved in zip(self.param_groups, state["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        self.step_count = state["step"]

    # ----------------------------------------------------------------- the step
    def _gather(self, b: _Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        g, p = self.ws_g[:b.n], self.ws_p[:b.n]
        if b.padded:
            g.zero_()
            p.zero_()
        torch._foreach_copy_(b.views(g), [t.grad.reshape(-1) for t in b.params])
        torch._foreach_copy_(b.views(p), [t.detach().reshape(-1) for t in b.params])
        return g, p

    def _scatter(self, b: _Bucket, p: torch.Tensor) -> None:
        torch._foreach_copy_([t.detach() for t in b.params], [v.view(t.shape) for v, t in zip(b.views(p), b.params)])

    @staticmethod
    def _quantize(x: torch.Tensor, bounds: torch.Tensor, q: torch.Tensor, absmax: torch.Tensor) -> None:
        """x (whole blocks) to 8-bit codes in q: each block scaled by its largest magnitude, each value rounded to
        the nearest code of the map (`bounds` are the midpoints between neighbouring codes)."""
        blocks = x.view(-1, BLOCK)
        torch.amax(blocks.abs(), dim=1, out=absmax)
        scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1)
        q.copy_(torch.bucketize(scaled.view(-1), bounds, out_int32=True))

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        missing = [i for i, t in enumerate(self.param_groups[0]["params"]) if t.grad is None]
        if missing:  # checked before anything changes: the step is all or nothing
            t = self.param_groups[0]["params"][missing[0]]
            raise ConfigError(f"config key 'optimizer': adamw_8bit_flat steps every trainable tensor, and {len(missing)} "
                              f"got no gradient this step (the first: #{missing[0]}, shape {list(t.shape)}); use "
                              "optimizer paged_adamw_8bit, which skips such tensors")
        with torch.no_grad():
            self._step()
        return loss

    def _step(self) -> None:
        if self._layout is None:
            self._build()
        group = self.param_groups[0]
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        self.step_count += 1
        t = self.step_count
        for b, st in zip(self.buckets, self.flat):
            g, p = self._gather(b)
            m = (self.code1[st["state1"].long()].view(-1, BLOCK) * st["absmax1"].view(-1, 1)).view(-1)
            v = (self.code2[st["state2"].long()].view(-1, BLOCK) * st["absmax2"].view(-1, 1)).view(-1)
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = (v.sqrt() / math.sqrt(1.0 - b2 ** t)).add_(eps)
            if wd > 0.0:
                p.mul_(1.0 - lr * wd)
            p.addcdiv_(m, denom, value=-lr / (1.0 - b1 ** t))
            self._scatter(b, p)
            self._quantize(m, self.bounds1, st["state1"], st["absmax1"])
            self._quantize(v, self.bounds2, st["state2"], st["absmax2"])
        if self.small is not None:  # bitsandbytes' 32-bit update, for tensors under min_8bit_size
            st = self.flat[-1]
            g, p = self._gather(self.small)
            m, v = st["state1"], st["state2"]
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            c2 = math.sqrt(1.0 - b2 ** t)
            if wd > 0.0:
                p.mul_(1.0 - lr * wd)
            p.add_(m / (v.sqrt() + eps * c2), alpha=-lr * c2 / (1.0 - b1 ** t))
            self._scatter(self.small, p)
