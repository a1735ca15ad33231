"""Test helpers shared by several test files (and benchmarks/check_fast_path_cuda.py, fp8_probe.py): LoRA
weights with values, the gradients a window of micro-batches gives, a fixed dropout mask that the fused
node and peft's dropout module can both draw, so the two paths compare with dropout on, a 4-bit weight
built from a tensor, and the supervised text of an encoded example."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from qlora.speed import attention
from qlora.data.examples import IGNORE
from qlora.training.loss import supervised_logits


def with_logits_term(seam, c: float = 0.01):
    """README "Changing the loop", the loss-term recipe: train.py's `micro_batch_loss` (`seam`) plus
    c * mean(logits**2) per supervised position, summed like the cross-entropy (train_step divides by the
    window's supervised tokens, so the term is the same however the window is split into micro-batches)."""
    def micro_batch_loss(loss_model, inputs):
        loss = seam(loss_model, inputs)
        logits, real = supervised_logits(loss_model)
        return loss + c * (logits.pow(2).mean(-1) * real).sum()
    return micro_batch_loss


def supervised_text(tok, ex) -> str:
    """The text at an example's supervised positions, decoded from its input ids (where the label is not
    IGNORE); also checks that each supervised label is the token at its own position."""
    ids = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    assert ids == [label for label in ex.labels if label != IGNORE], "a supervised label is not its own token"
    return tok.decode(ids, skip_special_tokens=False)


def lora_params(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def randomise_lora_(model, seed: int = 0) -> None:
    """LoRA B starts at zero (so A gets no gradient); give every adapter weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_params(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def grads_of(loss_model, batches, backend) -> dict:
    """LoRA gradients of the token-mean loss over `batches` (one accumulation window)."""
    model = loss_model.model
    model.zero_grad(set_to_none=True)
    n_sup = sum(b["n_supervised"] for b in batches)
    for b in batches:
        kw = attention.packing_kwargs(b["position_ids"], backend)
        loss_sum = loss_model(b["input_ids"], b["position_ids"], b["targets"], b["sup_index"], **kw)
        (loss_sum / n_sup).backward()
    return {n: p.grad.clone() for n, p in lora_params(model).items()}


# --- dropout on both sides: one deterministic mask that both the fused node (via `dropout`) and peft's
# dropout module (replaced by `FixedMaskDropout`) draw, so the two paths can be compared with dropout on

def fixed_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A fixed keep-mask dropping ~p of the elements, from the flat index (the same for any shape)."""
    idx = torch.arange(x.numel(), device=x.device).reshape(x.shape)
    return (idx * 7919 + 13) % 97 >= int(round(97 * p))


def fixed_mask_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for `dropout` with `fixed_keep_mask`."""
    keep = fixed_keep_mask(x, p)
    return x * keep / (1 - p), keep


class FixedMaskDropout(torch.nn.Module):
    """Drop-in for peft's `lora_dropout` module with `fixed_keep_mask`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return fixed_mask_dropout(x, self.p)[0]


def nf4_weight(w: torch.Tensor) -> torch.nn.Parameter:
    """`w` as the frozen 4-bit weight a bitsandbytes Linear4bit holds: NF4, double quant, blocks of 64, on
    w's device, its quant_state attached."""
    import bitsandbytes.functional as bnbf

    q, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    weight = torch.nn.Parameter(q, requires_grad=False)
    weight.quant_state = qs
    return weight


def small_tokenizer(tok, n: int = 1024):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    """The first `n` tokens of the SmolLM2 tokenizer (its specials, bytes and first merges), still byte-level
    BPE with the chat template: a GGUF's vocabulary is parsed token by token by every reader (seconds for
    49,152 tokens), so the tiny model gets a tiny vocabulary."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < n}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if all(p in vocab for p in m) and "".join(m) in vocab]
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < n]
    small = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=tok.bos_token,
                                    eos_token=tok.eos_token, unk_token=tok.unk_token, pad_token=tok.pad_token,
                                    chat_template=tok.chat_template)
    small.padding_side = "right"
    return small


class FakeFrontend:
    """`cudnn.sdpa_torch`'s contract (nvidia-cudnn-frontend 1.32, cudnn/sdpa/fwd/torch_op.py) computed on the CPU:
    dense [B, H, S, D] tensors, or packed [N, H, D] tokens split by `cu_seqlens_*` (prefix sums; trailing empty
    sequences allowed, as a captured graph pads them); fewer K/V heads serve groups of query heads; causal
    from the top left; `window_left` >= 0 keeps only the keys less than that many positions back (the band's
    left bound; measured on the real kernel by benchmarks/cudnn_fe_probe.py, where window_size's meaning,
    at most that many back, failed)."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _attend(q, k, v, scale, window_left):  # [H, S, D]
        i = torch.arange(q.shape[1])
        mask = i[:, None] >= i[None, :]
        if window_left >= 0:
            mask &= (i[:, None] - i[None, :]) < window_left
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def __call__(self, q, k, v, *, scale=None, is_causal=False, window_left=-1, cu_seqlens_q=None,
                 cu_seqlens_kv=None, max_seqlen_q=0, max_seqlen_kv=0, return_lse=False):
        assert is_causal and return_lse  # the autograd path needs the forward's statistics
        if cu_seqlens_q is None:
            assert q.dim() == 4
            self.calls.append(("dense", q.shape[1] != k.shape[1], window_left))
            o = torch.stack([self._attend(q[b], k[b], v[b], scale, window_left) for b in range(q.shape[0])])
            return o, torch.zeros(q.shape[:3])
        assert q.dim() == 3 and cu_seqlens_kv is cu_seqlens_q and cu_seqlens_q.dtype == torch.int32
        cu = cu_seqlens_q.tolist()
        assert cu[-1] == q.shape[0] and max_seqlen_q == max_seqlen_kv >= max(b - a for a, b in zip(cu, cu[1:]))
        self.calls.append(("packed", len(cu) - 1, window_left))
        parts = [self._attend(*(x[a:b].transpose(0, 1) for x in (q, k, v)), scale, window_left).transpose(0, 1)
                 for a, b in zip(cu, cu[1:]) if b > a]
        return torch.cat(parts), torch.zeros(q.shape[:2])


def run_interpreted(*args: str, with_stderr: bool = False) -> str:
    """Run `python ARGS...` (e.g. "-c", SCRIPT, or a benchmarks/ script and its options) from the repository root in
    a fresh interpreter with TRITON_INTERPRET=1, so the project's Triton kernels run on the CPU in Triton's
    interpreter (it is chosen when a kernel is defined, hence the fresh process); the root and tests/ are on its
    path. Asserts it succeeded; returns its stdout (followed by its stderr `with_stderr`)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout + (run.stderr if with_stderr else "")


def interpreted_json(script: str) -> list:
    """`run_interpreted("-c", script)`'s last printed line, parsed as JSON."""
    return json.loads(run_interpreted("-c", script).strip().splitlines()[-1])
