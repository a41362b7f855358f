"""The servers pick gRPC's classic poller before grpc starts, unless an operator chose one."""

import os
import subprocess
import sys

import pytest

from llmserve.common.grpc_polling import CLASSIC_POLLER


def _experiments_after(imports: str, preset: str | None) -> str:
    """GRPC_EXPERIMENTS in a fresh interpreter after `imports` ('-' when unset)."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if preset is not None:
        env["GRPC_EXPERIMENTS"] = preset
    code = f"{imports}; import os; print(os.environ.get('GRPC_EXPERIMENTS', '-'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.strip()


@pytest.mark.parametrize("package", ["llmserve.router.cli", "llmserve.engine_service.cli"])
def test_server_entry_points_default_to_the_classic_poller(package: str) -> None:
    assert _experiments_after(f"import {package}", None) == CLASSIC_POLLER


def test_an_operators_setting_wins() -> None:
    assert _experiments_after("import llmserve.router.cli", "") == ""
    assert _experiments_after("import llmserve.router.cli", "-event_engine_client") == (
        "-event_engine_client")


def test_nothing_is_set_once_grpc_has_started() -> None:
    # gRPC has read GRPC_EXPERIMENTS by then: setting it would claim a poller it does not run.
    assert _experiments_after("import grpc; import llmserve.router.cli", None) == "-"
