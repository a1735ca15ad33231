"""Packing examples into fixed-capacity rows, collating rows into micro-batches, and a resumable,
rank-sharded iterator over them.

A row holds whole examples (never split across rows). Per row, `position_ids` restart at 0 for
every example, and `targets[t]` is the token to predict at position t: the next token when it is a
supervised token of the *same* example, else -100. So no position ever learns to predict the first
token of the next example, and the loss needs no shifting or host-side masking.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from ..speed import attention
from ..data.examples import IGNORE, DataError, Example

PAD_MULTIPLE = 8  # pad row length to a multiple of 8 for tensor-core friendly shapes


def pack(lengths: list[int], capacity: int, seed: int, buffer: int = 2048) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into rows of `capacity` tokens.

    Works over shuffled buffers of `buffer` examples so that a row's examples are a random draw, not
    all long or all short; deterministic for `seed`. Returns rows as lists of example indices.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    for start in range(0, len(order), buffer):
        chunk = sorted(order[start:start + buffer], key=lambda i: (-lengths[i], i))
        free: list[tuple[int, int]] = []  # (remaining capacity, row id), sorted
        local: list[list[int]] = []
        for i in chunk:
            n = lengths[i]
            if n > capacity:
                raise DataError(f"example {i} has {n} tokens, more than a row holds ({capacity} = max_seq_len): "
                                "drop or truncate long examples first (--overlong), or raise --max_seq_len")
            k = bisect.bisect_left(free, (n, -1))  # tightest row that still fits
            if k < len(free):
                room, rid = free.pop(k)
                local[rid].append(i)
                bisect.insort(free, (room - n, rid))
            else:
                local.append([i])
                bisect.insort(free, (capacity - n, len(local) - 1))
        rows += local
    random.Random(seed + 1).shuffle(rows)
    return rows


def unpacked_rows(n: int, seed: int) -> list[list[int]]:
    """One example per row, shuffled (packing off: rows are padded instead)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [[i] for i in order]


def collate(rows: list[list[Example]], pad_id: int, length: int | None = None) -> dict:
    """Micro-batch tensors: input_ids, targets, position_ids [B, T], seq_lens, `sup_index` (flat indices
    of supervised positions, so the loss gathers them without a host sync), and `whole_rows` (no row
    holds more than one example: attention needs no packing mask, `qlora.speed.attention`'s cudnn backend)."""
    used = [sum(len(e.input_ids) for e in row) for row in rows]
    T = length or -(-max(used) // PAD_MULTIPLE) * PAD_MULTIPLE
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    seq_lens = []
    for b, row in enumerate(rows):
        t, lens = 0, []
        for ex in row:
            n = len(ex.input_ids)
            input_ids[b, t:t + n] = torch.tensor(ex.input_ids)
            targets[b, t:t + n - 1] = torch.tensor(ex.labels[1:])
            position_ids[b, t:t + n] = torch.arange(n)
            lens.append(n)
            t += n
        if t < T:  # the padding tail is its own pseudo-example, so it never joins a real one
            position_ids[b, t:] = torch.arange(T - t)
            lens.append(T - t)
        seq_lens.append(lens)
    sup_index = (targets.view(-1) != IGNORE).nonzero().squeeze(1)
    return {"input_ids": input_ids, "targets": targets, "position_ids": position_ids,
            "seq_lens": seq_lens, "sup_index": sup_index, "n_tokens": sum(used), "capacity": B * T,
            "n_supervised": int(sup_index.numel()), "whole_rows": all(len(row) <= 1 for row in rows)}


@dataclass
class DataState:
    """Where the iterator is: enough to resume exactly (epoch, micro-batches of it already consumed)."""
    epoch: int = 0
    index: int = 0


class Batches:
    """Micro-batches for one rank, epoch after epoch, resumable from a `DataState`.

    Each epoch repacks with seed + epoch. Rows are cut to a multiple of world * micro_batch_size
    and every global micro-batch of world * micro_batch_size rows is split into one slice per rank,
    so N ranks x b rows see exactly the rows of 1 rank x N*b.
    """

    def __init__(self, examples: list[Example], max_seq_len: int, micro_batch_size: int, pad_id: int,
                 seed: int, packing: bool = True, rank: int = 0, world: int = 1):
        self.examples, self.max_seq_len, self.mbs = examples, max_seq_len, micro_batch_size
        self.pad_id, self.seed, self.packing, self.rank, self.world = pad_id, seed, packing, rank, world
        self.state = DataState()
        self._epoch_cache: tuple[int, list] | None = None
        n_rows = len(self._all_rows(0))
        if n_rows < world * micro_batch_size:
            procs = f" x {world} processes" if world > 1 else ""
            fix = (f"lower --micro_batch_size to {n_rows // world} or add data" if n_rows >= world
                   else "use fewer processes or add data")
            raise DataError(f"the training data ({len(examples)} examples) fills {n_rows} "
                            f"{'packed' if packing else 'padded'} row(s) of max_seq_len {max_seq_len}, fewer than one "
                            f"micro-batch of micro_batch_size {micro_batch_size}{procs} rows: {fix}")

    def _all_rows(self, epoch: int) -> list[list[int]]:
        seed = self.seed + 1000 * epoch
        lengths = [len(e.input_ids) for e in self.examples]
        return pack(lengths, self.max_seq_len, seed) if self.packing else unpacked_rows(len(lengths), seed)

    def rows_for_epoch(self, epoch: int) -> list[list[int]]:
        rows = self._all_rows(epoch)
        g = self.world * self.mbs
        return rows[: len(rows) // g * g]

    def _epoch(self, epoch: int) -> list:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, self.rows_for_epoch(epoch))
        return self._epoch_cache[1]

    def micro_batches_per_epoch(self) -> int:
        return len(self._epoch(self.state.epoch)) // (self.world * self.mbs)

    def efficiency(self, epoch: int = 0) -> float:
        """Real tokens / row capacity over an epoch (for packing, capacity = rows x max_seq_len)."""
        rows = self._epoch(epoch)
        used = sum(len(self.examples[i].input_ids) for r in rows for i in r)
        return used / max(1, len(rows) * self.max_seq_len)

    def next(self) -> dict:
        """The next micro-batch of this rank; advances the state."""
        rows = self._epoch(self.state.epoch)
        g = self.world * self.mbs
        if self.state.index * g >= len(rows):
            self.state = DataState(self.state.epoch + 1, 0)
            rows = self._epoch(self.state.epoch)
        start = self.state.index * g + self.rank * self.mbs
        mine = [[self.examples[i] for i in row] for row in rows[start:start + self.mbs]]
        self.state = DataState(self.state.epoch, self.state.index + 1)
        return collate(mine, self.pad_id)


def eval_batches(examples: list[Example], max_seq_len: int, micro_batch_size: int, pad_id: int,
                 packing: bool = True) -> list[dict]:
    """Fixed, unshuffled-by-epoch eval micro-batches (packed the same way as training)."""
    lengths = [len(e.input_ids) for e in examples]
    rows = pack(lengths, max_seq_len, seed=0) if packing else [[i] for i in range(len(examples))]
    return [collate([[examples[i] for i in r] for r in rows[k:k + micro_batch_size]], pad_id)
            for k in range(0, len(rows), micro_batch_size)]


MODEL_INPUTS = ("input_ids", "position_ids", "targets", "sup_index")


def to_device(batch: dict, device: torch.device) -> dict:
    """The tensors the loss module takes, copied to `device` (pinned + non-blocking on CUDA)."""
    if device.type != "cuda":
        return {k: batch[k] for k in MODEL_INPUTS}
    return {k: batch[k].pin_memory().to(device, non_blocking=True) for k in MODEL_INPUTS}


def model_inputs(batch: dict, backend: str, device: torch.device) -> dict:
    """A collated micro-batch as the loss module (and train.py's `micro_batch_loss`) takes it: its
    tensors on `device` plus the packed-attention inputs of `backend`."""
    return {**to_device(batch, device), **attention.batch_kwargs(batch, backend, device)}
