"""`--engine-silence-timeout-s`: bounded, and a router given a value out of bounds never starts.

How a silent engine is handled is tested on real processes in
tests/system/test_engine_failures_seen_by_router.py.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmserve.router.engine_pool import SILENCE_TIMEOUT_BOUNDS_S, SILENCE_TIMEOUT_S, EnginePool
from llmserve.router.hash_check import HashSelfCheck
from llmserve.router.prefix_index import PrefixIndex


def pool(silence_timeout_s: float) -> EnginePool:
    index = PrefixIndex()
    return EnginePool(
        ["127.0.0.1:1"], index, HashSelfCheck(index), silence_timeout_s=silence_timeout_s
    )


def test_the_default_and_the_bounds_are_accepted() -> None:
    low, high = SILENCE_TIMEOUT_BOUNDS_S
    # The engines' heartbeat is 1 s: a bound at or below it would drop idle engines.
    assert 1.0 < low <= SILENCE_TIMEOUT_S <= 5.0 <= high
    for value in (low, SILENCE_TIMEOUT_S, high):
        assert pool(value).silence_timeout_s == value


@pytest.mark.parametrize("value", [1.9, 60.5, float("nan"), float("inf"), -3.0])
def test_values_out_of_bounds_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match=r"--engine-silence-timeout-s must be within 2\.\.60 s"):
        pool(value)


def test_router_refuses_to_start_with_it_out_of_bounds(tiny_checkpoint, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmserve.router", "--model", str(tiny_checkpoint("qwen3")),
         "--log-format", "json", "--metrics-port", "-1",
         "--engine-silence-timeout-s", "0.5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "startup_failed"
    assert "--engine-silence-timeout-s" in events[-1]["error"]
