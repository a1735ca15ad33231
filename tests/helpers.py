"""Test helpers shared by several test files (and benchmarks/check_fast_path_cuda.py, fp8_probe.py): LoRA
weights with values, the gradients a window of micro-batches gives, a fixed dropout mask that the fused
node and peft's dropout module can both draw, so the two paths compare with dropout on, a 4-bit weight
built from a tensor, and the supervised text of an encoded example."""

from __future__ import annotations

import json

import torch

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
