#!/usr/bin/env bash
# Single-GPU speed measurements on one 4-GPU host, run as four independent lanes, one per GPU of a
# 4-GPU host (each lane sees one card: CUDA_VISIBLE_DEVICES). Every comparison (ours vs the seed
# recipe, before vs after a lever) sits inside one lane, so it is on one card in one run.
#
#   OUT=/tmp/perf bash benchmarks/perf_lanes.sh            # needs 4 GPUs; LANES="0 2" runs only those
#
# Lane 0: the CUDA equivalence check, then the seed's 512-token setting (2 x 2): seed recipe, ours
#         eager, ours with seeded dropout + CUDA graphs.
# Lane 1: 2048-token rows, dropout 0.05: seed recipe 4 x 2, ours eager 4 x 2 (22 layers recomputed),
#         ours with seeded dropout + CUDA graphs (1 x 8 nothing recomputed; 2 x 4 with 5 recomputed).
# Lane 2: 2048-token rows, dropout 0 with graphs; then the loop's own speed: bench.py on guanaco's
#         length distribution and train.py on real guanaco rows (random:llama2-7b:49152, SmolLM2
#         tokenizer from .tok, data from .gpudata), same setting.
# Lane 3: long rows: one 32,768-token row (eager, all layers recomputed; seeded + graphs with 20 of
#         32 recomputed), then one 131,072-token row with offloaded checkpoints.
# Outputs in $OUT: bench.jsonl (all lanes), bench.csv, bench.png, check.txt, train_log.jsonl, logs.tgz.
set -u
OUT=${OUT:-/tmp/perf}
mkdir -p "$OUT"
LANES=${LANES:-"0 1 2 3"}
W="--timeout 240 --warmup 2 --steps 3 --no_plot"

lane0() {
  timeout 300 python3 benchmarks/check_fast_path_cuda.py > "$OUT/check.txt" 2>&1
  local B="python3 benchmarks/bench.py --out $OUT/l0 $W --max_seq_len 512 --micro_batch_size 2 --grad_accum 2"
  $B --tag S --baseline_only
  $B --tag S --recompute_layers=14
  $B --tag S --recompute_layers=14,10 --seeded_dropout on --cuda_graphs on
}

lane1() {
  local B="python3 benchmarks/bench.py --out $OUT/l1 $W --max_seq_len 2048"
  $B --tag L --micro_batch_size 4 --grad_accum 2 --baseline_only
  $B --tag L --micro_batch_size 4 --grad_accum 2 --recompute_layers=22
  $B --tag L --micro_batch_size 1 --grad_accum 8 --recompute off --seeded_dropout on --cuda_graphs on
  $B --tag L --micro_batch_size 2 --grad_accum 4 --recompute_layers=5 --seeded_dropout on --cuda_graphs on
}

lane2() {
  local B="python3 benchmarks/bench.py --out $OUT/l2 $W --max_seq_len 2048"
  $B --tag L0 --micro_batch_size 1 --grad_accum 8 --recompute off --cuda_graphs on --lora_dropout 0
  $B --tag L0 --micro_batch_size 2 --grad_accum 4 --recompute_layers=4 --cuda_graphs on --lora_dropout 0
  $B --tag T --data guanaco --model random:llama2-7b:49152 --micro_batch_size 1 --grad_accum 8 --recompute off --seeded_dropout on --cuda_graphs on
  python3 train.py --model random:llama2-7b:49152 --tokenizer .tok --datasets .gpudata/guanaco-llama2-1k.parquet:guanaco \
    --max_seq_len 2048 --micro_batch_size 1 --grad_accum 8 --recompute false --seeded_dropout true \
    --cuda_graphs true --max_steps 12 --warmup_steps 2 --eval_fraction 0 --save_every 0 --sample_prompts 0 \
    --tracker none --output_dir "$OUT/l2/train"
}

lane3() {
  local B="python3 benchmarks/bench.py --out $OUT/l3 --timeout 420 --no_plot --micro_batch_size 1 --grad_accum 1"
  $B --tag R --max_seq_len 32768 --warmup 1 --steps 3
  $B --tag R --max_seq_len 32768 --warmup 1 --steps 3 --recompute_layers=20 --seeded_dropout on --cuda_graphs on
  $B --tag R --max_seq_len 131072 --warmup 1 --steps 1 --offload_recompute on --seeded_dropout on
}

for n in $LANES; do
  (export CUDA_VISIBLE_DEVICES=$n PYTHONUNBUFFERED=1; export -f "lane$n"; export OUT W
   timeout "${LANE_TIMEOUT:-540}" bash -c "lane$n" > "$OUT/lane$n.log" 2>&1) &
done
wait
cat "$OUT"/l?/bench.jsonl > "$OUT/bench.jsonl" 2>/dev/null
python3 benchmarks/bench.py --plot_only --out "$OUT" > /dev/null 2>&1
[ -f "$OUT/l2/train/log.jsonl" ] && cp "$OUT/l2/train/log.jsonl" "$OUT/train_log.jsonl"
(cd "$OUT" && tar czf logs.tgz lane*.log l? && rm -rf lane*.log l?)
python3 - "$OUT/bench.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    tps = f"{r['tokens_per_s']:>8,.0f}" if r.get("status") == "ok" else f"{r.get('status'):>8}"
    mem = r.get("peak_allocated_gib") or 0
    print(f"{r.get('tag', ''):<3} {r['impl']:<8} {r.get('label', ''):<48} {tps} tok/s  {mem:6.2f} GiB")
EOF
