# device call 2 (one NVIDIA H100 80GB HBM3, 2026-12-07), carry [".unsloth"]; the card had < 100 GB, so the parts were "grp r32o chk fp8"
M=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1); if [ "$M" -gt 100000 ]; then P="r32 grp chk fp8"; else P="grp r32o chk fp8"; fi
OUT=$OUT END_S=570 R32_S=100 R32_LAYERS=26 R32_ATTN=off R32_FP8=off bash benchmarks/levers_vs_unsloth.sh $P 2>&1 | grep -v Warn | tail -45
