"""`llmserve-engine`: serve one checkpoint over the internal EngineService gRPC API."""

import asyncio
import signal
from dataclasses import replace
from pathlib import Path

import grpc
import structlog
import uvloop
from prometheus_client import start_http_server

from llmserve.common import tls
from llmserve.common.config_flags import parse
from llmserve.common.logs import configure_logging
from llmserve.common.ports import cannot_listen, check_port_free, first_free_port
from llmserve.common.startup_heap import freeze_startup_heap
from llmserve.engine_service.config import DEFAULT_METRICS_PORT, DEFAULT_PORT, EngineConfig
from llmserve.engine_service.demo_model import ensure_demo_model
from llmserve.engine_service.frontend.async_engine import AsyncEngine, EngineDeadError
from llmserve.engine_service.frontend.server import serve_engine

log = structlog.get_logger(__name__)


def parse_config(argv: list[str] | None) -> EngineConfig:
    """The config the command line asks for (exits 2 naming a flag out of bounds)."""
    return parse(EngineConfig, argv, "llmserve-engine", __doc__)


def _start_metrics(host: str, port: int | None) -> None:
    """Serves /metrics on `port`, or on the first free one from DEFAULT_METRICS_PORT (None)."""
    option = "--metrics-port"
    chosen = first_free_port(option, host, DEFAULT_METRICS_PORT) if port is None else port
    try:
        server, _ = start_http_server(chosen, addr=host)
    except OSError as exc:
        raise cannot_listen(option, host, chosen, exc.strerror or str(exc)) from exc
    log.info("metrics_serving", port=server.server_port, path="/metrics")


async def _serve(config: EngineConfig) -> None:
    # Before the model loads: a bad certificate path or a taken port fails in a second, not
    # after minutes.
    credentials = tls.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    if config.port is not None:
        check_port_free("--port", config.host, config.port)
    if config.health_port >= 0:
        check_port_free("--health-port", config.host, config.health_port)
    if config.metrics_port is None or config.metrics_port >= 0:
        _start_metrics(config.host, config.metrics_port)
    if config.model == Path("demo"):
        config = replace(config, model=ensure_demo_model())
    engine = AsyncEngine(config)
    info = await engine.start()
    freeze_startup_heap()
    # Searched only now, just before the bind: engines started together each load a model
    # first, and one that searched before loading could pick the port another then binds.
    if config.port is None:
        config = replace(config, port=first_free_port("--port", config.host, DEFAULT_PORT))
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        clean = await serve_engine(engine, info, config, credentials)
    except BaseException:
        engine.stop()
        raise
    log.info("stopped", clean=clean)
    if not clean:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    configure_logging(config.log_format, config.log_level)
    try:
        # uvloop: every token crosses the event loop, and its callbacks cost less CPU there.
        uvloop.run(_serve(config))
    except (OSError, ValueError, grpc.RpcError, EngineDeadError) as exc:
        log.error("startup_failed", error=str(exc))
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
