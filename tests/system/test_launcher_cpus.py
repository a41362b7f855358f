"""A server started on a CPU set keeps every thread and child process on it (benchmarks pin the
engine, the router and the load generator apart with it)."""

import os
from collections.abc import Callable
from pathlib import Path

from launcher import start_engine


def _allowed_cpus(pid: int) -> dict[int, str]:
    """Each thread of `pid` and of its child processes: its Cpus_allowed_list."""
    allowed = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        allowed[int(task.name)] = next(
            line.split(":", 1)[1].strip()
            for line in status.splitlines()
            if line.startswith("Cpus_allowed_list")
        )
        for child in (task / "children").read_text().split():
            allowed |= _allowed_cpus(int(child))
    return allowed


def test_an_engine_started_on_one_cpu_runs_all_its_threads_there(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    cpu = max(os.sched_getaffinity(0))
    engine = start_engine(
        tiny_checkpoint("qwen3"), tmp_path, "--num-kv-blocks", "64", cpus=frozenset({cpu})
    )
    try:
        allowed = _allowed_cpus(engine.process.pid)
    finally:
        engine.stop()
    assert len(allowed) > 2  # the server's threads and its engine-core process's
    assert set(allowed.values()) == {str(cpu)}
