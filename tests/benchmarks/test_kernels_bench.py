"""K1 (benchmarks/kernels.py) in Triton's interpreter at its --small size: the bf16 and FP8 caches
side by side over the --sweep-tiles grid, bytes counted per cache dtype, and configs that fail
to compile or give a wrong answer recorded but never the best.

The script runs in a subprocess: it needs TRITON_INTERPRET before Triton is imported, and it
imports its sibling result_file, so it cannot be loaded with testing/benchmark_scripts.py."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

DRIVER = r"""
import argparse, importlib.util, json, os, sys
os.environ["LLMSERVE_TRITON_ON_CPU"] = "1"
os.environ["TRITON_INTERPRET"] = "1"
sys.path.append(sys.argv[1])  # result_file, after the installed packages
spec = importlib.util.spec_from_file_location("k1_bench", sys.argv[1] + "/kernels.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["k1_bench"] = bench
spec.loader.exec_module(bench)

import llmserve.kernels.paged_decode as paged_decode

real = paged_decode.paged_decode_attention


def patched(*args, num_splits=None, tiles=None, **kwargs):
    if tiles is not None and tiles.block_n == 16:  # as Triton's OutOfResources on a GPU
        raise RuntimeError("out of resource: shared memory")
    out = real(*args, num_splits=num_splits, tiles=tiles, **kwargs)
    if num_splits == 2 and kwargs.get("kv_scales") is not None:
        return out * 3  # a broken FP8 config, and a fast one
    return out


paged_decode.paged_decode_attention = patched
args = argparse.Namespace(device="cpu", small=True, runs=2, kv_cache_dtype="both",
                          sweep_tiles=True, page_size=128)
result = bench.run(args)
print(bench.summary(result))
print("RESULT " + json.dumps(result))
"""


def test_sweep_both_dtypes_counts_bytes_and_skips_broken_configs() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(REPO / "benchmarks")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    p = result["parameters"]
    assert result["workload"] == "K1-tiles" and p["kv_cache_dtypes"] == ["bfloat16", "fp8_e4m3"]
    heads, dim, total = p["num_kv_heads"], p["head_dim"], p["sum_context"]
    by_dtype = result["by_kv_cache_dtype"]
    assert by_dtype["bfloat16"]["kv_bytes"] == total * heads * dim * 2 * 2
    assert by_dtype["fp8_e4m3"]["kv_bytes"] == total * heads * (dim + 2) * 2
    assert set(p["bytes_read"]) == {"bfloat16", "fp8_e4m3"}

    rows = result["configs"]
    failed = [r for r in rows if "error" in r]
    assert {r["kv_cache_dtype"] for r in failed} == {"bfloat16", "fp8_e4m3"}
    assert all(r["tiles"]["block_n"] == 16 and "shared memory" in r["error"] for r in failed)
    timed = [r for r in rows if "median_us" in r]
    rejected = [r for r in timed if not r["ok"]]
    assert [(r["kv_cache_dtype"], r["num_splits"]) for r in rejected] == [("fp8_e4m3", 2)]
    for row in timed:
        assert row["rel_err_vs_twin"] < 1e-2 or row in rejected
        if row["kv_cache_dtype"] == "fp8_e4m3":
            assert "rel_err_vs_bf16" in row and row["time_ratio_vs_bf16"] > 0
    for dtype, entry in by_dtype.items():
        best = entry["best_triton"]
        assert best["ok"] and best["kv_cache_dtype"] == dtype
        assert best["median_us"] == min(
            r["median_us"] for r in timed if r["kv_cache_dtype"] == dtype and r["ok"]
        )
        assert entry["failed_configs"] == 1
    assert by_dtype["fp8_e4m3"]["rejected_configs"] == 1
    assert result["fp8_vs_bf16"]["best_time_ratio"] > 0
    assert result["figures"]["copy_bandwidth_tb_per_s"] > 0
