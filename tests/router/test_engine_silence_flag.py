"""`--engine-silence-timeout-s`: bounded, and a router given a value out of bounds never starts.

How a silent engine is handled is tested on real processes in
tests/system/test_engine_failures_seen_by_router.py.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from llmserve.router.config import RouterConfig

FIELD = {f.name: f for f in dataclasses.fields(RouterConfig)}["engine_silence_timeout_s"]


def test_the_default_and_the_bounds_are_accepted() -> None:
    setting = FIELD.metadata["setting"]
    # The engines' heartbeat is 1 s: a bound at or below it would drop idle engines.
    assert 1.0 < setting.low <= FIELD.default <= 5.0 <= setting.high
    for value in (setting.low, FIELD.default, setting.high):
        assert RouterConfig(engine_silence_timeout_s=value).engine_silence_timeout_s == value


@pytest.mark.parametrize("value", [1.9, 60.5, float("nan"), float("inf"), -3.0])
def test_values_out_of_bounds_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match=r"--engine-silence-timeout-s must be in \[2, 60\]"):
        RouterConfig(engine_silence_timeout_s=value)


def test_router_refuses_to_start_with_it_out_of_bounds(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmserve.router", "--engine-silence-timeout-s", "0.5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--engine-silence-timeout-s must be in [2, 60], not 0.5" in result.stderr
