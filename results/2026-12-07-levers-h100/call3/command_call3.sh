# device call 3, the same H100 machine right after call 2 (it stayed warm), carry [".unsloth"]
OUT=$OUT END_S=420 FP8_OPT=adamw LONG_MODEL=llama2-7b LONG_WARM=0 LONG_S=235 bash benchmarks/levers_vs_unsloth.sh fp8 long grp2 2>&1 | grep -v Warn | tail -30
