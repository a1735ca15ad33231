# Qwen3-8B shape: ours (bf16, base_fp8) then Unsloth, same call, 2048-token rows, dropout 0
mkdir -p /tmp/ours && tar -xJf .pack/site.tar.xz -C /tmp/ours
nvidia-smi --query-gpu=name --format=csv,noheader
( export PYTHONPATH=/tmp/ours/site HF_HUB_OFFLINE=1
  timeout 130 python benchmarks/bench.py --model random:qwen3-8b --max_seq_len 2048 --warmup 2 --steps 4 \
    --lora_dropout 0 --micro_batch_size 2 --grad_accum 4 --cuda_graphs on --recompute_layers=12 --base_fp8 off,on \
    --out $OUT/ours 2>&1 | grep -v Warning | tail -12 )
tar xzf .unsloth/site.tgz -C /tmp
( export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
  timeout 70 python3 .unsloth/anchor.py prepare /tmp/q3 qwen3 hidden_size=4096 intermediate_size=12288 num_hidden_layers=36 \
    num_attention_heads=32 num_key_value_heads=8 head_dim=128 vocab_size=151936 rope_theta=1000000.0 rms_norm_eps=1e-06 max_position_embeddings=4096 2>&1 | tail -2
  CKPT=true STEPS=4 WARM=1 timeout 100 python3 .unsloth/anchor.py run /tmp/q3 0 2,1,2048 2>&1 | tail -3 ) | tee $OUT/unsloth_qwen3_8b.txt
