"""Greedy generation for groups of prompts that share a long prefix, computing that prefix once.

Text-to-SQL prompts over one database are mostly the same tokens (system turn + schema); only the question
differs. Spider dev has 972 scorable prompts over 19 databases, ~400 tokens each, of which ~35 differ: the
prefill is ~8x less work when each database's shared prefix goes through the model once, and its KV cache
is copied into every batch of that database's questions.

    from qlora.evaluation.shared_prefix import generate_grouped
    answers = generate_grouped(model, tokenizer, {"db1": [ids1, ids2], "db2": [ids3]}, max_new_tokens=128)

A batch is [shared prefix (cached)] [left padding] [question tokens]: the padding is masked out and the
question tokens get the positions they would have without it, so each answer is what qlora.evaluation.generation's
generate_ids gives for the same prompt alone (tests/test_spider.py checks token equality). A sequence that
has produced EOS leaves the batch at once (its cache rows are dropped), so a batch costs what its longest
answer costs, not max_new_tokens.
"""

from __future__ import annotations

import inspect

import torch

from ..data.examples import stop_ids
from ..speed.attention import use_default_attention

__all__ = ["cache_kwarg", "common_prefix_len", "generate_grouped"]


def cache_kwarg(model) -> str:
    """The name under which this model's forward takes a KV cache: `cache` in newer transformers (5.24),
    `past_key_values` in older ones (5.17, the GPU image's). The old name given to a new model (or the
    reverse) lands in **kwargs and is ignored without an error: every decode step would then see one
    token and no context."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


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
    """The prefix's keys and values, one (1, heads, len, dim) pair per layer ([] for an empty prefix)."""
    from transformers import DynamicCache

    if not prefix:
        return []
    cache = DynamicCache()
    ids = torch.tensor([prefix], device=device)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
          **{cache_kwarg(model): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.no_grad()
def _generate_batch(model, prefix_kv, plen: int, suffixes: list[list[int]], max_new_tokens: int, pad: int,
                    stops: frozenset, device) -> list[list[int]]:
    """Greedy tokens for each suffix after the cached prefix of length `plen`.

    The cache is static (written in place): a growing cache re-copies every layer's keys and values at
    each step, which measured as half of a decode step on a CPU."""
    from transformers import StaticCache

    n, width = len(suffixes), max(len(s) for s in suffixes)
    total = plen + width + max_new_tokens
    cache = StaticCache(config=getattr(model, "config"), max_cache_len=total)
    for i, (k, v) in enumerate(prefix_kv):
        cache.update(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), i)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in suffixes], device=device)
    # the mask spans the whole static cache: prefix, padding (0), question, then each answer token as it comes
    mask = torch.zeros(n, total, dtype=torch.long, device=device)
    mask[:, :plen] = 1
    for row, s in enumerate(suffixes):
        mask[row, plen + width - len(s):plen + width] = 1
    # positions continue from the prefix as if there were no padding (the pads' own positions are unused)
    pos = torch.tensor([[plen] * (width - len(s)) + list(range(plen, plen + len(s))) for s in suffixes],
                       device=device)
    live = list(range(n))  # row of the running batch -> index into suffixes
    out: list[list[int]] = [[] for _ in suffixes]
    kw = {cache_kwarg(model): cache}
    for step in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                       **kw).logits[:, -1]
        nxt = logits.argmax(-1).tolist()
        keep = [row for row, tok in enumerate(nxt) if tok not in stops]
        for row in keep:
            out[live[row]].append(nxt[row])
        if not keep:
            break
        if len(keep) < len(live):  # finished sequences leave the batch
            sel = torch.tensor(keep, device=device)
            for layer in cache.layers:  # (a static layer has no batch_select_indices)
                layer.keys, layer.values = layer.keys[sel], layer.values[sel]
            mask, pos = mask[sel], pos[sel]
            live = [live[r] for r in keep]
            nxt = [nxt[r] for r in keep]
        ids = torch.tensor(nxt, device=device)[:, None]
        mask[:, plen + width + step] = 1
        pos = pos[:, -1:] + 1
    return out


def generate_grouped(model, tokenizer, groups: dict, max_new_tokens: int, batch_size: int = 16,
                     progress=None) -> dict:
    """Greedy answers for {group: [prompt ids, ...]} -> {group: [answer text, ...]} (decoded without special
    tokens, stripped, as generate_ids). Within a group the shared prefix is computed once; its prompts run
    in batches of `batch_size`, longest first. `progress(n)` is called after each batch with its size."""
    def run(prefix_kv, plen, suffixes, pad, stops, device):
        toks = _generate_batch(model, prefix_kv, plen, suffixes, max_new_tokens, pad, stops, device)
        return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in toks]

    return run_grouped(model, tokenizer, groups, batch_size, progress, run)


def run_grouped(model, tokenizer, groups: dict, batch_size: int, progress, run_batch) -> dict:
    """{group: [prompt ids, ...]} -> {group: [run_batch's answer per prompt, ...]}: per group the shared
    prefix's KV cache is computed once, then `run_batch(prefix_kv, prefix_len, suffixes, pad, stops, device)`
    answers its prompts `batch_size` at a time, longest first (greedy here, beams in qlora.evaluation.beam_search)."""
    was_training = model.training
    model.eval()
    use_default_attention(model, "sdpa")  # packed-training attention has no KV-cache path
    device = next(model.parameters()).device
    pad, stops = tokenizer.pad_token_id, stop_ids(tokenizer)  # EOS and the turn closer
    answers = {}
    try:
        for key, prompts in groups.items():
            plen = common_prefix_len(prompts)
            prefix_kv = _prefix_cache(model, prompts[0][:plen], device)
            order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
            texts: list = [None] * len(prompts)
            for k in range(0, len(order), batch_size):
                idx = order[k:k + batch_size]
                for i, answer in zip(idx, run_batch(prefix_kv, plen, [prompts[i][plen:] for i in idx], pad, stops,
                                                    device)):
                    texts[i] = answer
                if progress:
                    progress(len(idx))
            answers[key] = texts
    finally:
        if was_training:
            model.train()
    return answers
