#!/usr/bin/env bash
# 4-bit vs 16-bit LoRA on Spider, several seeds, every lane on the GPU(s) of one host, from the repo root:
#   SPIDER=../shared/data/spider MODEL=smollm2 OUT=/tmp/parity bash benchmarks/spider_parity.sh
#   python benchmarks/spider_table.py /tmp/parity        # the parity table (mean, seed spread, CIs)
# Variants (train.py with configs/spider.yaml, one epoch: 310 steps of 8 rows of 1,024 tokens, lr 1e-3,
# LoRA r8 on all 7 projections, dropout 0), each with SEEDS:
#   lora16   --quant none                     16-bit base, peft's LoRA forward
#   nf4      --fused_lora false               NF4 + double quant, peft's LoRA forward, eager
#   fastest  --cuda_graphs true               NF4, the fused NF4+LoRA node, one CUDA graph per micro-batch
#   fp8      --base_fp8 true                  NF4, the fused node, the base GEMMs in float8 e4m3
# Then every adapter (and the base) is scored on Spider dev with schema-aware decoding, whose report also
# holds the plain greedy column (`plain`). Lanes run JOBS at a time per GPU (default 4). Measured on one H100
# (80 GB) with all 12 lanes at once: each training took ~300 s (one lane alone on an H200: ~90 s), 2 of the 3
# CUDA-graph lanes ran out of memory at capture, and no lane finished scoring within 540 s; so keep JOBS low
# and T long (alone, scoring one adapter greedily took 164 s on an H200). Scoring runs the dequantised bf16
# base (--dequantize true: the NF4 values, fast matmuls), the same for every variant.
# Outputs in $OUT: <variant>_s<seed>_spider_dev.json, base_spider_dev.json, <lane>.log.jsonl, <lane>.config.yaml,
# logs.tgz. A lane that runs past T seconds is stopped and has no report.
set -u
SPIDER=${SPIDER:-../shared/data/spider}
MODEL=${MODEL:-smollm2}
OUT=${OUT:-/tmp/parity}
SEEDS=${SEEDS:-1 2 3}
VARIANTS=${VARIANTS:-lora16 nf4 fastest fp8}
T=${T:-1200}           # seconds per lane (training + scoring)
JOBS=${JOBS:-4}        # lanes at once per GPU
BS=${BS:-128}          # generation batch size
BEAMS=${BEAMS:-4}
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
for v in JOBS T BS BEAMS; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "error: $v=${!v} is not a positive whole number: set $v=4 (or another count)" >&2; exit 2; }
done
for f in dev.json train_spider.json database; do
  [[ -e "$SPIDER/$f" ]] || { echo "error: $SPIDER/$f not found: set SPIDER to the Spider 1.0 folder (dev.json, train_spider.json, database/)" >&2; exit 2; }
done
(( NGPU > 0 )) || { echo "error: no GPU found (nvidia-smi -L lists none): set NGPU or run on a GPU host" >&2; exit 2; }
declare -A OVER=([lora16]="--quant none" [nf4]="--fused_lora false" [fastest]="--cuda_graphs true" [fp8]="--base_fp8 true")
for v in $VARIANTS; do
  [[ -n "${OVER[$v]:-}" ]] || { echo "error: unknown variant '$v' in VARIANTS (known: ${!OVER[*]})" >&2; exit 2; }
done
mkdir -p "$OUT"
W=$(mktemp -d /tmp/spider_parity.XXXX)
DEV="$SPIDER/dev.json:spider"
COMMON="--config configs/spider.yaml --model $MODEL --datasets $SPIDER/train_spider.json:spider --tracker none
 --save_every 0 --eval_every 0 --micro_batch_size 8 --grad_accum 1 --max_steps 310 --lr 1e-3 --warmup_steps 10"
score() {  # score NAME evaluate-args...
  local name=$1; shift
  python -m qlora.evaluate "$@" --data "$DEV" --batch_size "$BS" --max_new_tokens 128 --progress false \
    --decoding schema --num_beams "$BEAMS" --dequantize true --out "$OUT/${name}_spider_dev.json"
}
lane() {  # lane NAME OVERRIDES
  local name=$1 over=$2
  echo "== train $name: $over"
  /usr/bin/time -f "train wall %e s" python train.py $COMMON $over --output_dir "$W/$name" || return 1
  cp "$W/$name/log.jsonl" "$OUT/$name.log.jsonl"
  cp "$W/$name/final/config.yaml" "$OUT/$name.config.yaml" 2>/dev/null
  local t0=$SECONDS
  echo "== score $name"; score "$name" --adapter "$W/$name/final"; local rc=$?
  echo "score wall $(( SECONDS - t0 )) s"; return $rc
}
# The GGUF is converted once before the lanes start (each would otherwise do it at the same time).
python -c "from qlora.model.base import resolve_source; print('base:', resolve_source('$MODEL'))" || exit 1
export -f lane score
export OUT MODEL DEV BS BEAMS COMMON W OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
pids=(); i=0
( export CUDA_VISIBLE_DEVICES=0; timeout -k 10 "$T" bash -c 'score base --model "$MODEL"' > "$OUT/base.log" 2>&1
  echo "exit $?" >> "$OUT/base.log" ) &
pids+=($!)
for seed in $SEEDS; do
  for v in $VARIANTS; do
    name="${v}_s${seed}"
    ( export CUDA_VISIBLE_DEVICES=$(( i % NGPU ))
      timeout -k 10 "$T" bash -c 'lane "$0" "$1"' "$name" "${OVER[$v]} --seed $seed" > "$OUT/$name.log" 2>&1
      echo "exit $?" >> "$OUT/$name.log" ) &
    pids+=($!); i=$(( i + 1 ))
    while (( $(jobs -rp | wc -l) >= JOBS * NGPU + 1 )); do wait -n; done   # +1: the base's scoring
  done
done
wait
grep -H -E "^(== |spider:|train wall|score wall|exit|error)" "$OUT"/*.log
tar -czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls *.log *.log.jsonl *.config.yaml 2>/dev/null)
