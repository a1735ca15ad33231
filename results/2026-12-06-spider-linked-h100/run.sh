#!/usr/bin/env bash
# the Spider driver: parity seeds + prompt experiments, all lanes at once on one GPU
set -u
cd /tmp/repo
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} OMP_NUM_THREADS=1
SP=/tmp/sp/spider; MODEL=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
P=/tmp/parity; R=/tmp/res; RUNS=/tmp/runs; LIM=${LIM:-1300}
mkdir -p $P $R $RUNS
while [ ! -f /tmp/lm/DONE ]; do sleep 2; done
echo "start $(date +%T)" >> $R/driver.log
python -c "from qlora.model.base import resolve_source; print('base:', resolve_source('$MODEL'))" >> $R/driver.log 2>&1
python benchmarks/spider_split.py $SP/train_spider.json /tmp/split --holdout_dbs 14 --seed 0 >> $R/driver.log 2>&1
export SPIDER=$SP MODEL OUT=$P RUNS JOBS=12 T=$LIM BASE=0
(SEEDS=3 VARIANTS="lora16 nf4 fp8" DECODING=greedy BS=256 bash benchmarks/spider_parity.sh > $R/parA.console 2>&1) &
(SEEDS=2 VARIANTS=fp8 DECODING=greedy BS=256 bash benchmarks/spider_parity.sh > $R/parB.console 2>&1) &
(SEEDS=3 VARIANTS=fastest DECODING=schema BS=128 bash benchmarks/spider_parity.sh > $R/parC.console 2>&1) &
COMMON="--config configs/spider.yaml --model $MODEL --tracker none --save_every 0 --eval_every 0 --micro_batch_size 8 --grad_accum 1 --max_steps 310 --lr 1e-3 --warmup_steps 10"
EV="--batch_size 128 --max_new_tokens 128 --progress false --decoding schema --num_beams 4 --dequantize true"
x() {  # x NAME PY_PREFIX DATA_TRAIN FMT EXTRA EVAL_DATA
  local name=$1 pre=$2 data=$3 fmt=$4 extra=$5 ev=$6
  {
    echo "== train $name: $pre $data:$fmt $extra"
    /usr/bin/time -f "train wall %e s" python $pre train.py $COMMON --datasets $data:$fmt $extra --output_dir $RUNS/$name &&
    cp $RUNS/$name/log.jsonl $R/$name.log.jsonl && cp $RUNS/$name/final/config.yaml $R/$name.config.yaml &&
    echo "== score $name on $ev:$fmt" &&
    /usr/bin/time -f "score wall %e s" python $pre -m qlora.evaluate --adapter $RUNS/$name/final --data $ev:$fmt $EV --out $R/${name}_report.json
    echo "exit $?"
  } >> $R/$name.log 2>&1
}
export -f x; export COMMON EV R RUNS
ROWS="benchmarks/spider_sample_rows.py 1"
timeout -k 10 $LIM bash -c "x h_spider '' /tmp/split/train.json spider '--seed 1' /tmp/split/holdout.json" &
timeout -k 10 $LIM bash -c "x h_linked '' /tmp/split/train.json spider_linked '--seed 1' /tmp/split/holdout.json" &
timeout -k 10 $LIM bash -c "x h_rows1 '$ROWS' /tmp/split/train.json spider '--seed 1' /tmp/split/holdout.json" &
timeout -k 10 $LIM bash -c "x d_linked '' $SP/train_spider.json spider_linked '--cuda_graphs true --seed 3' $SP/dev.json" &
timeout -k 10 $LIM bash -c "x d_rows1 '$ROWS' $SP/train_spider.json spider '--cuda_graphs true --seed 3' $SP/dev.json" &
wait
python benchmarks/spider_table.py $P > $R/table.md 2>&1
echo "end $(date +%T)" >> $R/driver.log
touch $R/ALLDONE
