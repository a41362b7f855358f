set -x
STAGES=none BUDGET_S=200 bash scripts/device-run.sh > $OUT/setup.log 2>&1
export PYTHONPATH=/tmp/site LLMSERVE_COMMIT=$1
M=/tmp/qwen3-0.6b-shape
mkdir -p $OUT/bp $OUT/plain
timeout 280 python3 benchmarks/serving.py --model $M --rates 4 all --router-arg=--busy-poll --out-dir $OUT/bp 2>&1 | grep -v "^\s*$" | tail -8
timeout 160 python3 benchmarks/serving.py --model $M --rates 4 --out-dir $OUT/plain 2>&1 | tail -4
timeout 120 python3 benchmarks/single.py --model $M --router-arg=--busy-poll --no-breakdown --out-dir $OUT/bp 2>&1 | tail -4
