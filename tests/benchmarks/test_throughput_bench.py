"""W1 (benchmarks/throughput.py) on the demo model on the CPU: every requested token generated,
and the step timeline accounts for the timed run: each prompt's first token from a prefill
step, every other from a decode row, the steps' seconds the run's wall time."""

import json
import math
import subprocess
import sys
from pathlib import Path

from llmserve.engine_service.demo_model import ensure_demo_model

REPO = Path(__file__).resolve().parents[2]


def test_cpu_smoke_run_records_where_the_time_went(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--model", str(ensure_demo_model()),
         "--device", "cpu", "--limit", "3", "--breakdown-tokens", "0", "--no-progress",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [path] = tmp_path.glob("W1-*.json")
    record = json.loads(path.read_text())
    f = record["figures"]
    assert record["parameters"]["requests"] == 3
    assert f["all_tokens_generated"] and f["generated_tokens"] == record["parameters"][
        "max_tokens_total"]
    timeline = f["step_kinds"]
    kinds = timeline["by_kind"]
    assert next(iter(kinds)) == "prefill"
    assert sum(k["steps"] for k in kinds.values()) == timeline["steps"]
    assert sum(k["decode_rows"] for k in kinds.values()) + 3 == f["generated_tokens"]
    assert all(k.startswith(("prefill", "mixed", "decode_")) for k in kinds)
    timed = sum(k["s"] for k in kinds.values()) + timeline["before_first_step_s"]
    assert math.isclose(timed, f["wall_s"], rel_tol=0.01, abs_tol=0.01)
