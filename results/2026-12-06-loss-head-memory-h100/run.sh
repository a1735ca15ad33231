#!/usr/bin/env bash
# loss head memory on the GPU, alone on the card (before any training starts)
cd /tmp/repo; export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
mkdir -p /tmp/lm
for s in "llama3_8b 128256 4096" "qwen25_7b 152064 3584" "gemma3_4b 262208 2560"; do
  set -- $s
  echo "== $1 default" >> /tmp/lm/console.log
  python benchmarks/loss_memory.py --device cuda --dtype bfloat16 --vocab $2 --hidden $3 --positions 4096 --kinds plain,fused,liger --reps 5 --out /tmp/lm/$1 >> /tmp/lm/console.log 2>&1
  for c in 26 24; do
    echo "== $1 chunk 2^$c" >> /tmp/lm/console.log
    python benchmarks/loss_memory.py --device cuda --dtype bfloat16 --vocab $2 --hidden $3 --positions 4096 --kinds fused --reps 5 --chunk_elements $((1<<c)) --out /tmp/lm/${1}_c$c >> /tmp/lm/console.log 2>&1
  done
done
touch /tmp/lm/DONE
