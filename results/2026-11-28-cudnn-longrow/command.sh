#!/usr/bin/env bash
# On one GPU (run on an H100), with the GPU packages in .gpusite, from the repo root: OUT=$OUT bash results/2026-11-28-cudnn-longrow/command.sh
# One 32,768-token row (one example), dropout 0.05 seeded, paged 8-bit AdamW: flash (varlen) against
# attn_backend cudnn (dense cuDNN kernel for whole rows), eager, 20 of 32 layers recomputed and all
# recomputed; the earlier best setting (varlen + CUDA graphs, 20 recomputed) as the reference; then the kernel probe.
set -u
OUT=${OUT:-/tmp/longrow}
B="python3 benchmarks/bench.py --out $OUT --timeout 120 --no_plot --micro_batch 1 --accum 1 --warmup 1 --steps 3 --max_seq_len 32768 --seeded on"
$B --tag D --ckpt_layers=20 --attn varlen,cudnn
$B --tag D --ckpt_layers=20 --attn varlen --graphs on
$B --tag D --ckpt_layers=-1 --attn varlen,cudnn
timeout 70 python3 benchmarks/attn_probe.py --out "$OUT/probe" > "$OUT/probe.log" 2>&1
python3 - "$OUT/bench.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r.get("card"), r["attn"], "graphs" if r["graphs"] else "eager", r["ckpt_layers"], r["status"],
          round(r.get("tokens_per_s") or 0), round(r.get("peak_allocated_gib") or 0, 2), r.get("loss_first"), r.get("loss_last"))
PY
grep '^{' "$OUT/probe.log" | grep -v cudnn_ragged
