"""`llmserve-router`: the public GenerateService in front of one or more engines."""

import asyncio
import contextlib
import cProfile
import signal
import time
from dataclasses import replace
from pathlib import Path

import structlog
import uvloop

from llmserve.common.config_flags import parse
from llmserve.common.demo_checkpoint import demo_model_dir
from llmserve.common.logs import configure_logging
from llmserve.common.ports import check_port_free, first_free_port
from llmserve.router.config import DEFAULT_METRICS_PORT, RouterConfig
from llmserve.router.server import serve_router
from llmserve.router.tokenizer import TextTokenizer

log = structlog.get_logger(__name__)


def parse_config(argv: list[str] | None) -> RouterConfig:
    """The config the command line asks for (exits 2 naming a flag out of bounds)."""
    return parse(RouterConfig, argv, "llmserve-router", __doc__)


async def _serve(config: RouterConfig) -> None:
    tokenizer = TextTokenizer.from_model_dir(
        demo_model_dir() if config.model == Path("demo") else config.model
    )
    # Checked here, just before serve_router binds them: a taken port is named, not a bind
    # error from gRPC or the HTTP server. The public port never moves: clients expect it.
    check_port_free("--port", config.host, config.port)
    if config.metrics_port is None:
        config = replace(config, metrics_port=first_free_port(
            "--metrics-port", config.host, DEFAULT_METRICS_PORT))
    elif config.metrics_port >= 0:
        check_port_free("--metrics-port", config.host, config.metrics_port)
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serve_router(config, tokenizer)
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    configure_logging(config.log_format, config.log_level)
    # The event loop thread's CPU time, not wall time: waiting in epoll is no cost.
    profiler = cProfile.Profile(time.thread_time) if config.cprofile_out else None
    try:
        if profiler is not None:
            profiler.enable()
        # uvloop: every token crosses the event loop, and its callbacks cost less CPU there.
        uvloop.run(_serve(config))
    except (OSError, ValueError) as exc:
        log.error("startup_failed", error=str(exc))
        raise SystemExit(1) from exc
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(config.cprofile_out)


if __name__ == "__main__":
    main()
