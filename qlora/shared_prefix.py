"""Greedy generation for groups of prompts that share a long prefix, computing that prefix once.

Text-to-SQL prompts over one database are mostly the same tokens (system turn + schema); only the question
differs. Spider dev has 972 scorable prompts over 19 databases, ~400 tokens each, of which ~35 differ: the
prefill is ~8x less work when each database's shared prefix goes through the model once, and its KV cache
is copied into every batch of that database's questions.

    from qlora.shared_prefix import generate_grouped
    answers = generate_grouped(model, tokenizer, {"db1": [ids1, ids2], "db2": [ids3]}, max_new_tokens=128)

A batch is [shared prefix (cached)] [left padding] [question tokens]: the padding is masked out and the
question tokens get the positions they would have without it, so each answer is what qlora.generation's
generate_ids gives for the same prompt alone (tests/test_spider.py checks token equality). A sequence that
has produced EOS leaves the batch at once (its cache rows are dropped), so a batch costs what its longest
answer costs, not max_new_tokens.
"""

from __future__ import annotations

import copy

import torch

__all__ = ["common_prefix_len", "generate_grouped"]


def common_prefix_len(prompts: list[list[int]]) -> int:
    """Length of the longest token prefix shared by all `prompts`, less one: every prompt keeps at least
    one token of its own to feed after the cached prefix (its first answer token comes from that)."""
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return min(n, shortest - 1)


@torch.no_grad()
def _prefix_cache(model, prefix: list[int], device):
    from transformers import DynamicCache

    cache = DynamicCache()
    if prefix:
        ids = torch.tensor([prefix], device=device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True,
              logits_to_keep=1)
    return cache


@torch.no_grad()
def _generate_batch(model, cache, plen: int, suffixes: list[list[int]], max_new_tokens: int, pad: int, eos: int,
                    device) -> list[list[int]]:
    """Greedy tokens for each suffix after the cached prefix of length `plen` (batch-1 cache, copied)."""
    n, width = len(suffixes), max(len(s) for s in suffixes)
    cache = copy.deepcopy(cache)
    if plen:
        cache.batch_repeat_interleave(n)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in suffixes], device=device)
    mask = torch.tensor([[1] * plen + [0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=device)
    # positions continue from the prefix as if there were no padding (the pads' own positions are unused)
    pos = torch.tensor([[plen] * (width - len(s)) + list(range(plen, plen + len(s))) for s in suffixes],
                       device=device)
    live = list(range(n))  # row of the running batch -> index into suffixes
    out: list[list[int]] = [[] for _ in suffixes]
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        nxt = logits.argmax(-1).tolist()
        keep = []
        for row, tok in enumerate(nxt):
            if tok == eos:
                continue
            out[live[row]].append(tok)
            keep.append(row)
        if not keep:
            break
        if len(keep) < len(live):  # finished sequences leave the batch
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, pos = mask[sel], pos[sel]
            live = [live[r] for r in keep]
            nxt = [nxt[r] for r in keep]
        ids = torch.tensor(nxt, device=device)[:, None]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        pos = pos[:, -1:] + 1
    return out


def generate_grouped(model, tokenizer, groups: dict, max_new_tokens: int, batch_size: int = 16,
                     progress=None) -> dict:
    """Greedy answers for {group: [prompt ids, ...]} -> {group: [answer text, ...]} (decoded without special
    tokens, stripped, as generate_ids). Within a group the shared prefix is computed once; its prompts run
    in batches of `batch_size`, longest first. `progress(n)` is called after each batch with its size."""
    from .attention import use_default_attention

    was_training = model.training
    model.eval()
    use_default_attention(model, "sdpa")  # packed-training attention has no KV-cache path
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    answers = {}
    try:
        for key, prompts in groups.items():
            plen = common_prefix_len(prompts)
            cache = _prefix_cache(model, prompts[0][:plen], device)
            order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
            texts: list[str | None] = [None] * len(prompts)
            for k in range(0, len(order), batch_size):
                idx = order[k:k + batch_size]
                toks = _generate_batch(model, cache, plen, [prompts[i][plen:] for i in idx], max_new_tokens,
                                       pad, eos, device)
                for i, t in zip(idx, toks):
                    texts[i] = tokenizer.decode(t, skip_special_tokens=True).strip()
                if progress:
                    progress(len(idx))
            answers[key] = texts
    finally:
        if was_training:
            model.train()
    return answers
