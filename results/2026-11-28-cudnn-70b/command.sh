#!/usr/bin/env bash
# On one 4-GPU host (run on 4 x H200), with the GPU packages in .gpusite and the tokenizer in .tok, from the repo root:
#   OUT=$OUT bash results/2026-11-28-cudnn-70b/command.sh
# Phase 1, four single-GPU lanes at once (each lane one card; every comparison inside one lane):
#   lane 0: benchmarks/attn_probe.py (attention kernels alone: time and error against flash)
#   lane 1: 2048-token rows, dropout 0.05, 2 x 4, 5 of 32 recomputed, seeded + graphs: varlen vs cudnn
#   lane 2: 2048-token rows, dropout 0, 2 x 4, 4 recomputed, graphs: varlen vs cudnn
#   lane 3: one 32,768-token row, 20 of 32 recomputed, seeded + graphs: varlen vs cudnn
# Phase 2, all four GPUs: the Llama-2-70B shape under FSDP2 with the low-memory load (default), the
# same with the whole-model load, and the low-memory load on 2 GPUs.
set -u
OUT=${OUT:-/tmp/call}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
W="--timeout 200 --warmup 2 --steps 3 --no_plot"
lane0() { timeout 150 python3 benchmarks/attn_probe.py --out "$OUT/l0"; }
lane1() { python3 benchmarks/bench.py --out "$OUT/l1" $W --max_seq_len 2048 --micro_batch 2 --accum 4 --ckpt_layers=5 \
            --seeded on --graphs on --attn varlen,cudnn --tag C; }
lane2() { python3 benchmarks/bench.py --out "$OUT/l2" $W --max_seq_len 2048 --micro_batch 2 --accum 4 --ckpt_layers=4 \
            --graphs on --lora_dropout 0 --attn varlen,cudnn --tag C0; }
lane3() { python3 benchmarks/bench.py --out "$OUT/l3" --timeout 200 --no_plot --micro_batch 1 --accum 1 --warmup 1 \
            --steps 3 --max_seq_len 32768 --ckpt_layers=20 --seeded on --graphs on --attn varlen,cudnn --tag CR; }
for n in 0 1 2 3; do
  (export CUDA_VISIBLE_DEVICES=$n; export -f "lane$n"; export OUT W
   timeout "${LANE_TIMEOUT:-270}" bash -c "lane$n" > "$OUT/lane$n.log" 2>&1) &
done
wait
cat "$OUT"/l*/bench.jsonl > "$OUT/bench.jsonl" 2>/dev/null
cp "$OUT/l0/attn_probe.json" "$OUT/attn_probe.json" 2>/dev/null
for n in 0 1 2 3; do echo "== lane $n"; grep -E '^\{|tok/s|error|Error' "$OUT/lane$n.log" | tail -8; done
OUT=$OUT/70b BIG_T=${BIG_T:-150} RUNS="fsdp4-70b fsdp4-70b-whole fsdp2-70b" bash benchmarks/multi_gpu.sh 2>&1 | tail -14
tar -czf "$OUT/lanes.tgz" -C "$OUT" $(cd "$OUT" && ls lane*.log l*/*.csv l*/*.log 2>/dev/null)
rm -rf "$OUT"/l0 "$OUT"/l1 "$OUT"/l2 "$OUT"/l3 "$OUT"/lane*.log
