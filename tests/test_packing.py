"""Packing, collation and the resumable sharded iterator (qlora/training/packing.py)."""

import random

import pytest
import torch

from qlora.data.examples import IGNORE, DataError, Example
from qlora.training.packing import Batches, DataState, collate, pack


def make_examples(n, seed=0, lo=3, hi=60):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        L = rng.randint(lo, hi)
        p = rng.randint(1, L - 1)
        ids = [rng.randint(3, 99) for _ in range(L)]
        out.append(Example(ids, [IGNORE] * p + ids[p:]))
    return out


def test_pack_is_exact_deterministic_and_tight():
    lengths = [random.Random(1).randint(1, 100) for _ in range(500)]
    rows = pack(lengths, 128, seed=3)
    assert rows == pack(lengths, 128, seed=3) and rows != pack(lengths, 128, seed=4)
    assert sorted(i for r in rows for i in r) == list(range(500))  # every example exactly once
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    lower_bound = -(-sum(lengths) // 128)
    assert len(rows) <= lower_bound * 1.05  # best-fit decreasing is within a few % of optimal here
    with pytest.raises(DataError, match=r"example 1 has 200 tokens, more than a row holds \(128 = max_seq_len\)"):
        pack([10, 200], 128, 0)


def test_collate_positions_targets_and_isolation():
    exs = make_examples(5)
    rows = [exs[:3], exs[3:]]
    b = collate(rows, pad_id=0)
    B, T = b["input_ids"].shape
    assert T % 8 == 0 and B == 2
    for r, row in enumerate(rows):
        t = 0
        for ex in row:
            n = len(ex.input_ids)
            assert b["input_ids"][r, t:t + n].tolist() == ex.input_ids
            assert b["position_ids"][r, t:t + n].tolist() == list(range(n))
            # target at position j is the label of token j+1 of the same example
            assert b["targets"][r, t:t + n - 1].tolist() == ex.labels[1:]
            assert b["targets"][r, t + n - 1].item() == IGNORE  # never predicts the next example's first token
            t += n
        assert (b["targets"][r, t:] == IGNORE).all() and b["position_ids"][r, t] == 0
    assert b["n_supervised"] == sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in exs)
    flat = b["targets"].flatten()
    assert torch.equal(flat[b["sup_index"]] != IGNORE, torch.ones(b["n_supervised"], dtype=torch.bool))


def rows_seen(batches, n):
    out = []
    for _ in range(n):
        b = batches.next()
        out += [tuple(r) for r in b["input_ids"].tolist()]
    return out


def test_ranks_split_the_global_batch_exactly():
    exs = make_examples(200)
    one = Batches(exs, 128, 4, 0, seed=0, world=1)
    two = [Batches(exs, 128, 2, 0, seed=0, rank=r, world=2) for r in range(2)]
    for _ in range(10):
        big = one.next()
        parts = [b.next() for b in two]
        T = max(p["input_ids"].shape[1] for p in parts + [big])
        got = [tuple(x.tolist()) for p in parts for x in collate_strip(p)]
        assert got == [tuple(x.tolist()) for x in collate_strip(big)]
        assert sum(p["n_supervised"] for p in parts) == big["n_supervised"]


def collate_strip(b):
    """Rows without their padding tail (micro-batches pad to their own longest row)."""
    return [row[: int((row != 0).nonzero().max()) + 1] for row in b["input_ids"]]


def test_resume_from_state_replays_the_same_sequence():
    exs = make_examples(120)
    a = Batches(exs, 100, 3, 0, seed=5)
    first = rows_seen(a, 7)
    state = DataState(a.state.epoch, a.state.index)
    rest = rows_seen(a, 40)  # crosses into later epochs
    b = Batches(exs, 100, 3, 0, seed=5)
    b.state = state
    assert rows_seen(b, 40) == rest
    assert a.state.epoch >= 1 and first


def test_epochs_are_reshuffled_and_unpacked_mode():
    exs = make_examples(60)
    a = Batches(exs, 100, 2, 0, seed=0)
    assert a.rows_for_epoch(0) != a.rows_for_epoch(1)
    u = Batches(exs, 100, 2, 0, seed=0, packing=False)
    assert all(len(r) == 1 for r in u.rows_for_epoch(0)) and 0 < u.efficiency() < a.efficiency() <= 1


def test_too_little_data_for_one_micro_batch_names_the_counts():
    exs = make_examples(3, lo=30, hi=40)  # 3 examples of <= 40 tokens: one packed row of 128, three padded rows
    with pytest.raises(DataError) as e:
        Batches(exs, 128, 2, 0, seed=0)
    assert str(e.value) == ("the training data (3 examples) fills 1 packed row(s) of max_seq_len 128, fewer than one "
                            "micro-batch of micro_batch_size 2 rows: lower --micro_batch_size to 1 or add data")
    with pytest.raises(DataError, match=r"fills 3 padded row\(s\) .* micro_batch_size 2 x 2 processes rows: lower "
                                        r"--micro_batch_size to 1 or add data"):
        Batches(exs, 128, 2, 0, seed=0, packing=False, world=2)
    with pytest.raises(DataError, match="fills 1 packed row.* x 2 processes rows: use fewer processes or add data"):
        Batches(exs, 128, 1, 0, seed=0, world=2)
    assert Batches(exs, 128, 1, 0, seed=0).micro_batches_per_epoch() == 1  # the largest that fits does run
    assert Batches(exs, 128, 3, 0, seed=0, packing=False).micro_batches_per_epoch() == 1
