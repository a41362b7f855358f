"""`llmserve-router`: the public GenerateService in front of one or more engines."""

import argparse
import asyncio
import contextlib
import cProfile
import signal
import time
from pathlib import Path

import structlog
import uvloop

from llmserve.common import tls
from llmserve.common.demo_checkpoint import demo_model_dir
from llmserve.common.logs import configure_logging
from llmserve.common.ports import check_port_free, first_free_port
from llmserve.router.auth import TenantKeys
from llmserve.router.balancer import Policy
from llmserve.router.engine_pool import SILENCE_TIMEOUT_BOUNDS_S, SILENCE_TIMEOUT_S
from llmserve.router.server import serve_router
from llmserve.router.tokenizer import TextTokenizer

log = structlog.get_logger(__name__)
DEFAULT_METRICS_PORT = 9400


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
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help=f"HTTP port of /metrics and /healthz (health details per engine) (default "
        f"{DEFAULT_METRICS_PORT}, or the next free one; -1 = off)",
    )
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
    p.add_argument(
        "--max-message-mb",
        type=int,
        default=16,
        help="largest request or response message in MiB (default 16: a long prompt fits)",
    )
    p.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=4096,
        help="calls in flight before new ones get RESOURCE_EXHAUSTED at once (default 4096; "
        "keep it above --max-queue plus what the engines run)",
    )
    p.add_argument(
        "--busy-poll",
        action="store_true",
        help="poll sockets instead of sleeping while requests are in flight: one thread wake-up "
        "fewer per message received, for one busy core (give the router 2 cores or more)",
    )
    low, high = SILENCE_TIMEOUT_BOUNDS_S
    p.add_argument(
        "--engine-silence-timeout-s",
        type=float,
        default=SILENCE_TIMEOUT_S,
        help=f"an engine that sends nothing for this long (its load stream beats every second; "
        f"HTTP/2 pings go unanswered) leaves the pool and its streams fail over, as if it had "
        f"died (default {SILENCE_TIMEOUT_S:g}; {low:g} to {high:g})",
    )
    security = p.add_argument_group("TLS and auth (none given = plaintext, no auth)")
    security.add_argument("--tls-cert", type=Path, help="server certificate of the public port")
    security.add_argument("--tls-key", type=Path, help="private key of --tls-cert")
    security.add_argument(
        "--engine-tls-ca", type=Path, help="CA of the engines' certificates: TLS to engines"
    )
    security.add_argument(
        "--engine-tls-cert", type=Path, help="client certificate shown to engines (mutual TLS)"
    )
    security.add_argument("--engine-tls-key", type=Path, help="private key of --engine-tls-cert")
    security.add_argument(
        "--auth-keys-file",
        type=Path,
        help='JSON {"tenants": {"<tenant>": ["<key>", ...]}}: calls need '
        "'authorization: Bearer <key>' and run as the key's tenant",
    )
    p.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--cprofile-out",
        type=Path,
        help="profile the event loop's CPU time with cProfile and write its stats here on exit "
        "(for benchmarks: the profiler slows the router down)",
    )
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    if args.max_message_mb <= 0 or args.max_concurrent_rpcs <= 0:
        raise ValueError("--max-message-mb and --max-concurrent-rpcs must be positive")
    # Credentials and keys first: a bad path fails start-up before anything is loaded.
    server_credentials = tls.server_credentials(args.tls_cert, args.tls_key)
    engine_credentials = tls.channel_credentials(
        args.engine_tls_ca, args.engine_tls_cert, args.engine_tls_key
    )
    auth = None if args.auth_keys_file is None else TenantKeys.from_file(args.auth_keys_file)
    if auth is not None:
        log.info("auth_enabled", tenants=auth.tenants, keys=auth.num_keys)
    tokenizer = TextTokenizer.from_model_dir(
        demo_model_dir() if args.model == "demo" else Path(args.model)
    )
    # Checked here, just before serve_router binds them: a taken port is named, not a bind
    # error from gRPC or the HTTP server. The public port never moves: clients expect it.
    check_port_free("--port", args.host, args.port)
    metrics_port = args.metrics_port
    if metrics_port is None:
        metrics_port = first_free_port("--metrics-port", args.host, DEFAULT_METRICS_PORT)
    elif metrics_port >= 0:
        check_port_free("--metrics-port", args.host, metrics_port)
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
            server_credentials=server_credentials,
            engine_credentials=engine_credentials,
            auth=auth,
            max_message_bytes=args.max_message_mb << 20,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            metrics_port=metrics_port,
            busy_poll=args.busy_poll,
            engine_silence_timeout_s=args.engine_silence_timeout_s,
        )
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    # The event loop thread's CPU time, not wall time: waiting in epoll is no cost.
    profiler = cProfile.Profile(time.thread_time) if args.cprofile_out else None
    try:
        if profiler is not None:
            profiler.enable()
        # uvloop: every token crosses the event loop; its callbacks cost ~10% less CPU there.
        uvloop.run(_serve(args))
    except (OSError, ValueError) as exc:
        log.error("startup_failed", error=str(exc))
        raise SystemExit(1) from exc
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.cprofile_out)


if __name__ == "__main__":
    main()
