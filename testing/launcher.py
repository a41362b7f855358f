"""Starts engine and router processes on loopback ports and waits until they serve.

Harness, not product: the tests and the benchmarks start real processes with it (JSON logs in a
file, ready when the server logs its ready event), and the llmserve packages never import it,
so it lives outside them and the wheel. pytest finds it through its `pythonpath` setting,
benchmark scripts through benchmarks/harness.py.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmserve.common.ports import ephemeral_port

STARTUP_TIMEOUT_S = 180


@dataclass
class ServerProcess:
    """A server process with its address and log file."""

    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_events(self) -> list[dict]:
        return [
            json.loads(line)
            for line in self.log_path.read_text().splitlines()
            if line.startswith("{")
        ]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    module: str,
    args: list[str],
    workdir: Path,
    ready_event: str,
    cpus: frozenset[int] | None = None,
    program: list[str] | None = None,
) -> ServerProcess:
    """Runs `python -m module args` (JSON logs, metrics off) and waits for `ready_event`.

    With `cpus`, the process (and every thread and child it starts) runs on those CPUs only.
    `program` replaces `python -m module`: an installed console script, say.
    """
    port = ephemeral_port()
    log_path = workdir / f"{module.rsplit('.', 1)[-1]}-{port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log_file:
        # cwd is a scratch folder so the repository's top-level folders never shadow packages.
        process = subprocess.Popen(
            [
                *(program or [sys.executable, "-m", module]),
                "--port",
                str(port),
                "--metrics-port",
                "-1",
                "--log-format",
                "json",
                *args,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
        )
    if cpus is not None:
        # Set before the interpreter has started any thread: all later ones inherit it.
        os.sched_setaffinity(process.pid, cpus)
    server = ServerProcess(process, port, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{module} exited {process.returncode}:\n{log_path.read_text()}")
        if any(e.get("event") == ready_event for e in server.log_events()):
            return server
        time.sleep(0.1)
    server.stop()
    raise TimeoutError(f"{module} not ready in {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()}")


def start_engine(
    model_dir: Path, workdir: Path, *extra: str, cpus: frozenset[int] | None = None
) -> ServerProcess:
    return start_server(
        "llmserve.engine_service", ["--model", str(model_dir), *extra], workdir, "serving", cpus
    )


def start_router(
    model_dir: Path,
    engines: list[ServerProcess],
    workdir: Path,
    *extra: str,
    cpus: frozenset[int] | None = None,
) -> ServerProcess:
    return start_server(
        "llmserve.router",
        ["--model", str(model_dir), "--engines", ",".join(e.address for e in engines), *extra],
        workdir,
        "ready",
        cpus,
    )
