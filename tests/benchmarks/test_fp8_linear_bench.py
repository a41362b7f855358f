"""fp8-linear (benchmarks/fp8_linear.py) in Triton's interpreter at its --small size: every op of
every (shape, M) timed and within its twin's tolerance, the GEMV swept at M = 1 and the W8A8
GEMM above, the JSON's summary, and the results table's row for it.

The script runs in a subprocess: it needs TRITON_INTERPRET before Triton is imported, and it
imports its sibling result_file."""

import json
import subprocess
import sys
from pathlib import Path

from benchmark_scripts import load_script

from llmserve.kernels.fp8_linear import TRITON_GEMM_MAX_M

REPO = Path(__file__).resolve().parents[2]
OPS = {
    "bf16",
    "quant_torch",
    "quant_triton",
    "quant_torch+scaled_mm",
    "quant_triton+scaled_mm",
    "fp8_linear",
}


def test_small_run_times_and_checks_every_op(tmp_path: Path) -> None:
    script = [sys.executable, "benchmarks/fp8_linear.py", "--device", "cpu", "--small"]
    proc = subprocess.run(
        [*script, "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("fp8-linear-cpu-")
    record = json.loads(path.read_text())
    assert record["workload"] == "fp8-linear"
    assert record["device"] == "cpu (Triton interpreter)"
    p, f = record["parameters"], record["figures"]
    assert p["small"] and "fatal" not in f and f["swept_all"]
    configs = p["configs"]
    gemv = {c for c in configs if c.startswith("fma")}
    gemm = set(configs) - gemv
    assert p["defaults"]["gemv"] in gemv

    rows = f["rows"]
    assert [(r["shape"], r["M"]) for r in rows] == [
        (shape, m) for shape in p["shapes"] for m in p["token_counts"]
    ]
    # One M per branch of fp8_linear: the GEMV, the Triton GEMM, torch._scaled_mm.
    ms = p["token_counts"]
    assert 1 in ms and any(1 < m <= TRITON_GEMM_MAX_M < max(ms) for m in ms)
    for row in rows:
        assert row["failed"] == {}
        assert [row["N"], row["K"]] == p["shapes"][row["shape"]]
        assert set(row["us"]) == OPS and all(us > 0 for us in row["us"].values())
        swept = gemv if row["M"] == 1 else gemm
        picked = set() if row["M"] == 1 else {row["gemm_picked"]}
        assert set(row["gemv" if row["M"] == 1 else "gemm"]) == swept | picked
        assert row["gemm" if row["M"] == 1 else "gemv"] == {}
        assert set(row["checks"]) == (OPS - {"bf16", "quant_torch"}) | swept | picked
        assert row["checks"].pop("quant_triton") == 0
        assert all(0 <= err < p["twin_tolerance"] for err in row["checks"].values())
        best = row["best_gemv" if row["M"] == 1 else "best_gemm"]
        times = row["gemv" if row["M"] == 1 else "gemm"]
        assert best == [min(times, key=times.get), min(times.values())]

    summary = f["summary"]
    assert summary["shape"] == "8B.gate_up"
    assert set(summary["fp8_linear_speedup_over_bf16_by_m"]) == {
        str(m) for m in p["token_counts"]
    }
    assert summary["failed_ops"] == summary["ops_off_twin"] == 0

    lines = proc.stdout.splitlines()
    assert len([line for line in lines if line.startswith("[")]) == len(rows)
    assert lines[-2].startswith("fp8-linear on cpu (Triton interpreter) @ ")
    assert "8B.gate_up fp8_linear over bf16 x" in lines[-2]
    assert lines[-1] == f"wrote {path}"

    rt = load_script("results_table")
    result = rt.read_result(path)
    assert (result.workload, result.configuration) == ("fp8-linear", "small shapes")
    assert rt.headline(result, "").startswith("8B.gate_up fp8_linear over bf16: x")
