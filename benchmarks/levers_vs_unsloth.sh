#!/usr/bin/env bash
# The speed levers measured one by one beside Unsloth, on one GPU, in one call. From the repository root,
# with Unsloth's kit in .unsloth (../shared/device/unsloth/site.sh: its site folder also holds the
# bitsandbytes and liger-kernel the project's runs use):
#
#   OUT=/tmp/levers END_S=540 bash benchmarks/levers_vs_unsloth.sh grp chk fp8 long r32
#   OUT=/tmp/levers bash benchmarks/levers_vs_unsloth.sh flat
#
# Parts, run in the order given while time is left (END_S seconds from the start, default 540):
#   grp   Llama-3-8B shape, 2 x 4 x 2048, dropout 0, CUDA graphs, rebuilt inputs, no layer recomputed:
#         group_projections off then on; with it on, torch's fused AdamW; then Unsloth 2 x 1 x 2048 on the same shape (CKPT=true)
#   grp2  Llama-2-7B shape, the grp setting with group_projections on, 8-bit then fused AdamW; then Unsloth on it
#   flat  Llama-3-8B then Llama-2-7B, the grp setting with group_projections on: bitsandbytes' paged 8-bit AdamW
#         then adamw_8bit_flat (the same update over all tensors at once); then Unsloth on each shape
#   loop  the loop's own speed: bench.py on guanaco's length distribution, then train.py on the real guanaco rows
#         (LOOP_ATTN: attn_backend, default auto)
#         (random:llama3-8b:49152 with the SmolLM2 tokenizer from .tok/smollm2, data from .gpudata), the grp
#         setting with group_projections on and adamw_8bit_flat; the median tokens/s of train.py's steps 3-12
#   gem   Gemma 3 4B text shape: ours (the flat setting, bf16 then base_fp8; GEM_ATTN / GEM_FP8: the attn_backend and
#         base_fp8 lists), then Unsloth on the same shape
#         (U_PREP_S / U_RUN_S: its prepare and run time limits, default 90 and 150 s; its Gemma 3 run has needed
#         more than 130 s before printing anything)
#   u3 u2 Unsloth alone on the Llama-3-8B / Llama-2-7B shape, 2 x 1 x 2048 (to pair with a part run in the same call)
#   cud   Llama-3-8B, the flat setting with adamw_8bit_flat: attn_backend varlen then cudnn (cuDNN's frontend, also
#         in the graph), each in bf16 and base_fp8; then Unsloth on the shape
#   cud2  Llama-2-7B, the same in bf16 (CUD2_FP8=off,on: also base_fp8); then Unsloth on the shape
#         (CUD_ATTN: the attn_backend list of both, default varlen,cudnn)
#   prof  the flat setting on Llama-3-8B without CUDA graphs, one profiled step (GPU time per op class, top kernels,
#         printed; PROF_ATTN: attn_backend, default auto)
#         (PROF_SITES=1: also the non-GEMM ops by GPU time with their shapes and call sites; PROF_FP8=on: base_fp8;
#         PROF_NF4=off: bitsandbytes' NF4 kernel instead of nf4_kernel's)
#   ce    Llama-3-8B, the flat setting: the loss head's softmax and gradient in torch ops then in the Triton kernel
#         (ce_kernel off,on; CE_ATTN: attn_backend, default auto)
#   ceg   the same on the Gemma 3 4B text shape (262k vocabulary)
#   nf4   benchmarks/nf4_dequant_probe.py: bitsandbytes' NF4 -> bf16 kernel against nf4_kernel's tiles (also writing
#         rows with a larger stride), equality and timings on the Llama / Qwen weight shapes
#   nk    Llama-3-8B, the flat setting on cuDNN's attention: nf4_kernel off,on; then Unsloth on the shape
#   nk2   the same on Llama-2-7B
#   pk    Llama-3-8B on guanaco's length distribution (packed rows), the flat setting: attn_backend varlen then cudnn
#         (PK_ATTN: the list)
#   fam   Mistral-7B then Qwen2.5-7B (mis, qwn: one of them): the flat setting (FAM_ATTN: attn_backend, default cudnn) in bf16 and base_fp8,
#         then Unsloth on each shape
#   f8    Llama-3-8B, the flat setting on cuDNN's attention with base_fp8 (down_proj in bf16, the default); with F8_ALL=1
#         also every projection in FP8 (--fp8_exclude "")
#   f82   the same on Llama-2-7B
#   q3    Qwen3-8B (RMSNorm on each head's q and k), the fam setting in bf16 and base_fp8, then Unsloth on the shape
#   fe    benchmarks/cudnn_fe_probe.py: cuDNN frontend's attention op against flash, and in a CUDA graph
#         (its wheel, nvidia-cudnn-frontend, in .whl/)
#   chk   benchmarks/check_fast_path_cuda.py on the grouped and kept-attention variants (loss and gradients vs the plain path;
#         CHK_ONLY: other variant name fragments)
#   fp8   the grp setting with base_fp8 and group_projections on (FP8_OPT: --optimizer, default adamw_8bit)
#   long  one 262,144-token Llama-3-8B row (LONG_TOKENS: another length; LONG_MODEL: another random: shape): every layer recomputed from offloaded inputs, cuDNN attention,
#         MLPs in tiles of 32,768 tokens (mlp_tile_tokens), 1 step after 1 warm-up
#         (LONG_S: its time limit, default 330 s; LONG_WARM: warm-up steps, default 1)
#   longu the same row with untiled MLPs (the comparison for `long`)
#         (R32_LAYERS, R32_ATTN: comma lists for --recompute_layers (32 = all; rebuilt inputs need >= 0, so not -1),
#         --recompute_attention; R32_FP8: --base_fp8, default on; R32_S: time limit)
#         (R32_OFFLOAD=off: the recomputed layers' inputs stay on the GPU)
#   r32o  r32 without Unsloth (its offloaded recompute took 121 GiB on this row: it does not fit an 80 GB card)
#   r32   one 32,768-token Llama-2-7B row, base_fp8, 22 of 32 recomputed, rebuilt inputs, offload, cuDNN;
#         then Unsloth's own offloaded recompute on the same row (CKPT=unsloth)
# OURS_EXTRA: bench.py options appended to every run of ours (e.g. "--nf4_kernel off"); OURS_DIR: run ours from another
# copy of the repository (e.g. an earlier commit unpacked by `git archive`), for a before/after pair in one call.
# Unsloth's timed steps and warm-up steps: U_STEPS (default 4) and U_WARM (default 1); its tokens/s moved by 6.6%
# between two runs of 4 steps on one H100, so a ratio wants more steps or repeated runs.
# Each bench.py line goes to $OUT/<part>.log and $OUT/<part>/bench.jsonl; Unsloth's lines to $OUT/unsloth_<part>.txt.
set -u
OUT=${OUT:-/tmp/levers}; END=${END_S:-540}; mkdir -p "$OUT"
t0=$(date +%s)
left() { echo $(( END - ($(date +%s) - t0) )); }
cap() { local l; l=$(left); echo $(( l < $1 ? l : $1 )); }
tar xzf .unsloth/site.tgz -C /tmp
mkdir -p /tmp/ours/site
for d in bitsandbytes bitsandbytes-0.50.2.dist-info liger_kernel liger_kernel-0.8.5.dist-info; do
  ln -sfn /tmp/site/$d /tmp/ours/site/$d
done
# cuDNN's frontend (attn_backend cudnn on packed rows and in CUDA graphs), when its wheel was carried in .whl/
ls .whl/nvidia_cudnn_frontend-*.whl >/dev/null 2>&1 && \
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ours/site .whl/nvidia_cudnn_frontend-*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"

ours() {  # ours PART TIMEOUT bench-args...
  local part=$1 t=$2; shift 2
  ( export PYTHONPATH=/tmp/ours/site HF_HUB_OFFLINE=1
    cd "${OURS_DIR:-.}"
    timeout "$(cap "$t")" python3 benchmarks/bench.py --no_plot --warmup 2 --steps 4 --out "$OUT/$part" "$@" ${OURS_EXTRA:-} 2>&1 \
      | tee -a "$OUT/$part.log" | grep "\[bench\] ours\|rror" )
}
unsloth() {  # unsloth PART DIR ROWSxMBxLEN CKPT model_type config...
  local part=$1 dir=$2 cfg=$3 ckpt=$4; shift 4
  ( export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
    timeout "$(cap "${U_PREP_S:-90}")" python3 .unsloth/anchor.py prepare "$dir" "$@" 2>&1 | tail -1
    CKPT=$ckpt STEPS=${U_STEPS:-4} WARM=${U_WARM:-1} timeout "$(cap "${U_RUN_S:-150}")" python3 .unsloth/anchor.py run "$dir" 0 "$cfg" 2>&1 | tail -3
    rm -rf "$dir" ) | tee -a "$OUT/unsloth_$part.txt"
}
L3=(llama hidden_size=4096 intermediate_size=14336 num_hidden_layers=32 num_attention_heads=32 num_key_value_heads=8
    vocab_size=128256 rope_theta=500000.0 max_position_embeddings=8192)
G3=(gemma3_text hidden_size=2560 intermediate_size=10240 num_hidden_layers=34 num_attention_heads=8 num_key_value_heads=4
    head_dim=256 query_pre_attn_scalar=256 sliding_window=1024 rope_theta=1000000.0 vocab_size=262208)
MIS=(mistral hidden_size=4096 intermediate_size=14336 num_hidden_layers=32 num_attention_heads=32 num_key_value_heads=8
     vocab_size=32768 rope_theta=1000000.0 max_position_embeddings=8192)
QWN=(qwen2 hidden_size=3584 intermediate_size=18944 num_hidden_layers=28 num_attention_heads=28 num_key_value_heads=4
     vocab_size=152064 rope_theta=1000000.0 rms_norm_eps=1e-06 max_position_embeddings=8192)
Q3=(qwen3 hidden_size=4096 intermediate_size=12288 num_hidden_layers=36 num_attention_heads=32 num_key_value_heads=8
    head_dim=128 vocab_size=151936 rope_theta=1000000.0 rms_norm_eps=1e-06 max_position_embeddings=8192)
L2=(llama hidden_size=4096 intermediate_size=11008 num_hidden_layers=32 num_attention_heads=32 num_key_value_heads=32
    vocab_size=32000 max_position_embeddings=4096)
ROWS="--max_seq_len 2048 --micro_batch_size 2 --grad_accum 4 --lora_dropout 0 --cuda_graphs on --rebuild_inputs on --recompute_layers=0"
LONG="--model random:${LONG_MODEL:-llama3-8b} --max_seq_len ${LONG_TOKENS:-262144} --micro_batch_size 1 --grad_accum 1 --warmup ${LONG_WARM:-1} --steps 1 --lora_dropout 0
      --attn_backend cudnn --recompute_layers=-1 --offload_recompute on"

set -- $(echo "$@" | sed 's/\bfam\b/mis qwn/g')  # fam: both families
for part in "$@"; do
  [ "$(left)" -gt 30 ] || { echo "no time left for $part"; break; }
  echo "== $part at $(( $(date +%s) - t0 )) s"
  case $part in
    grp)   ours grp 110 --model random:llama3-8b $ROWS --group_projections off,on
           ours grp 110 --model random:llama3-8b $ROWS --group_projections on --optimizer adamw
           unsloth grp /tmp/l3 2,1,2048 true "${L3[@]}" ;;
    flat)  ours flat 110 --model random:llama3-8b $ROWS --group_projections on --optimizer paged_adamw_8bit,adamw_8bit_flat
           unsloth flat /tmp/l3 2,1,2048 true "${L3[@]}"
           ours flat2 110 --model random:llama2-7b $ROWS --group_projections on --optimizer paged_adamw_8bit,adamw_8bit_flat
           unsloth flat2 /tmp/l2 2,1,2048 true "${L2[@]}" ;;
    loop)  ours loop 110 --model random:llama3-8b:49152 --data guanaco $ROWS --group_projections on --optimizer adamw_8bit_flat \
             --attn_backend "${LOOP_ATTN:-auto}"
           ( export PYTHONPATH=/tmp/ours/site HF_HUB_OFFLINE=1
             timeout "$(cap 200)" python3 train.py --model random:llama3-8b:49152 --tokenizer .tok/smollm2 \
               --datasets .gpudata/guanaco-llama2-1k.parquet:guanaco --max_seq_len 2048 --micro_batch_size 2 --grad_accum 4 \
               --lora_dropout 0 --cuda_graphs true --rebuild_inputs true --recompute_layers 0 --group_projections true \
               --optimizer adamw_8bit_flat --attn_backend "${LOOP_ATTN:-auto}" --max_steps 12 --warmup_steps 2 --eval_fraction 0 --save_every 0 \
               --sample_prompts 0 --tracker none --output_dir "$OUT/loop/train" > "$OUT/loop_train.log" 2>&1
             tail -2 "$OUT/loop_train.log"
             python3 -c "import json,statistics,sys; r=[json.loads(l) for l in open(sys.argv[1])]; t=[x for x in r if x.get('kind')=='train' and x['step']>=3]; print('[loop] train.py median tok/s steps 3-12: %.0f, peak %s' % (statistics.median(x['tokens_per_s'] for x in t), max(x.get('peak_mem_gib', 0) for x in t)))" "$OUT/loop/train/log.jsonl" ) | tee "$OUT/loop.txt" ;;
    gem)   ours gem 200 --model random:gemma3-4b $ROWS --group_projections on --optimizer adamw_8bit_flat \
             --attn_backend "${GEM_ATTN:-auto}" --base_fp8 "${GEM_FP8:-off,on}"
           unsloth gem /tmp/g3 2,1,2048 true "${G3[@]}" ;;
    u3)    unsloth u3 /tmp/l3 2,1,2048 true "${L3[@]}" ;;
    u2)    unsloth u2 /tmp/l2 2,1,2048 true "${L2[@]}" ;;
    chk)   ( export PYTHONPATH=/tmp/ours/site
             timeout "$(cap 200)" python3 benchmarks/check_fast_path_cuda.py --only "${CHK_ONLY:-grouped,attn kept}" 2>&1 | grep -v Warn | tail -30 ) \
             | tee "$OUT/check.txt" ;;
    fp8)   ours fp8 110 --model random:llama3-8b $ROWS --group_projections on --base_fp8 on --optimizer "${FP8_OPT:-adamw_8bit}" ;;
    grp2)  ours grp2 110 --model random:llama2-7b $ROWS --group_projections on --optimizer adamw_8bit,adamw
           unsloth grp2 /tmp/l2 2,1,2048 true "${L2[@]}" ;;
    long)  ours long "${LONG_S:-330}" $LONG --mlp_tile_tokens 32768 ;;
    longu) ours long "${LONG_S:-330}" $LONG --mlp_tile_tokens 0 ;;
    r32|r32o) ours r32 "${R32_S:-150}" --model random:llama2-7b --max_seq_len 32768 --micro_batch_size 1 --grad_accum 1 \
             --warmup 1 --steps 3 --lora_dropout 0 --base_fp8 "${R32_FP8:-on}" --recompute_layers="${R32_LAYERS:-22}" \
             --recompute_attention "${R32_ATTN:-on}" --rebuild_inputs on --offload_recompute "${R32_OFFLOAD:-on}" --attn_backend cudnn
           [ "$part" = r32o ] || unsloth r32 /tmp/l2 1,1,32768 unsloth "${L2[@]}" ;;
    cud)   ours cud 150 --model random:llama3-8b $ROWS --group_projections on --optimizer adamw_8bit_flat \
             --attn_backend "${CUD_ATTN:-varlen,cudnn}" --base_fp8 off,on
           unsloth cud /tmp/l3 2,1,2048 true "${L3[@]}" ;;
    cud2)  ours cud2 110 --model random:llama2-7b $ROWS --group_projections on --optimizer adamw_8bit_flat \
             --attn_backend "${CUD_ATTN:-varlen,cudnn}" --base_fp8 "${CUD2_FP8:-off}"
           unsloth cud2 /tmp/l2 2,1,2048 true "${L2[@]}" ;;
    prof)  ours prof 150 --model random:llama3-8b $ROWS --group_projections on --optimizer adamw_8bit_flat --cuda_graphs off \
             --attn_backend "${PROF_ATTN:-auto}" --base_fp8 "${PROF_FP8:-off}" --nf4_kernel "${PROF_NF4:-on}" \
             --profile ${PROF_SITES:+--profile_sites}
           python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])][-1]['profile']; t=r.pop('top_kernels'); s=r.pop('op_sites', []); print(json.dumps(r)); [print(k) for k in t]; [print(k) for k in s]" \
             "$OUT/prof/bench.jsonl" | tee "$OUT/prof.txt" ;;
    ce)    ours ce 150 --model random:llama3-8b $ROWS --group_projections on --optimizer adamw_8bit_flat \
             --attn_backend "${CE_ATTN:-auto}" --ce_kernel off,on ;;
    ceg)   ours ceg 150 --model random:gemma3-4b $ROWS --group_projections on --optimizer adamw_8bit_flat --ce_kernel off,on ;;
    nf4)   ( export PYTHONPATH=/tmp/ours/site
             timeout "$(cap 120)" python3 benchmarks/nf4_dequant_probe.py 2>&1 | grep -v Warn | tail -8 ) | tee "$OUT/nf4.txt" ;;
    nk)    ours nk 120 --model random:llama3-8b $ROWS --group_projections on --optimizer adamw_8bit_flat \
             --attn_backend "${NK_ATTN:-cudnn}" --nf4_kernel off,on
           unsloth nk /tmp/l3 2,1,2048 true "${L3[@]}" ;;
    nk2)   ours nk2 120 --model random:llama2-7b $ROWS --group_projections on --optimizer adamw_8bit_flat \
             --attn_backend "${NK_ATTN:-cudnn}" --nf4_kernel off,on
           unsloth nk2 /tmp/l2 2,1,2048 true "${L2[@]}" ;;
    pk)    ours pk 150 --model random:llama3-8b --data guanaco $ROWS --group_projections on --optimizer adamw_8bit_flat \
             --attn_backend "${PK_ATTN:-varlen,cudnn}" ;;
    mis)   ours mis 150 --model random:mistral-7b $ROWS --group_projections on --optimizer adamw_8bit_flat \
             --attn_backend "${FAM_ATTN:-cudnn}" --base_fp8 off,on
           unsloth mis /tmp/mis 2,1,2048 true "${MIS[@]}" ;;
    qwn)   ours qwn 150 --model random:qwen2.5-7b $ROWS --group_projections on --optimizer adamw_8bit_flat \
             --attn_backend "${FAM_ATTN:-cudnn}" --base_fp8 off,on
           unsloth qwn /tmp/qwn 2,1,2048 true "${QWN[@]}" ;;
    f8|f82) m=$([ "$part" = f8 ] && echo llama3-8b || echo llama2-7b)
           ours "$part" 110 --model "random:$m" $ROWS --group_projections on --optimizer adamw_8bit_flat --attn_backend cudnn \
             --base_fp8 on
           [ -z "${F8_ALL:-}" ] || ours "$part" 110 --model "random:$m" $ROWS --group_projections on \
             --optimizer adamw_8bit_flat --attn_backend cudnn --base_fp8 on --fp8_exclude "" ;;
    q3)    ours q3 150 --model random:qwen3-8b $ROWS --group_projections on --optimizer adamw_8bit_flat \
             --attn_backend "${FAM_ATTN:-cudnn}" --base_fp8 off,on
           unsloth q3 /tmp/q3 2,1,2048 true "${Q3[@]}" ;;
    fe)    ( python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cfe .whl/nvidia_cudnn_frontend-*.whl
             export PYTHONPATH=/tmp/cfe:/tmp/ours/site
             timeout "$(cap 240)" python3 benchmarks/cudnn_fe_probe.py --out "$OUT/fe_probe.jsonl" ${FE_ARGS:-} 2>&1 | grep -v Warn | tail -12 ) \
             | tee "$OUT/fe.txt" ;;
    *)     echo "unknown part $part" ;;
  esac
done
echo "all done at $(( $(date +%s) - t0 )) s"
