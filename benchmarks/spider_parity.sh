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
# Then every adapter (and the base) is scored on Spider dev with DECODING=schema (default; its report also
# holds the plain greedy column, `plain`) or DECODING=greedy. Lanes run JOBS at a time per GPU (default 4). Measured on one H100
# (80 GB): with 7 lanes at once a training took 290-360 s, with 12 at once 370-430 s (one lane alone on an H200:
# ~90 s), and greedy scoring of one adapter (BS=256) ~245 s with 12 at once; 13 processes with CUDA-graph
# capture once ran out of memory. T is per lane, and lanes start in waves of JOBS: the whole sweep takes about
# (lanes / JOBS) x T, so on a machine with a time limit run it twice or more (it goes on where it stopped).
# Scoring runs the dequantised bf16 base (--dequantize true: the NF4 values, fast matmuls), the same for every variant.
# Outputs in $OUT: <variant>_s<seed>_spider_dev.json, base_spider_dev.json, <lane>.log.jsonl, <lane>.config.yaml,
# sweep.tgz (all of these in one file). Adapters are kept in $RUNS (default $OUT/runs). Run the same command
# again to go on: a lane whose report exists is skipped, a lane whose adapter exists is only scored, and a training stopped by the lane's
# T-second limit (SIGTERM: train.py writes a checkpoint) resumes from its checkpoint (--resume auto).
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
DECODING=${DECODING:-schema}   # schema (its report also holds the greedy column) or greedy
BASE=${BASE:-1}        # 0: leave the base model unscored (a run that only adds seeds or variants)
RUNS=${RUNS:-$OUT/runs}
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
for v in JOBS T BS BEAMS; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "error: $v=${!v} is not a positive whole number: set $v=4 (or another count)" >&2; exit 2; }
done
for f in dev.json train_spider.json database; do
  [[ -e "$SPIDER/$f" ]] || { echo "error: $SPIDER/$f not found: set SPIDER to the Spider 1.0 folder (dev.json, train_spider.json, database/)" >&2; exit 2; }
done
[[ "$BASE" == 0 || "$BASE" == 1 ]] || { echo "error: BASE=$BASE: set BASE=1 (score the base model) or BASE=0" >&2; exit 2; }
[[ "$DECODING" == schema || "$DECODING" == greedy ]] || { echo "error: DECODING=$DECODING: set DECODING=schema or DECODING=greedy" >&2; exit 2; }
(( NGPU > 0 )) || { echo "error: no GPU found (nvidia-smi -L lists none): set NGPU or run on a GPU host" >&2; exit 2; }
declare -A OVER=([lora16]="--quant none" [nf4]="--fused_lora false" [fastest]="--cuda_graphs true" [fp8]="--base_fp8 true")
for v in $VARIANTS; do
  [[ -n "${OVER[$v]:-}" ]] || { echo "error: unknown variant '$v' in VARIANTS (known: ${!OVER[*]})" >&2; exit 2; }
done
mkdir -p "$OUT" "$RUNS"
W=$RUNS
DEV="$SPIDER/dev.json:spider"
COMMON="--config configs/spider.yaml --model $MODEL --datasets $SPIDER/train_spider.json:spider --tracker none
 --save_every 0 --eval_every 0 --micro_batch_size 8 --grad_accum 1 --max_steps 310 --lr 1e-3 --warmup_steps 10"
score() {  # score NAME evaluate-args...
  local name=$1; shift
  [[ -f "$OUT/${name}_spider_dev.json" ]] && { echo "== $name: report exists, skipped"; return 0; }
  python -m qlora.evaluate "$@" --data "$DEV" --batch_size "$BS" --max_new_tokens 128 --progress false \
    --decoding "$DECODING" --num_beams "$BEAMS" --dequantize true --out "$OUT/${name}_spider_dev.json"
}
lane() {  # lane NAME OVERRIDES
  local name=$1 over=$2
  if [[ ! -f "$W/$name/final/adapter_model.safetensors" ]]; then
    compgen -G "$W/$name/checkpoint-*/meta.json" > /dev/null || rm -rf "$W/$name"   # a run stopped before its first checkpoint starts over
    echo "== train $name: $over"
    /usr/bin/time -f "train wall %e s" python train.py $COMMON $over --output_dir "$W/$name" --resume auto || return 1
  fi
  cp "$W/$name/log.jsonl" "$OUT/$name.log.jsonl" 2>/dev/null
  cp "$W/$name/final/config.yaml" "$OUT/$name.config.yaml" 2>/dev/null
  local t0=$SECONDS
  echo "== score $name"; score "$name" --adapter "$W/$name/final"; local rc=$?
  echo "score wall $(( SECONDS - t0 )) s"; return $rc
}
# The GGUF is converted once before the lanes start (each would otherwise do it at the same time).
python -c "from qlora.model.base import resolve_source; print('base:', resolve_source('$MODEL'))" || exit 1
export -f lane score
export OUT MODEL DEV BS BEAMS DECODING COMMON W OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
pids=(); i=0
(( BASE )) && ( export CUDA_VISIBLE_DEVICES=0; timeout -k 10 "$T" bash -c 'score base --model "$MODEL"' >> "$OUT/base.log" 2>&1
  echo "exit $?" >> "$OUT/base.log" ) &
for seed in $SEEDS; do
  for v in $VARIANTS; do
    name="${v}_s${seed}"
    ( export CUDA_VISIBLE_DEVICES=$(( i % NGPU ))
      timeout -k 10 "$T" bash -c 'lane "$0" "$1"' "$name" "${OVER[$v]} --seed $seed" >> "$OUT/$name.log" 2>&1
      echo "exit $?" >> "$OUT/$name.log" ) &
    pids+=($!); i=$(( i + 1 ))
    while (( $(jobs -rp | wc -l) >= JOBS * NGPU + 1 )); do wait -n; done   # +1: the base's scoring
  done
done
wait
grep -H -E "^(== |spider:|train wall|score wall|exit|error)" "$OUT"/*.log
tar -czf "$OUT/sweep.tgz" -C "$OUT" $(cd "$OUT" && ls *.log *.log.jsonl *.config.yaml *_spider_dev.json 2>/dev/null)
