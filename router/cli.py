"""`llmserve-router`: the public GenerateService in front of one or more engines."""

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path

import structlog
from prometheus_client import start_http_server

from llmserve.common.demo_checkpoint import demo_model_dir
from llmserve.common.logs import configure_logging
from llmserve.router.balancer import Policy
from llmserve.router.server import serve_router
from llmserve.router.tokenizer import TextTokenizer

log = structlog.get_logger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmserve-router", description=__doc__)
    p.add_argument(
        "--model",
        default="demo",
        help="checkpoint directory (only its tokenizer files are read), or 'demo'",
    )
    p.add_argument(
        "--engines",
        default="127.0.0.1:50052",
        help="comma-separated host:port list, or dns:NAME:PORT (re-resolved)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9400, help="-1 turns /metrics off")
    p.add_argument("--max-connection-age-s", type=float, default=300.0)
    p.add_argument(
        "--routing-policy",
        default="prefix",
        choices=[p.value for p in Policy],
        help="prefix: lowest estimated time to first token (default)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="requests that may wait for admission before the least important is shed",
    )
    p.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    tokenizer = TextTokenizer.from_model_dir(
        demo_model_dir() if args.model == "demo" else Path(args.model)
    )
    if args.metrics_port >= 0:
        server, _ = start_http_server(args.metrics_port, addr=args.host)
        log.info("metrics_serving", port=server.server_port, path="/metrics")
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serve_router(
            tokenizer,
            [t.strip() for t in args.engines.split(",") if t.strip()],
            args.host,
            args.port,
            Policy(args.routing_policy),
            args.max_connection_age_s,
            args.max_queue,
        )
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        asyncio.run(_serve(args))
    except (OSError, ValueError) as exc:
        log.error("startup_failed", error=str(exc))
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
