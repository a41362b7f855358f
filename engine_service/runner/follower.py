"""A tensor-parallel rank other than 0: loads its shard and runs what rank 0 publishes.

    python -m llmserve.engine_service.runner.follower --rank 1 --size 2 --port P --config J
"""

import argparse
import json
import os
import sys
import threading

import structlog
import torch

from llmserve.common.config_flags import from_json_fields
from llmserve.common.logs import configure_logging
from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.parallel.group import join_group
from llmserve.engine_service.runner.runner_builder import build_runner, rank_device, set_cpu_threads

log = structlog.get_logger(__name__)


def _exit_when_rank0_exits() -> None:
    """Rank 0 holds our stdin open while it lives; end of file means it is gone."""
    sys.stdin.buffer.read()
    os._exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", required=True, help="the EngineConfig as JSON")
    args = parser.parse_args()
    configure_logging()
    structlog.contextvars.bind_contextvars(tp_rank=args.rank)
    threading.Thread(target=_exit_when_rank0_exits, daemon=True, name="rank0-watch").start()
    config = from_json_fields(EngineConfig, json.loads(args.config))
    set_cpu_threads(config)
    log.info("tensor_parallel_rank_joining", pid=os.getpid(), torch_threads=torch.get_num_threads())
    tp = join_group(args.rank, args.size, args.port, rank_device(config, args.rank))
    runner = build_runner(config, tp)
    log.info("tensor_parallel_rank_ready")
    runner.follow()
    runner.leave_group()
    log.info("tensor_parallel_rank_stopped")
    sys.stderr.flush()
    # Not a normal interpreter exit: the thread blocked reading stdin would abort it.
    os._exit(0)


if __name__ == "__main__":
    main()
