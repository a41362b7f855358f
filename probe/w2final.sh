STAGES=none BUDGET_S=200 bash scripts/device-run.sh > $OUT/setup.log 2>&1
export PYTHONPATH=/tmp/site LLMSERVE_COMMIT=$1
M=/tmp/qwen3-0.6b-shape
mkdir -p $OUT/busy $OUT/plain
timeout 275 python3 benchmarks/serving.py --model $M --rates 4 all --router-arg=--busy-poll --out-dir $OUT/busy 2>&1 | grep "^W2"
timeout 275 python3 benchmarks/serving.py --model $M --rates 4 all --out-dir $OUT/plain 2>&1 | grep "^W2"
