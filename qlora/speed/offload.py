"""Checkpointed layers whose inputs wait for backward in pinned host memory (config key
`offload_recompute`), for rows too long for the GPU.

With activation checkpointing a decoder layer keeps only its input for backward, but over a very
long row that is still hidden_size x 2 bytes per token per layer: 32 GiB for one 131,072-token row
of Llama-2-7B. Here each checkpointed layer copies its input to pinned host memory in forward (on
a side stream, overlapping the next layer's compute) and copies it back in backward just before
recomputing the layer, so the GPU holds the inputs of one layer at a time. The recompute runs the
layer again under the same RNG state (or none is needed: seeded dropout), as torch's checkpoint does.
One process only (a reentrant-style backward: DDP would see its gradient hooks fire in the recompute).
"""

from __future__ import annotations

import contextlib

import torch


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, preserve_rng: bool, contexts, anchor, hidden, *rest):
        ctx.run, ctx.rest, ctx.device = run, rest, hidden.device
        ctx.recompute_ctx = None if contexts is None else contexts[1]
        ctx.rng = rng_state(hidden.device) if preserve_rng else None
        host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
        if hidden.is_cuda:
            stream = _copy_stream(hidden.device)
            stream.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(stream):
                host.copy_(hidden, non_blocking=True)
            hidden.record_stream(stream)  # its memory is not reused before the copy is done
            ctx.copied = stream.record_event()
        else:
            host.copy_(hidden)
            ctx.copied = None
        ctx.host = host
        if contexts is None:
            with torch.no_grad():
                return run(hidden, *rest)
        # Kept ops (qlora/speed/keep_attention.py) must run here as they will in the recompute: with grad
        # on and an input that requires it. SDPA's efficient and cuDNN kernels write the log-sum-exp their
        # backward reads only then, and torch's selective checkpointing matches the recompute's ops to
        # these. Nothing is saved for a backward of this graph (it has none): it dies with the layer call.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_discard, _never_unpacked), contexts[0]:
            out = run(hidden.detach().requires_grad_(True), *rest)
        return tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()

    @staticmethod
    def backward(ctx, *grads):
        if ctx.copied is not None:
            ctx.copied.synchronize()  # the forward copy has landed in host memory
        hidden = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.host = None
        again = ctx.recompute_ctx if ctx.recompute_ctx is not None else contextlib.nullcontext()
        with replayed_rng(ctx.rng, ctx.device), torch.enable_grad(), again:
            out = ctx.run(hidden, *ctx.rest)
        ctx.recompute_ctx = None
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, None, hidden.grad) + (None,) * len(ctx.rest)


def _discard(tensor):
    return None


def _never_unpacked(_):
    raise RuntimeError("the offloaded forward keeps no graph for backward")


def rng_state(device: torch.device) -> tuple:
    """The RNG state a recompute must start from, as torch's checkpoint keeps it: the CPU's and the device's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def replayed_rng(state: tuple | None, device: torch.device):
    """Run the body from `state` (`rng_state`), leaving the RNG as it was before; None: as it is."""
    cuda = state is not None and state[1] is not None
    with torch.random.fork_rng(devices=[device] if cuda else [], enabled=state is not None):
        if state is not None:
            torch.set_rng_state(state[0])
            if cuda:
                torch.cuda.set_rng_state(state[1], device)
        yield


_STREAMS: dict = {}


def _copy_stream(device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def offloaded_checkpoint(preserve_rng: bool = True, context_fn=None):
    """A `_gradient_checkpointing_func` for transformers' checkpointed layers: `func(run, hidden, *rest)`,
    where `run` is the layer's forward with its keyword arguments bound. `context_fn` as torch's checkpoint
    takes it: a (forward, recompute) context pair per call (qlora/speed/keep_attention.py)."""
    # an input that requires grad, so backward reaches the layer (and its LoRA weights) even when the
    # hidden states do not (the first layer's input comes from frozen embeddings)
    anchor = torch.empty(0, requires_grad=True)

    def func(run, hidden, *rest):
        contexts = context_fn() if context_fn is not None else None
        return _OffloadedLayer.apply(run, preserve_rng, contexts, anchor, hidden, *rest)

    return func
