export PYTHONPATH=$PWD/.gpusite:${PYTHONPATH:-}; mkdir -p /tmp/gg && cp .gg/part1 /tmp/gg/ && cp -r .gpusite /tmp/site2 && python3 -c "import bitsandbytes, liger_kernel, gguf, datasets, torch; print('ok', bitsandbytes.__version__, torch.__version__, torch.version.cuda)" || exit 1
(sleep 345; CUDA_VISIBLE_DEVICES=2 timeout 200 python3 benchmarks/bench.py --out $OUT/prof --timeout 180 --warmup 2 --steps 3 --no_plot --max_seq_len 2048 --micro_batch 2 --accum 4 --ckpt_layers=5 --seeded on --graphs on --profile > $OUT/prof.log 2>&1) &
OUT=$OUT/a BIG_T=320 RUNS=fsdp4-70b bash benchmarks/multi_gpu.sh 2>&1 | tail -15
OUT=$OUT/b BIG_T=230 RUNS=fsdp2-70b bash benchmarks/multi_gpu.sh 2>&1 | tail -15
wait; tail -40 $OUT/prof.log
