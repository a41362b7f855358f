"""scripts/serve-demo.sh (`make serve`): a second one started while one runs fails at once,
saying why, and leaves the first serving."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from launcher import STARTUP_TIMEOUT_S

from llmserve.common.ports import ephemeral_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "serve-demo.sh"
VENV = Path(sys.executable).parent.parent
PORT_NAMES = ("ROUTER_PORT", "ENGINE_PORT", "ROUTER_METRICS_PORT", "ENGINE_METRICS_PORT")


@contextlib.contextmanager
def serve_demo(env: dict[str, str], out: Path) -> Iterator[subprocess.Popen]:
    """Runs the script in its own process group, as a terminal would; the group is gone after."""
    with out.open("w") as log:
        process = subprocess.Popen(
            [SCRIPT], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_with_ctrl_c(process: subprocess.Popen) -> int:
    """SIGINT to the whole group, as Ctrl-C in a terminal; returns the script's status once
    nothing of the group is left."""
    os.killpg(process.pid, signal.SIGINT)
    status = process.wait(timeout=60)
    deadline = time.monotonic() + 10
    while group_alive(process.pid):
        assert time.monotonic() < deadline, "the servers outlived the script"
        time.sleep(0.1)
    return status


def test_second_serve_on_the_same_ports_fails_fast_saying_why(tmp_path) -> None:
    ports = {name: str(ephemeral_port()) for name in PORT_NAMES}
    env = {**os.environ, **ports, "VENV": str(VENV), "LOGS": str(tmp_path / "logs")}
    first_out = tmp_path / "first.out"
    with serve_demo(env, first_out) as first:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "== serving until Ctrl-C" not in first_out.read_text():
            assert first.poll() is None, first_out.read_text()
            assert time.monotonic() < deadline, first_out.read_text()
            time.sleep(0.2)
        clashes = [
            ("ROUTER_PORT", ports),  # all four ports the same
            ("ENGINE_METRICS_PORT", {"ENGINE_METRICS_PORT": ports["ENGINE_METRICS_PORT"]}),
        ]
        for taken, clash in clashes:
            others = {name: str(ephemeral_port()) for name in PORT_NAMES}
            second_out = tmp_path / f"second-{taken}.out"
            started = time.monotonic()
            with serve_demo({**env, **others, **clash}, second_out) as second:
                status = second.wait(timeout=60)
            output = second_out.read_text()
            assert status == 1, output
            assert time.monotonic() - started < 30
            port = ports[taken]
            assert f"error: {taken} {port}: cannot listen on 127.0.0.1:{port}: address " \
                "already in use" in output
            assert "== starting engine" not in output
        assert first.poll() is None
        health = subprocess.run(
            [VENV / "bin" / "llmserve", "health", "--target", f"127.0.0.1:{ports['ROUTER_PORT']}"],
            capture_output=True, text=True, timeout=30,
        )
        assert (health.returncode, health.stdout) == (0, "SERVING\n")
        assert stop_with_ctrl_c(first) == 130
