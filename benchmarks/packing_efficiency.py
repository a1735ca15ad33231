"""Packing efficiency (real tokens / row capacity) of a dataset at several row lengths.

    python benchmarks/packing_efficiency.py ../shared/data/guanaco-llama2-1k.parquet --lengths 2048 4096

Compares best-fit-decreasing packing with one-example-per-row padding (padded to the longest row
of each micro-batch, as a dynamic-padding collator does). Uses the embedded SmolLM2 tokenizer unless
--tokenizer is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora.config import load_config  # noqa: E402
from qlora.data.examples import load_datasets  # noqa: E402
from qlora.model.base import load_tokenizer  # noqa: E402
from qlora.training.packing import Batches, collate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="dataset source, as in --datasets (path[:formatter] or hub id)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--tokenizer", default="")
    args = ap.parse_args(argv)
    cfg = load_config([], tokenizer=args.tokenizer)
    tok = load_tokenizer(cfg)
    print(f"{'max_seq_len':>11} {'examples':>8} {'dropped':>7} {'packed rows':>11} {'packed eff':>10} "
          f"{'padded eff':>10} {'sup tok/row':>11}")
    for L in args.lengths:
        train, _, stats = load_datasets([args.source], tok, L, "drop", 0.0, seed=0)
        packed = Batches(train, L, args.micro_batch_size, tok.pad_token_id, seed=0, packing=True)
        rows = packed.rows_for_epoch(0)
        padded = Batches(train, L, args.micro_batch_size, tok.pad_token_id, seed=0, packing=False)
        prow = padded.rows_for_epoch(0)
        used = cap = 0
        for k in range(0, len(prow), args.micro_batch_size):
            b = collate([[train[i] for i in r] for r in prow[k:k + args.micro_batch_size]], tok.pad_token_id)
            used, cap = used + b["n_tokens"], cap + b["input_ids"].numel()
        sup = sum(e.n_supervised for e in train) / max(1, len(rows))
        print(f"{L:>11} {len(train):>8} {stats.dropped_overlong:>7} {len(rows):>11} {packed.efficiency():>10.1%} "
              f"{used / cap:>10.1%} {sup:>11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
