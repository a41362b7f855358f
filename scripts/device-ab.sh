#!/usr/bin/env bash
# W1 and W3 at two commits in one device call, alternated (A B B A), for "speed unchanged" checks.
# Here, before the call (the trees travel as carried, ignored paths):
#
#   mkdir -p .devrun && for side in base new; do rm -rf .devrun/$side; done
#   git archive --prefix=base/ BASE_REV | tar -x -C .devrun
#   git archive --prefix=new/ HEAD | tar -x -C .devrun
#
# then run `bash scripts/device-ab.sh` carrying .devrun and .whl (wheels the device image lacks).
# STAGES picks among: gputests w1 w3 w7 (default: all); pytest runs with -P, since the tree's
# kernels/ on sys.path would hide the `kernels` package transformers imports. Each tree is installed editable in turn and
# runs its own benchmark scripts; results are tagged BASE_COMMIT / NEW_COMMIT and land in $OUT.
# W7 (structured output) runs once, on the new tree only, after W1 and W3; it needs jsonschema's
# wheels in .whl (jsonschema, jsonschema-specifications, referencing, rpds-py for cp312).
set -uo pipefail
OUT="${OUT:-/tmp/device-out}"
STAGES="${STAGES:-gputests w1 w3 w7}"
BUDGET_S="${BUDGET_S:-540}"  # the GPU tests, last, get what is left of it
START=$(date +%s)
BASE_COMMIT="${BASE_COMMIT:-base}"
NEW_COMMIT="${NEW_COMMIT:-new}"
MODEL=/tmp/qwen3-0.6b-shape
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device-ab.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
wanted() { [[ " $STAGES " == *" $1 "* ]]; }
ROOT=$PWD

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || echo "!! wheels FAILED"
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

use() {  # use SIDE: install that tree editable; later commands run inside it
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT/.devrun/$1" \
    >/dev/null || echo "!! install $1 FAILED"
  cd "$ROOT/.devrun/$1" || exit 1
}
commit_of() { [ "$1" = base ] && echo "$BASE_COMMIT" || echo "$NEW_COMMIT"; }

use new
# A tree from before the writer moved to benchmarks/ has it in the engine package.
if [ -f benchmarks/bench_checkpoint.py ]; then
  timeout 120 python3 benchmarks/bench_checkpoint.py "$MODEL" || echo "!! checkpoint FAILED"
else
  timeout 120 python3 -m llmserve.engine_service.bench_checkpoint "$MODEL" \
    || echo "!! checkpoint FAILED"
fi

# W1 in ORDER (default A B B A); W3 (slower to start) in its first two runs, A B.
round=0
for side in ${ORDER:-base new new base}; do
  round=$((round + 1))
  use "$side"
  export LLMSERVE_COMMIT; LLMSERVE_COMMIT=$(commit_of "$side")
  if wanted w1; then
    echo "== W1 $side ($LLMSERVE_COMMIT) =="
    timeout 150 python3 benchmarks/throughput.py --model "$MODEL" --out "$OUT/w1-$side-$round" \
      --no-progress 2>&1 | tail -4
  fi
  if wanted w3 && [ $round -le 2 ]; then
    echo "== W3 $side ($LLMSERVE_COMMIT) =="
    timeout 150 python3 benchmarks/single.py --model "$MODEL" --out-dir "$OUT/w3-$side-$round" \
      --no-breakdown 2>&1 | tail -4
  fi
done
if wanted w7; then
  use new
  export LLMSERVE_COMMIT="$NEW_COMMIT"
  if [ -f benchmarks/structured.py ]; then
    echo "== W7 new ($LLMSERVE_COMMIT) =="
    timeout 200 python3 benchmarks/structured.py --model "$MODEL" --out "$OUT/w7-new" \
      --no-progress 2>&1 | tail -4
  else
    echo "!! W7 skipped: the new tree has no benchmarks/structured.py"
  fi
fi
left=$((BUDGET_S - ($(date +%s) - START)))
if wanted gputests && [ "$left" -gt 30 ]; then
  use new
  echo "== gpu tests (new), ${left}s left =="
  timeout "$left" python3 -P -m pytest -m gpu tests -q -p no:cacheprovider --continue-on-collection-errors -rfE 2>&1 | tail -40
fi
cd "$ROOT"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for workload, key in (("w1", "tok_per_s"), ("w3", None)):
    for side in ("base", "new"):
        for path in sorted(out.glob(f"{workload}-{side}-*/*.json")):
            r = json.loads(path.read_text())
            f = r["figures"]
            if key:
                print(f"{workload} {side} {r['commit']} {path.name}: {f[key]} tok/s")
            else:
                for target, t in f["targets"].items():
                    print(f"{workload} {side} {r['commit']} {path.name} {target}: "
                          f"TTFT p50 {t['ttft_s']['p50'] * 1e3:.3f} ms, "
                          f"ITL p50 {t['itl_s']['p50'] * 1e3:.4f} ms")
for path in sorted(out.glob("w7-new/*.json")):
    f = json.loads(path.read_text())["figures"]
    print(f"w7 new {path.name}: {f['tok_per_s']} tok/s with schemas, "
          f"{f['unconstrained_tok_per_s']} without (x{f['ratio']}); "
          f"valid {f['valid']}/{f['stop']} stop outputs, {f['length']} cut by length")
PY
