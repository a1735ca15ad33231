#!/usr/bin/env bash
# Several-GPU figures on one host, from the repo root (needs bitsandbytes, peft, accelerate, transformers,
# and the tokenizer folder .tok/smollm2: a copy of ~/.cache/qlora/SmolLM2-*/tokenizer* and config.json):
#   OUT=/tmp/mg bash benchmarks/multi_gpu.sh                       # every run the GPUs allow
#   OUT=/tmp/mg RUNS="ddp2 fsdp2" bash benchmarks/multi_gpu.sh     # some of them
# Runs (a run needing more GPUs than the host has is skipped and listed as such):
#   ddp2, fsdp2     2 GPUs, Llama-2-7B shape, paged 8-bit AdamW, 4 x 2048-token rows per rank, 8 global
#                   rows, STEPS (20) steps: tokens/s and the loss curve of FSDP2 against DDP (same rows)
#   gpu1, ddp4, fsdp4   1 -> 4 GPUs at the same global batch: 4 GPUs 4 rows x accum SCALE_ACCUM (4) each,
#                   1 GPU 4 rows x accum 4*SCALE_ACCUM (16 x 4 = 64 rows with the default),
#                   SCALE_STEPS (8) steps: speed-up and loss curve against 1 GPU
#   fsdp4-70b       Llama-2-70B shape under FSDP2 on 4 GPUs, 1 x 2048 per rank, every layer recomputed,
#                   BIG_STEPS (6) steps: per-GPU peak memory, tokens/s, load time
#   fsdp2-70b       the same on 2 GPUs (stretch; not in the default list)
#   fsdp4-70b-whole fsdp4-70b with --fsdp_low_memory_load false: every rank holds the whole 4-bit model on
#                   its GPU before sharding (the peak the low-memory load removes; not in the default list)
# Models are random Llama shapes with SmolLM2's 49,152-token vocab, trained on the built-in SQL data (or
# DATA) tokenised by SmolLM2's tokenizer; nothing is downloaded. Every run has its own timeout (T, BIG_T
# seconds), so one failure does not take the rest down. Logs go to $OUT/runs.tgz (refreshed after each
# run, so a run cut short still leaves what finished), the table to $OUT/summary.md (+ summary.json).
# Load time = seconds from the launch to the "model:" line (data + model built) and to the "memory:"
# line (sharded, optimizer made). Per-GPU peak = nvidia-smi's memory.used sampled every 0.5 s (CUDA
# context and allocator cache included) and rank 0's allocator peak from the log.
set -u
OUT=${OUT:-/tmp/multi_gpu}
STEPS=${STEPS:-20}
SCALE_STEPS=${SCALE_STEPS:-8}
SCALE_ACCUM=${SCALE_ACCUM:-4}
DATA=${DATA:-builtin:sql}  # e.g. .gpudata/guanaco-llama2-1k.parquet:guanaco (220 rows of 2048: 64-row steps stay in one epoch longer)
BIG_STEPS=${BIG_STEPS:-6}
T=${T:-170}
BIG_T=${BIG_T:-420}
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
RUNS=${RUNS:-"ddp2 fsdp2 gpu1 ddp4 fsdp4 fsdp4-70b"}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
W=$(mktemp -d /tmp/multi_gpu.XXXX)   # output_dirs and logs; $OUT gets a tarball (8 files at most come back)
mkdir -p "$OUT"
echo "host: $NGPU GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c | xargs)"

COMMON="train.py --tokenizer .tok/smollm2 --datasets $DATA --max_seq_len 2048 --lora_dropout 0 --lr 2e-4
 --warmup_steps 2 --eval_every 0 --eval_batches 1 --sample_prompts 0 --save_every 0 --log_every 1 --tracker none
 --optimizer paged_adamw_8bit"
M7B="--model random:llama2-7b:49152 --recompute_layers 21 --micro_batch_size 4"
M70B="--model random:llama2-70b:49152 --recompute_layers -1 --micro_batch_size 1 --max_steps $BIG_STEPS"
FSDP="--quant_storage bfloat16 --compute_dtype bfloat16"
launch() {  # launch NAME GPUS args...: accelerate launch with the config for that many GPUs
  local n=$1; shift
  case $1 in
    ddp) shift; echo accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes "$n" "$@" ;;
    fsdp) shift; echo accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes "$n" "$@" ;;
    one) shift; echo accelerate launch --config_file configs/accelerate/single_gpu.yaml "$@" ;;
  esac
}
stamp() { python3 -u -c 'import sys, time
for line in sys.stdin: sys.stdout.write(f"{time.time():.1f} {line}"); sys.stdout.flush()'; }

run() {  # run NAME GPUS TIMEOUT command...
  local name=$1 need=$2 limit=$3; shift 3
  [[ " $RUNS " == *" $name "* ]] || return 0
  if (( need > NGPU )); then echo "=== $name: skipped (needs $need GPUs, host has $NGPU)"; echo "$name skipped: needs $need GPUs" >> "$W/skipped.txt"; return 0; fi
  echo "=== $name ($need GPU, timeout ${limit}s): $*"
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$W/$name.smi" 2>/dev/null &
  local smi=$!
  python3 -c "import time; print(f'{time.time():.1f} START')" > "$W/$name.txt"
  timeout -k 20 "$limit" "$@" --output_dir "$W/$name" 2>&1 | stamp >> "$W/$name.txt"
  local rc=${PIPESTATUS[0]}
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  echo "exit $rc" | tee -a "$W/$name.txt"
  if (( rc != 0 )); then  # leave no rank of a failed run holding a GPU for the next one
    for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    sleep 3
  fi
  grep -E " (model:|memory:|step +[0-9]+ \||error|Error)" "$W/$name.txt" | grep -v Warning | tail -4
  cp "$W/$name/log.jsonl" "$W/$name.log.jsonl" 2>/dev/null
  tar -czf "$OUT/runs.tgz" -C "$W" $(cd "$W" && ls *.txt *.smi *.log.jsonl 2>/dev/null)
}

run ddp2 2 "$T" $(launch 2 ddp $COMMON $M7B --grad_accum 1 --max_steps $STEPS)
run fsdp2 2 "$T" $(launch 2 fsdp $COMMON $M7B $FSDP --grad_accum 1 --max_steps $STEPS)
run gpu1 1 "$T" $(launch 1 one $COMMON $M7B --grad_accum $((4 * SCALE_ACCUM)) --max_steps $SCALE_STEPS)
run ddp4 4 "$T" $(launch 4 ddp $COMMON $M7B --grad_accum $SCALE_ACCUM --max_steps $SCALE_STEPS)
run fsdp4 4 "$T" $(launch 4 fsdp $COMMON $M7B $FSDP --grad_accum $SCALE_ACCUM --max_steps $SCALE_STEPS)
run fsdp4-70b 4 "$BIG_T" $(launch 4 fsdp $COMMON $M70B $FSDP --grad_accum 1)
run fsdp4-70b-whole 4 "$BIG_T" $(launch 4 fsdp $COMMON $M70B $FSDP --grad_accum 1 --fsdp_low_memory_load false)
run fsdp2-70b 2 "$BIG_T" $(launch 2 fsdp $COMMON $M70B $FSDP --grad_accum 1)

python3 benchmarks/multi_gpu_summary.py "$W" "$OUT"
tar -czf "$OUT/runs.tgz" -C "$W" $(cd "$W" && ls *.txt *.smi *.log.jsonl 2>/dev/null)
cat "$OUT/summary.md"
