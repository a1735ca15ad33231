for c in "1 2048 32 32 int32 0 0" "1 2048 32 32 int64 0 0" "8 2048 32 32 int32 0 0" "8 2048 32 32 int64 0 0" "8 2048 32 32 int32 1 0" "8 2048 32 32 int64 1 0" "1 16384 32 32 int32 0 0" "1 32768 32 32 int32 0 0" "1 32768 32 32 int64 0 0" "8 2048 32 8 int32 0 0" "8 2048 32 32 int32 1 1" "8 2048 32 32 dense 0 1" "1 32768 32 32 dense 0 1" "2 2048 32 32 dense 0 1"; do
  CUDA_LAUNCH_BLOCKING=${CLB:-0} timeout 60 python3 benchmarks/cudnn_cases.py $c 2>&1 | grep -E '^\{|Error' | tail -1
done
