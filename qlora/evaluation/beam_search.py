"""Beam search for groups of prompts that share a long prefix: each prompt's `num_beams` best answers,
best first, with the shared prefix computed once per group (qlora.evaluation.shared_prefix's cache).

    from qlora.evaluation.beam_search import beam_grouped
    answers = beam_grouped(model, tokenizer, {"db1": [ids1, ids2]}, max_new_tokens=128, num_beams=4)
    # the arguments of qlora.evaluation.shared_prefix.generate_grouped, then num_beams
    answers["db1"][0]  # ids1's 4 answers, highest score first

The search is transformers' (`model.generate(num_beams=n, num_return_sequences=n)`, its default
`length_penalty=1.0` and `early_stopping=False`): at each step the 2n best (beam, token) continuations are
ranked by summed log-probability; one that ends (EOS, or the last allowed token) among the first n becomes
a finished answer scored by its sum over its length (EOS counted), the first n that do not end go on; a
prompt is done when it has n finished answers and its best running beam, scored the same way, cannot beat
the worst of them. tests/test_schema_decode.py checks the answers and their order against `generate`.

Batches hold `batch_size` prompts times `num_beams` rows over a static KV cache; when beams are
re-ranked only the cached tokens after the shared prefix are re-ordered (the prefix is the same in every
row), and a prompt that is done leaves the batch with its rows.
"""

from __future__ import annotations

import torch

from .shared_prefix import cache_kwarg, run_grouped

__all__ = ["beam_grouped"]

_NEG = -1.0e9  # the score of the placeholder beams before the first step (transformers uses the same)


def _step_prompt(state: dict, scores, tokens, beams, n: int, stops: frozenset, last: bool, gen_len: int) -> list:
    """One prompt's step: its 2n ranked (score, token, beam) candidates update `state` (finished answers
    and whether it can still improve); returns the n (beam, token, score) that go on (none when done)."""
    going = []
    for c, (s, t, b) in enumerate(zip(scores, tokens, beams)):
        if t in stops or last:
            if c < n and state["open"]:
                state["done"].append((s / gen_len, state["seqs"][b] + [t]))
        elif len(going) < n:
            going.append((b, t, s))
    state["done"] = sorted(state["done"], key=lambda d: -d[0])[:n]
    full = len(state["done"]) >= n
    state["open"] = state["open"] and not last and not (full and going[0][2] / gen_len <= state["done"][-1][0])
    return going if state["open"] else []


@torch.no_grad()
def _beam_batch(model, prefix_kv, plen: int, suffixes: list[list[int]], max_new_tokens: int, n: int, pad: int,
                stops: frozenset, device) -> list[list[list[int]]]:
    """The n best token lists (the stop token dropped) for each suffix after the cached prefix of length `plen`."""
    from transformers import StaticCache

    q, width = len(suffixes), max(len(s) for s in suffixes)
    total = plen + width + max_new_tokens
    cache = StaticCache(config=getattr(model, "config"), max_cache_len=total)
    for i, (k, v) in enumerate(prefix_kv):
        cache.update(k.expand(q * n, -1, -1, -1), v.expand(q * n, -1, -1, -1), i)
    rows = [s for s in suffixes for _ in range(n)]  # prompt j's beams are rows j*n .. j*n+n-1
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in rows], device=device)
    mask = torch.zeros(q * n, total, dtype=torch.long, device=device)
    mask[:, :plen] = 1
    for r, s in enumerate(rows):
        mask[r, plen + width - len(s):plen + width] = 1
    pos = torch.tensor([[plen] * (width - len(s)) + list(range(plen, plen + len(s))) for s in rows], device=device)
    sums = torch.tensor([0.0 if r % n == 0 else _NEG for r in range(q * n)], device=device)
    states = [{"seqs": [[] for _ in range(n)], "done": [], "open": True} for _ in suffixes]
    live = list(range(q))  # prompts in the batch, in row order
    kw = {cache_kwarg(model): cache}
    for step in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                       **kw).logits[:, -1].float()
        logp = torch.log_softmax(logits, dim=-1) + sums[:, None]
        vocab = logp.shape[-1]
        top_s, top_i = logp.view(len(live), n * vocab).topk(2 * n, dim=1)
        top_s, tok, beam = top_s.tolist(), (top_i % vocab).tolist(), (top_i // vocab).tolist()
        src, nxt, new_sums, still = [], [], [], []
        for j, p in enumerate(live):
            going = _step_prompt(states[p], top_s[j], tok[j], beam[j], n, stops, step == max_new_tokens - 1, step + 1)
            if not going:
                continue
            states[p]["seqs"] = [states[p]["seqs"][b] + [t] for b, t, _ in going]
            src += [j * n + b for b, _, _ in going]
            nxt += [t for _, t, _ in going]
            new_sums += [s for _, _, s in going]
            still.append(p)
        if not still:
            break
        sel = torch.tensor(src, device=device)
        end = plen + width + step  # cached positions so far
        if len(still) == len(live):  # same prompts: re-order only what follows the shared prefix
            for layer in cache.layers:
                layer.keys[:, :, plen:end] = layer.keys[sel, :, plen:end]
                layer.values[:, :, plen:end] = layer.values[sel, :, plen:end]
        else:  # prompts that are done leave the batch with their rows
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[sel], layer.values[sel]
            mask, pos = mask[sel], pos[sel]
        live = still
        sums = torch.tensor(new_sums, device=device)
        ids = torch.tensor(nxt, device=device)[:, None]
        mask[:, end] = 1
        pos = pos[:, -1:] + 1
    return [[[t for t in seq if t not in stops] for _, seq in st["done"]] for st in states]


def beam_grouped(model, tokenizer, groups: dict, max_new_tokens: int, batch_size: int = 8, progress=None,
                 num_beams: int = 4) -> dict:
    """{group: [prompt ids, ...]} -> {group: [[answer text, ...num_beams, best first], ...]} (decoded
    without special tokens, stripped, as qlora.evaluation.generation.generate_ids). `batch_size` prompts run at once
    (times `num_beams` rows), longest first; `progress(n)` is called after each batch with its size."""
    def run(prefix_kv, plen, suffixes, pad, stops, device):
        beams = _beam_batch(model, prefix_kv, plen, suffixes, max_new_tokens, num_beams, pad, stops, device)
        return [[tokenizer.decode(s, skip_special_tokens=True).strip() for s in seqs] for seqs in beams]

    return run_grouped(model, tokenizer, groups, batch_size, progress, run)
