# Llama-3-8B shape: ours (rebuild_inputs off/on at several recompute counts, bf16 and base_fp8) then Unsloth, same call
set -x
t0=$(date +%s)
tar xzf .unsloth/site.tgz -C /tmp
mkdir -p /tmp/ours/site && for d in bitsandbytes bitsandbytes-0.50.2.dist-info liger_kernel liger_kernel-0.8.5.dist-info; do ln -s /tmp/site/$d /tmp/ours/site/$d; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
O=$OUT/l3; mkdir -p $O
B="python benchmarks/bench.py --model random:llama3-8b --max_seq_len 2048 --warmup 2 --steps 4 --lora_dropout 0 --micro_batch_size 2 --grad_accum 4 --cuda_graphs on --no_plot --timeout 110 --out $O"
( export PYTHONPATH=/tmp/ours/site HF_HUB_OFFLINE=1
  $B --recompute_layers=14 --rebuild_inputs off 2>&1 | grep "\[bench\] ours" 
  $B --recompute_layers=14,6,4,2 --rebuild_inputs on 2>&1 | grep "\[bench\] ours"
  $B --recompute_layers=4 --rebuild_inputs on --base_fp8 on 2>&1 | grep "\[bench\] ours" )
echo "ours done at $(( $(date +%s) - t0 )) s"
( export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
  timeout 80 python3 .unsloth/anchor.py prepare /tmp/l3 llama hidden_size=4096 intermediate_size=14336 num_hidden_layers=32 \
    num_attention_heads=32 num_key_value_heads=8 vocab_size=128256 rope_theta=500000.0 max_position_embeddings=8192 2>&1 | tail -1
  CKPT=true STEPS=4 WARM=1 timeout 120 python3 .unsloth/anchor.py run /tmp/l3 0 2,1,2048 2>&1 | tail -2 ) | tee $OUT/unsloth_l3.txt
echo "all done at $(( $(date +%s) - t0 )) s"
