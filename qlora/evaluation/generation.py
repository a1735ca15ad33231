"""Prompt encoding and batched generation shared by generate.py, train.py's end-of-run samples and
qlora.evaluation.evaluate.

    from qlora.evaluation.generation import prompt_ids, generate_ids
    ids = [prompt_ids(tokenizer, "How many rows?", cfg.system_prompt)]
    print(generate_ids(model, tokenizer, ids, max_new_tokens=64, device=device)[0])
"""

from __future__ import annotations

import torch

from ..speed.attention import use_default_attention
from ..data.examples import _render, stop_ids

__all__ = ["prompt_ids", "generate_ids"]


def prompt_ids(tokenizer, question: str, system_prompt: str = "") -> list[int]:
    """The training chat format for one user turn, ending where the answer starts.

    The (optional) system prompt and the user turn go through the same renderer as training
    (`qlora.data.examples._render`: the tokenizer's chat template, or the Llama-2 `[INST]` format without one)
    with the generation prompt appended; a BOS is prepended when the tokenizer adds one, so the ids are
    token for token what a training example holds before its first supervised token."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
               [{"role": "user", "content": question}]
    text = _render(tokenizer, messages, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id:
        ids = [tokenizer.bos_token_id] + ids
    return ids


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, device,
                 temperature: float = 0.0, top_p: float = 1.0) -> list[str]:
    """Generate for a batch of tokenised prompts; returns the decoded answers (special tokens dropped,
    stripped), in prompt order. An answer ends at EOS or at the token that closes an assistant turn
    (`qlora.data.examples.stop_ids`).

    Prompts are left-padded with the tokenizer's pad token (masked out) and decoded with a KV cache,
    greedily unless `temperature > 0` (then sampling with `top_p`). The model's attention is switched
    back to plain sdpa first (packed-training attention has no KV-cache path); a model in training mode
    is put back into training mode afterwards."""
    was_training = model.training
    model.eval()
    use_default_attention(model, "sdpa")  # packed-training attention has no KV-cache path
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, use_cache=True,
              pad_token_id=pad, eos_token_id=sorted(stop_ids(tokenizer)))
    if temperature > 0:
        kw.update(temperature=temperature, top_p=top_p)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    if was_training:
        model.train()
    return [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
