"""Run train.py or qlora.evaluation.evaluate with N sample rows of each table in every Spider prompt.

`qlora.data.spider.SAMPLE_ROWS` (default 0) is how many rows of each table the `spider` formatter puts under
its CREATE TABLE line. This wrapper sets it for one run, so the same train/evaluate commands can be
compared with and without sample rows (README, "Spider: real text-to-SQL"). From the repo root:

    python benchmarks/spider_sample_rows.py 1 train.py --config configs/spider.yaml --output_dir runs/rows1
    python benchmarks/spider_sample_rows.py 1 -m qlora.evaluate --adapter runs/rows1/final --data DEV:spider
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qlora.data.spider  # noqa: E402

if __name__ == "__main__":
    qlora.data.spider.SAMPLE_ROWS = int(sys.argv[1])
    target, rest = sys.argv[2], sys.argv[3:]
    if target == "-m":
        sys.argv = [rest[0], *rest[1:]]
        runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *rest]
        runpy.run_path(target, run_name="__main__")
