# device call 1 (one NVIDIA H100 80GB HBM3, 2026-12-07), carry [".unsloth"] (../shared/device/unsloth/site.sh)
OUT=$OUT END_S=575 LONG_S=330 LONG_WARM=0 R32_S=235 R32_LAYERS=26,-1 R32_ATTN=on,off \
  bash benchmarks/levers_vs_unsloth.sh long r32o 2>&1 | grep -v Warn | tail -40
# the two -1 (all recomputed) runs of r32o stopped at start-up: rebuild_inputs needs recompute_layers >= 0
