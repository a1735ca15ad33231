#!/usr/bin/env bash
# Several-GPU figures (issue 6) on one host with >= 2 GPUs, from the repo root:
#   OUT=/tmp/mg bash benchmarks/multi_gpu.sh
# 1. one GPU, micro-batch 4 x accumulation 2, vs 2. DDP on 2 GPUs, micro-batch 4 x 1 per rank: the same
#    global batch (8 rows of 2048 tokens), the same data order, so the same loss curve is expected
#    (dropout 0: no per-rank masks); tokens/s of both gives the 1 -> 2 GPU scaling.
# 3. FSDP2 on 2 GPUs (configs/accelerate/fsdp.yaml): the 4-bit base sharded (bf16 quant storage),
#    torch AdamW; per-rank memory after setup vs run 1. 4. the same for a Llama-2-13B shape.
# The model is a random Llama of the real shape with SmolLM2's 49,152-token vocab so that it can
# train on the built-in SQL data tokenised by SmolLM2's tokenizer (.tok/smollm2, copied from the
# converted embedded model: ~/.cache/qlora/SmolLM2-*/tokenizer*). Nothing is downloaded.
set -u
OUT=${OUT:-/tmp/multi_gpu}
STEPS=${STEPS:-20}
ACCUM=${ACCUM:-1}      # micro-batches per step per rank on 2 GPUs; the 1-GPU run does twice as many
RUNS=${RUNS:-"gpu1 ddp2 fsdp2 fsdp2-13b"}
mkdir -p "$OUT"
COMMON="train.py --model random:llama2-7b:49152 --tokenizer .tok/smollm2 --datasets builtin:sql --max_seq_len 2048
 --micro_batch_size 4 --checkpoint_layers 21 --lora_dropout 0 --lr 2e-4 --warmup_steps 2 --max_steps $STEPS
 --eval_every 0 --eval_batches 1 --sample_prompts 0 --save_every 0 --log_every 1 --tracker none"
run() {
  local name=$1; shift
  [[ " $RUNS " == *" $name "* ]] || return 0
  echo "=== $name: $*"
  timeout "${T:-200}" "$@" > "$OUT/$name.txt" 2>&1
  echo "exit $?"
  grep -E "^model:|memory:|step +[0-9]+ \||eval +[0-9]+|rror" "$OUT/$name.txt" | grep -v Warning | tail -6
  cp "/tmp/$name/log.jsonl" "$OUT/$name.log.jsonl" 2>/dev/null
}
run gpu1 accelerate launch --config_file configs/accelerate/single_gpu.yaml $COMMON --grad_accum $((2 * ACCUM)) \
  --output_dir /tmp/gpu1
run ddp2 accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 $COMMON --grad_accum $ACCUM \
  --output_dir /tmp/ddp2
run fsdp2 accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 $COMMON --grad_accum 1 \
  --quant_storage bfloat16 --optimizer adamw --output_dir /tmp/fsdp2
run fsdp2-13b accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 $COMMON --grad_accum 1 \
  --quant_storage bfloat16 --optimizer adamw --model random:llama2-13b:49152 --micro_batch_size 2 \
  --checkpoint_layers -1 --max_steps 6 --output_dir /tmp/fsdp2-13b
ls /tmp/fsdp2/final /tmp/ddp2/final 2>/dev/null | head -8
