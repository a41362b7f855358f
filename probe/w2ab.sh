STAGES=none BUDGET_S=200 bash scripts/device-run.sh > $OUT/setup.log 2>&1
export PYTHONPATH=/tmp/site LLMSERVE_COMMIT=$1
M=/tmp/qwen3-0.6b-shape
lscpu | grep -E "Thread|Core|Socket|NUMA|Model name" > $OUT/lscpu.txt; cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list >> $OUT/lscpu.txt
mkdir -p $OUT/plain $OUT/busy $OUT/full
timeout 120 python3 benchmarks/serving.py --model $M --rates 4 --target router --out-dir $OUT/plain 2>&1 | grep "^W2"
timeout 120 python3 benchmarks/serving.py --model $M --rates 4 --target router --router-arg=--busy-poll --out-dir $OUT/busy 2>&1 | grep "^W2"
timeout 280 python3 benchmarks/serving.py --model $M --rates 4 all --router-arg=--busy-poll --out-dir $OUT/full 2>&1 | grep "^W2"
cat $OUT/lscpu.txt
