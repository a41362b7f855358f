"""Rank 0 starts the other ranks as processes and ends the engine if any of them dies.

A rank that dies leaves the others blocked in a collective (NCCL never notices), so nothing
waits for one: a thread per rank process turns its exit into this process's exit with status
1, and each rank ends itself when rank 0's end of its stdin pipe closes.
"""

import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict

import structlog

from llmserve.common.ports import ephemeral_port
from llmserve.engine_service.config import EngineConfig

log = structlog.get_logger(__name__)

RANK_DIED_EXIT_CODE = 1


class RankProcesses:
    """Ranks 1..size-1 of a tensor-parallel group, each in its own Python process."""

    def __init__(self, config: EngineConfig) -> None:
        self.size = config.tensor_parallel_size
        self.port = ephemeral_port()
        self.stopping = False
        payload = json.dumps(asdict(config), default=str)
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "llmserve.engine_service.runner.follower",
                 "--rank", str(rank), "--size", str(self.size), "--port", str(self.port),
                 "--config", payload],
                stdin=subprocess.PIPE,
            )
            for rank in range(1, self.size)
        ]
        for rank, process in enumerate(self.processes, start=1):
            log.info("tensor_parallel_rank_started", rank=rank, pid=process.pid)
            threading.Thread(target=self._watch, args=(rank, process), daemon=True,
                             name=f"rank-{rank}-watch").start()

    def _watch(self, rank: int, process: subprocess.Popen) -> None:
        code = process.wait()
        if not self.stopping:
            log.error("tensor_parallel_rank_died", rank=rank, pid=process.pid, exitcode=code)
            os._exit(RANK_DIED_EXIT_CODE)

    def join(self, timeout: float = 30.0) -> None:
        """After rank 0 published STOP (with `stopping` set before, so exits are expected):
        waits for the ranks to exit, then cuts their pipes."""
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
            if process.stdin is not None:
                process.stdin.close()
