"""`llmserve-engine`: serve one checkpoint over the internal EngineService gRPC API."""

import argparse
import asyncio
import dataclasses
import signal
from pathlib import Path

import grpc
import structlog
import uvloop
from prometheus_client import start_http_server

from llmserve.common import tls
from llmserve.common.logs import configure_logging
from llmserve.common.ports import cannot_listen, check_port_free, first_free_port
from llmserve.common.startup_heap import freeze_startup_heap
from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.demo_model import ensure_demo_model
from llmserve.engine_service.frontend.async_engine import AsyncEngine, EngineDeadError
from llmserve.engine_service.frontend.server import serve_engine

log = structlog.get_logger(__name__)
DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9401


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmserve-engine", description=__doc__)
    p.add_argument(
        "--model",
        default="demo",
        help="checkpoint directory, or 'demo' for the embedded demo model",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"gRPC port (default {DEFAULT_PORT}, or the next free one; 0 = any)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help=f"/metrics port (default {DEFAULT_METRICS_PORT}, or the next free one; -1 = off)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="KV blocks in the pool (default: what fits in --kv-cache-memory-gb)",
    )
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    p.add_argument("--max-tokens-default", type=int, default=256)
    backends = ["auto", "torch", "triton", "flash_attn"]
    p.add_argument("--attention-backend", default="auto", choices=backends,
                   help="auto = triton on CUDA, torch on the CPU; flash_attn = flash-attn 4")
    p.add_argument("--prefill-backend", default=None, choices=backends,
                   help="override --attention-backend for prefill/mixed steps")
    p.add_argument("--decode-backend", default=None, choices=backends,
                   help="override --attention-backend for pure-decode steps")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of the GPU for weights, activations and the KV cache")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs at all")
    p.add_argument("--cuda-graph-max-bs", type=int, default=256,
                   help="largest decode batch captured in a CUDA graph (capped at max-num-seqs)")
    p.add_argument("--cuda-graph-max-tokens", type=int, default=2048,
                   help="largest prefill/mixed step, in tokens, captured in a CUDA graph "
                        "(capped at max-num-batched-tokens; 0 = none)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks (GPUs, or CPU processes) the model is split over; must divide "
                        "its KV heads")
    p.add_argument("--distributed", action="store_true",
                   help="run through torch.distributed and the rank step channel even at "
                        "--tensor-parallel-size 1 (to measure that path)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="read each step's tokens while the next step runs (default: on CUDA)")
    p.add_argument("--kv-events", action=argparse.BooleanOptionalAction, default=True,
                   help="publish prefix-cache changes on WatchKvEvents (routers without them "
                        "fall back to their own routing history)")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM); none = plaintext")
    p.add_argument("--tls-key", type=Path, help="private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path,
                   help="demand client certificates signed by this CA (mutual TLS)")
    p.add_argument("--health-port", type=int, default=-1,
                   help="also serve gRPC health alone, plaintext, here (probes); -1 = off")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM, how long requests in flight may take to finish")
    p.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    p.add_argument("--log-level", default="info")
    # Test only, hence hidden: GetInfo reports this seed while blocks are still hashed with the
    # real one, so routers' hash self-check can be shown to catch an engine that misreports.
    p.add_argument("--test-reported-hash-seed", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _start_metrics(host: str, port: int | None) -> None:
    """Serves /metrics on `port`, or on the first free one from DEFAULT_METRICS_PORT (None)."""
    option = "--metrics-port"
    chosen = first_free_port(option, host, DEFAULT_METRICS_PORT) if port is None else port
    try:
        server, _ = start_http_server(chosen, addr=host)
    except OSError as exc:
        raise cannot_listen(option, host, chosen, exc.strerror or str(exc)) from exc
    log.info("metrics_serving", port=server.server_port, path="/metrics")


async def _serve(args: argparse.Namespace) -> None:
    # Before the model loads: a bad certificate path or a taken port fails in a second, not
    # after minutes.
    credentials = tls.server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    if args.port is not None:
        check_port_free("--port", args.host, args.port)
    if args.health_port >= 0:
        check_port_free("--health-port", args.host, args.health_port)
    if args.metrics_port is None or args.metrics_port >= 0:
        _start_metrics(args.host, args.metrics_port)
    model = ensure_demo_model() if args.model == "demo" else Path(args.model)
    config = EngineConfig(
        model=model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=int(args.kv_cache_memory_gb * (1 << 30)),
        max_tokens_default=args.max_tokens_default,
        attention_backend=args.attention_backend,
        prefill_backend=args.prefill_backend,
        decode_backend=args.decode_backend,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        cuda_graph_max_bs=args.cuda_graph_max_bs,
        cuda_graph_max_tokens=args.cuda_graph_max_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        distributed=args.distributed,
        async_scheduling=args.async_scheduling,
    )
    engine = AsyncEngine(config, args.log_format, args.log_level)
    info = await engine.start()
    freeze_startup_heap()
    if args.test_reported_hash_seed is not None:
        log.warning(
            "test_reported_hash_seed",
            reported=args.test_reported_hash_seed,
            actual=info.block_hash_seed,
        )
        info = dataclasses.replace(info, block_hash_seed=args.test_reported_hash_seed)
    # Searched only now, just before the bind: engines started together each load a model
    # first, and one that searched before loading could pick the port another then binds.
    port = args.port
    if port is None:
        port = first_free_port("--port", args.host, DEFAULT_PORT)
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        clean = await serve_engine(engine, info, args.host, port, args.drain_timeout_s,
                                   credentials, args.health_port, args.kv_events)
    except BaseException:
        engine.stop()
        raise
    log.info("stopped", clean=clean)
    if not clean:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        # uvloop: every token crosses the event loop; its callbacks cost ~10% less CPU there.
        uvloop.run(_serve(args))
    except (OSError, ValueError, grpc.RpcError, EngineDeadError) as exc:
        log.error("startup_failed", error=str(exc))
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
