"""Hold out a part of Spider train to choose between prompt and training variants, never Spider dev.

    python benchmarks/spider_split.py ../shared/data/spider/train_spider.json /tmp/split --holdout_dbs 14
    python train.py --config configs/spider.yaml --datasets /tmp/split/train.json:spider_linked ...
    python -m qlora.evaluate --adapter RUN/final --data /tmp/split/holdout.json:spider_linked --out holdout.json

Like dev, the held-out rows are over databases that training never sees: `--holdout_dbs` databases (those
whose file exists), drawn with `--seed`, give all their rows to `holdout.json`; every other row goes to
`train.json`. Beside the two files, `database` links to the original database folder, so both files read
as Spider sources (qlora.data.spider.database_path). Prints one line with the counts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def split(rows: list[dict], db_ids: list[str], holdout_dbs: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): the rows of `holdout_dbs` of `db_ids` (sorted, then drawn with `seed`) are held out."""
    if not 0 < holdout_dbs < len(db_ids):
        raise ValueError(f"--holdout_dbs must be between 1 and {len(db_ids) - 1} (there are {len(db_ids)} databases)")
    held = set(random.Random(seed).sample(sorted(db_ids), holdout_dbs))
    return [r for r in rows if r["db_id"] not in held], [r for r in rows if r["db_id"] in held]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("train", help="Spider train json (its database/ folder beside it)")
    ap.add_argument("out", help="folder for train.json, holdout.json and the database link")
    ap.add_argument("--holdout_dbs", type=int, default=14, help="databases held out (dev has 20)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    src = Path(args.train)
    try:
        rows = json.loads(src.read_text())
    except (OSError, ValueError) as e:
        print(f"error: {src}: cannot read it as a Spider json list ({e})", file=sys.stderr)
        return 2
    base = src.parent / "database"
    present = sorted({r["db_id"] for r in rows if (base / r["db_id"] / f"{r['db_id']}.sqlite").is_file()})
    try:
        train, held = split([r for r in rows if r["db_id"] in present], present, args.holdout_dbs, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(train))
    (out / "holdout.json").write_text(json.dumps(held))
    link = out / "database"
    if not link.exists():
        link.symlink_to(base.resolve(), target_is_directory=True)
    print(f"{len(train)} train rows over {len(present) - args.holdout_dbs} databases, {len(held)} held-out rows over "
          f"{args.holdout_dbs} ({', '.join(sorted({r['db_id'] for r in held}))}); "
          f"{len(rows) - len(train) - len(held)} rows without a database left out -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
