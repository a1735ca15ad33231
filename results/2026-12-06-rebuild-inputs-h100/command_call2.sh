# Llama-3-8B (no recompute, profiled), Mistral-7B, Qwen2.5-7B: ours (rebuild_inputs) then Unsloth; Gemma 3 4B ours; fast-path check
t0=$(date +%s)
tar xzf .unsloth/site.tgz -C /tmp
mkdir -p /tmp/ours/site && for d in bitsandbytes bitsandbytes-0.50.2.dist-info liger_kernel liger_kernel-0.8.5.dist-info; do ln -s /tmp/site/$d /tmp/ours/site/$d; done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
C="--max_seq_len 2048 --warmup 2 --steps 4 --lora_dropout 0 --micro_batch_size 2 --grad_accum 4 --cuda_graphs on --no_plot --timeout 100 --rebuild_inputs on"
ours() { ( export PYTHONPATH=/tmp/ours/site HF_HUB_OFFLINE=1; python benchmarks/bench.py $C "$@" 2>&1 | grep "\[bench\] ours\|profile" ); echo "t=$(( $(date +%s) - t0 ))"; }
uns() { ( export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1; d=/tmp/$1; shift
  timeout 80 python3 .unsloth/anchor.py prepare $d "$@" 2>&1 | tail -1
  CKPT=true STEPS=4 WARM=1 timeout 110 python3 .unsloth/anchor.py run $d 0 2,1,2048 2>&1 | tail -1; rm -rf $d ) | tee -a $OUT/unsloth.txt; echo "t=$(( $(date +%s) - t0 ))"; }
ours --model random:llama3-8b --recompute_layers=0 --profile --out $OUT/l3
ours --model random:mistral-7b --recompute_layers=0,6 --out $OUT/mistral
ours --model random:mistral-7b --recompute_layers=0 --base_fp8 on --out $OUT/mistral
uns mistral mistral hidden_size=4096 intermediate_size=14336 num_hidden_layers=32 num_attention_heads=32 num_key_value_heads=8 \
  vocab_size=32768 rope_theta=1000000.0 max_position_embeddings=8192
ours --model random:qwen2.5-7b --recompute_layers=0,6 --out $OUT/qwen
ours --model random:qwen2.5-7b --recompute_layers=0 --base_fp8 on --out $OUT/qwen
uns qwen qwen2 hidden_size=3584 intermediate_size=18944 num_hidden_layers=28 num_attention_heads=28 num_key_value_heads=4 \
  vocab_size=152064 rope_theta=1000000.0 rms_norm_eps=1e-06 max_position_embeddings=8192
ours --model random:gemma3-4b --recompute_layers=0 --base_fp8 off,on --out $OUT/gemma
( export PYTHONPATH=/tmp/ours/site; timeout $(( 585 - ($(date +%s) - t0) )) python benchmarks/check_fast_path_cuda.py --only rebuild 2>&1 | grep -v Warn | tail -12 ) > $OUT/check_rebuild.txt; tail -8 $OUT/check_rebuild.txt
echo "all done t=$(( $(date +%s) - t0 ))"
