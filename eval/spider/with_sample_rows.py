"""Run train.py or qlora.evaluate with N sample rows of each table in every Spider prompt (the comparison
behind qlora.spider.SAMPLE_ROWS; README, "Spider"):

    python eval/spider/with_sample_rows.py 1 train.py --config configs/spider.yaml --output_dir runs/rows1
    python eval/spider/with_sample_rows.py 1 -m qlora.evaluate --adapter runs/rows1/final --data DEV:spider
"""

import runpy
import sys

import qlora.spider

if __name__ == "__main__":
    qlora.spider.SAMPLE_ROWS = int(sys.argv[1])
    target, rest = sys.argv[2], sys.argv[3:]
    if target == "-m":
        sys.argv = [rest[0], *rest[1:]]
        runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *rest]
        runpy.run_path(target, run_name="__main__")
