# One NVIDIA H200, torch 2.11.0+cu130, bitsandbytes 0.50.2, liger 0.8.5, from the repo root.
# bench.jsonl, check.txt: every row of the first table of RESULTS.md "FP8 base GEMMs", one run on one card.
# Run at commit 6036bdb, before fp8_exclude existed: every projection in FP8. At later commits the
# default keeps down_proj in bf16, so the lines below pass --fp8_exclude "" to reproduce that table.
export PYTHONPATH=$PWD/.gpusite:${PYTHONPATH:-}; export PYTHONUNBUFFERED=1
timeout 120 python3 benchmarks/check_fast_path_cuda.py --only "fp8: fused+liger" > $OUT/check.txt 2>&1
B="python3 benchmarks/bench.py --out $OUT --timeout 110 --warmup 2 --steps 3 --no_plot --max_seq_len 2048"
$B --tag L --micro_batch 4 --accum 2 --baseline_only
$B --tag F0 --micro_batch 2 --accum 4 --ckpt_layers=4 --graphs on --lora_dropout 0 --fp8 off,on --fp8_exclude ""
$B --tag F1 --micro_batch 2 --accum 4 --ckpt_layers=5 --seeded on --graphs on --fp8 off,on --fp8_exclude ""
$B --tag F2 --micro_batch 4 --accum 2 --ckpt_layers=20 --graphs on --lora_dropout 0 --fp8 on --fp8_exclude ""
$B --tag F2 --micro_batch 4 --accum 2 --ckpt_layers=22 --seeded on --graphs on --fp8 on --fp8_exclude ""
# fp8_probe.json, bench_kernel_row_reciprocal.jsonl, check_kernel_row_reciprocal.txt: python3 benchmarks/fp8_probe.py
# --out $OUT, then F0/F1 with --fp8 on (kernel tiles (64, 128, 4) both ways, before the tiles were chosen from this probe).
# bench_kernel_per_element.jsonl, check_kernel_per_element.txt, bench_kernel_tiled.jsonl: F0/F1 with the first two
# weight kernels (see NOTES.md 11).
# exclude/: the default fp8_exclude (down_proj in bf16), bf16 in the same run:
#   timeout 150 python3 benchmarks/check_fast_path_cuda.py --only fp8 > $OUT/check.txt
#   $B --tag F0 --micro_batch 2 --accum 4 --ckpt_layers=4 --graphs on --lora_dropout 0 --fp8 off,on
#   $B --tag F1 --micro_batch 2 --accum 4 --ckpt_layers=5 --seeded on --graphs on --fp8 off,on
# train/: bench.py --data guanaco --model random:llama2-7b:49152 (same setting, --fp8 on) and the train.py command
#   in RESULTS.md "FP8 base GEMMs" (GPU packages in .gpusite, tokenizer in .tok, data in .gpudata).
# final/ (bench.jsonl, check.txt): the F0 setting with --fp8 on and the CUDA check, run again after the review fixes.
# blocked/check.txt, blocked/fp8_probe.json, blocked/bench_fp8_only.jsonl, the final weight kernel:
#   timeout 100 python3 benchmarks/check_fast_path_cuda.py --only "fp8: fused+liger" > $OUT/check.txt
#   timeout 70 python3 benchmarks/fp8_probe.py --out $OUT
#   $B --tag F0 --micro_batch 2 --accum 4 --ckpt_layers=4 --graphs on --lora_dropout 0 --fp8 on
# blocked/bench.jsonl, blocked/bench.png, the headline rows of RESULTS.md "FP8 base GEMMs" (bf16 in the same run):
#   B="python3 benchmarks/bench.py --out $OUT --timeout 70 --warmup 2 --steps 3 --no_plot --max_seq_len 2048"
#   $B --tag F0 --micro_batch 2 --accum 4 --ckpt_layers=4 --graphs on --lora_dropout 0 --fp8 off,on
#   $B --tag F1 --micro_batch 2 --accum 4 --ckpt_layers=5 --seeded on --graphs on --fp8 on
