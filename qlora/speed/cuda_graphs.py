"""Forward + backward of a micro-batch as one CUDA graph (config key `cuda_graphs`).

A 7B QLoRA micro-batch launches ~6,000 kernels (~200 per layer); with small micro-batches the GPU
waits on the host, which spends ~50 us per launch. Packed rows have static shapes, so the whole
forward and backward of a micro-batch is captured once and replayed: one launch per micro-batch.

What makes the step capturable:
- inputs are copied into fixed buffers: rows padded to `max_seq_len` (the extra tail is a padding
  pseudo-example of its own), the supervised-position index padded with a position whose target is
  -100 (the last of the last row), varlen's `cu_seqlens` padded with empty sequences and a fixed
  `max_seqlen`; the 1/tokens scale is a device tensor; with `attn_backend: cudnn` (cuDNN's frontend) the
  graph takes dense rows while every micro-batch holds one example per row, and is captured once more,
  for packed rows from then on, at the first micro-batch that packs several;
- the captured function is train.py's `micro_batch_loss` (passed in as `loss_fn`), so a loss term added
  there is captured too; a term that cannot be captured (a host sync such as `.item()`, a
  data-dependent shape) stops the run with one line at the first capture;
- no host syncs inside: the loss is `TokenLoss(ce="fused")` (liger's has an `.item()`), and LoRA
  dropout is seeded (`qlora.speed.seeded_dropout`): its mask never reads the RNG state, which a graph may
  not do, so checkpointed layers recompute without stashing RNG states;
- gradients accumulate in place into fixed `.grad` tensors: zeroed at the first micro-batch of each
  window (train_step sets `.grad` to None after the optimizer step) and put back on the parameters.
The optimizer step, clipping and the per-step `.item()` stay outside the graph. One process only
(DDP's gradient hooks all-reduce inside backward). `benchmarks/check_fast_path_cuda.py` compares
losses and LoRA gradients with the eager path.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import attention
from ..config import ConfigError


def padded_inputs(batch: dict, backend: str, T: int, rows: int, pad_id: int) -> dict:
    """The batch on the host, padded to [rows, T] as a captured graph takes it, plus the attention inputs."""
    B, Tb = batch["input_ids"].shape
    if B != rows or Tb > T:
        raise ValueError(f"cuda_graphs: micro-batch of shape {B}x{Tb} does not fit the captured {rows}x{T}")
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    tgt = torch.full((B, T), -100, dtype=torch.long)
    pos = torch.arange(T - Tb).repeat(B, 1)  # the extra tail: a padding pseudo-example of its own
    pos = torch.cat([batch["position_ids"], pos], 1)
    ids[:, :Tb], tgt[:, :Tb] = batch["input_ids"], batch["targets"]
    sup = batch["sup_index"]
    sup = sup // Tb * T + sup % Tb  # row-major indices of the wider rows
    full_sup = torch.full((B * T,), B * T - 1, dtype=torch.long)  # the last position's target is -100
    full_sup[: sup.numel()] = sup
    out = {"input_ids": ids, "position_ids": pos, "targets": tgt, "sup_index": full_sup}
    if backend in attention.RAGGED:  # cudnn: the frontend's packed path (switches.py checks it is installed)
        cu = attention.packing_kwargs(pos, "varlen")["cu_seq_lens_q"]  # CPU: no device sync
        out["n_seqs"] = cu.numel() - 1
        out["cu"] = cu
        out["whole_rows"] = backend == "cudnn" and bool(batch.get("whole_rows"))
    elif backend == "sdpa":
        out["mask"] = attention.packing_kwargs(pos, "sdpa")["attention_mask"]
    else:
        raise ValueError(f"cuda_graphs needs attn_backend varlen, cudnn or sdpa, not {backend!r}")
    return out


class GraphedForwardBackward:
    """Drop-in for `train.forward_backward` that replays a captured CUDA graph."""

    def __init__(self, params: list, seq_len: int, rows: int, pad_id: int, dtype: torch.dtype,
                 loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor], say=print):
        self.params, self.T, self.B, self.pad_id, self.dtype, self.say = params, seq_len, rows, pad_id, dtype, say
        self.loss_fn = loss_fn
        self.graph, self.cap, self.grads = None, 0, None
        self.dense = None  # cudnn: whether the captured graph takes rows of one example each (dense attention)

    # ----------------------------------------------------------------- static inputs
    def _host_inputs(self, batch: dict, backend: str) -> dict:
        return padded_inputs(batch, backend, self.T, self.B, self.pad_id)

    def _allocate(self, host: dict, backend: str, device) -> None:
        self.static = {k: torch.empty_like(host[k], device=device)
                       for k in ("input_ids", "position_ids", "targets", "sup_index")}
        self.scale = torch.zeros((), dtype=torch.float32, device=device)
        if backend in attention.RAGGED:
            self.cap = max(16, 1 << (2 * host["n_seqs"] - 1).bit_length())  # room to grow before a recapture
            self.cu = torch.full((self.cap + 1,), self.B * self.T, dtype=torch.int32, device=device)
            self.attn = {"use_cache": False, "cu_seq_lens_q": self.cu, "cu_seq_lens_k": self.cu,
                         "max_length_q": self.T, "max_length_k": self.T}
            if backend == "cudnn":
                self.attn["whole_rows"] = bool(self.dense)
        else:
            self.mask = torch.empty_like(host["mask"], device=device)
            self.attn = {"use_cache": False, "attention_mask": self.mask}

    def _load(self, host: dict, scale: torch.Tensor) -> None:
        for k, buf in self.static.items():
            buf.copy_(host[k].pin_memory(), non_blocking=True)
        if "cu" in host:
            self.cu.fill_(self.B * self.T)
            self.cu[: host["cu"].numel()].copy_(host["cu"].pin_memory(), non_blocking=True)
        else:
            self.mask.copy_(host["mask"].pin_memory(), non_blocking=True)
        self.scale.copy_(scale)

    # ----------------------------------------------------------------- capture and replay
    def _run(self, token_loss) -> torch.Tensor:
        # the module's own forward, not accelerate's autocast wrapper (an instance attribute that shadows
        # the class's): autocast's cast cache must be off inside a capture
        wrapper = token_loss.__dict__.pop("forward", None)
        try:
            with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32, cache_enabled=False):
                loss = self.loss_fn(token_loss, {**self.static, **self.attn})
        finally:
            if wrapper is not None:
                token_loss.forward = wrapper
        (loss * self.scale).backward()
        return loss.detach()

    def _capture(self, token_loss) -> None:
        # a capture in the middle of an accumulation window (a recapture): the earlier micro-batches' gradients
        # live in .grad, which the warm-up adds to and the capture zeroes; they are put back after it
        earlier = [p.grad.detach().clone() if p.grad is not None else None for p in self.params]
        seed = token_loss.dropout_seed
        seed_before = seed.clone() if seed is not None else None
        # the warm-up runs on a side stream on purpose (as torch's capture recipe does): autograd's warning
        # that gradients accumulate on another stream than they were made on is expected here
        quiet = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
        if quiet is not None:
            quiet(False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: allocates .grad, caches, cuBLAS workspaces, Triton kernels
            for _ in range(2):
                self._run(token_loss)
        torch.cuda.current_stream().wait_stream(side)
        if seed is not None:
            seed.copy_(seed_before)
        with torch.no_grad():
            for p in self.params:
                p.grad.zero_()  # only .grad refers to it: autograd then accumulates in place
        self.grads = None
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.loss = self._run(token_loss)
        except RuntimeError as e:
            raise ConfigError(capture_error(e)) from None
        self.grads = [p.grad for p in self.params]
        with torch.no_grad():
            for g, e in zip(self.grads, earlier):
                if e is not None:
                    g.add_(e)  # add, not copy: the capture itself leaves them zero (kernels are recorded, not run)
        torch.cuda.synchronize()

    def __call__(self, accelerator, loss_model, batch: dict, backend: str, scale: torch.Tensor) -> torch.Tensor:
        token_loss = accelerator.unwrap_model(loss_model)
        host = self._host_inputs(batch, backend)
        whole = host.get("whole_rows", False)
        packed_now = self.dense and not whole  # dense rows captured, packed rows arrive
        if self.graph is None or host.get("n_seqs", 0) > self.cap or packed_now:
            if self.graph is not None:
                self.say(f"cuda_graphs: {host['n_seqs']} sequences in a micro-batch > {self.cap}: capturing again"
                         if not packed_now else "cuda_graphs: a micro-batch packs several examples in a row: "
                         "capturing again for packed rows")
                self.graph = None
                torch.cuda.empty_cache()
            self.dense = whole if self.dense is None else self.dense and whole
            self._allocate(host, backend, accelerator.device)
            self._load(host, scale)
            self._capture(token_loss)
        else:
            self._load(host, scale)
        if self.params[0].grad is None:  # first micro-batch of a window: train_step dropped the grads
            torch._foreach_zero_(self.grads)
            for p, g in zip(self.params, self.grads):
                p.grad = g
        self.graph.replay()
        return self.loss.clone()


def capture_error(e: BaseException) -> str:
    """The one line for a failed capture: out of GPU memory (often other processes on the same GPU) is told
    apart from a step that cannot be captured at all."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in first.lower():
        return (f"config key 'cuda_graphs': the GPU ran out of memory while capturing micro_batch_loss as a CUDA "
                f"graph ({first}); the capture needs its own memory pool: free the GPU (other processes on it?), "
                "lower micro_batch_size or recompute more layers, or set --cuda_graphs false")
    return (f"config key 'cuda_graphs': micro_batch_loss cannot be captured as a CUDA graph ({first}); a host "
            "sync (.item(), print of a tensor) or a data-dependent shape cannot run inside one: set --cuda_graphs false")
