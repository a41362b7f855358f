"""The floor under the router's cost: what one extra Python gRPC hop adds to a stream's first
message, with no router logic at all.

Three loopback servers on this host, all grpc.aio on uvloop as the router and engine run:
- `backend`: a unary-stream method that answers at once with two small messages (an engine
  that has its first token ready);
- `proxy`: a pass-through that opens the same call on the backend and relays what comes back
  (a router that does no work);
- `proxy-sync`: the same pass-through on gRPC's thread-pool server and blocking stub.

One client sends calls one at a time, with a pause between them (0, 10 and 250 ms: back to back,
W3's pace, W2's 4 req/s), each with a 2,000-byte request. It reports the p50 of request sent ->
the backend's handler starting ("way in") and of request sent -> first message ("first
message"), straight to the backend and through each proxy. The proxy's added first-message
latency is the least any Python gRPC router in front of an engine can add to TTFT on this host.

    python benchmarks/grpc_hop.py [--calls 150]
"""

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures

import grpc
import uvloop
from result_file import write_result

from llmserve.common.ports import ephemeral_port

SERVICE = "llmserve.bench.Hop"
METHOD = f"/{SERVICE}/Stream"
STAMP = f"/{SERVICE}/LastStart"
GAPS_S = (0.0, 0.01, 0.25)


def _raw(message: bytes) -> bytes:
    return message


def _handlers(stream: Callable, last_start: Callable | None) -> grpc.GenericRpcHandler:
    methods = {"Stream": grpc.unary_stream_rpc_method_handler(
        stream, request_deserializer=_raw, response_serializer=_raw)}
    if last_start is not None:
        methods["LastStart"] = grpc.unary_unary_rpc_method_handler(
            last_start, request_deserializer=_raw, response_serializer=_raw)
    return grpc.method_handlers_generic_handler(SERVICE, methods)


async def _serve_async(port: int, stream: Callable, last_start: Callable | None) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handlers(stream, last_start),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def run_backend(port: int) -> None:
    """Answers each call with two 20-byte messages; remembers when the last call started."""
    started = {"t": 0.0}

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        started["t"] = time.time()
        yield b"x" * 20
        yield b"y" * 20

    async def last_start(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return json.dumps(started["t"]).encode()

    uvloop.run(_serve_async(port, stream, last_start))


def run_proxy(port: int, backend: str) -> None:
    """Relays each call to the backend over one long-lived channel, as the router does."""

    async def main() -> None:
        channel = grpc.aio.insecure_channel(backend)
        call = channel.unary_stream(METHOD, request_serializer=_raw, response_deserializer=_raw)

        async def stream(request: bytes, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[bytes]:
            async for message in call(request):
                yield message

        await _serve_async(port, stream, None)

    uvloop.run(main())


def run_proxy_sync(port: int, backend: str) -> None:
    """The same relay on the thread-pool server and a blocking stub."""
    call = grpc.insecure_channel(backend).unary_stream(
        METHOD, request_serializer=_raw, response_deserializer=_raw)

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from call(request)

    server = grpc.server(futures.ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((_handlers(stream, None),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


async def measure(target: str, backend: str, gap_s: float, calls: int) -> dict:
    """p50 way in and first message over `calls` sequential calls (the first 20 untimed)."""
    async with grpc.aio.insecure_channel(target) as channel, \
            grpc.aio.insecure_channel(backend) as stamps:
        call = channel.unary_stream(METHOD, request_serializer=_raw, response_deserializer=_raw)
        last_start = stamps.unary_unary(STAMP, request_serializer=_raw,
                                        response_deserializer=_raw)
        way_in, first = [], []
        for _ in range(calls + 20):
            sent, sent_wall = time.perf_counter(), time.time()
            first_at = None
            async for _message in call(b"r" * 2000, timeout=60):
                first_at = first_at or time.perf_counter()
            assert first_at is not None
            way_in.append(json.loads(await last_start(b"")) - sent_wall)
            first.append(first_at - sent)
            await asyncio.sleep(gap_s)
    return {"way_in_p50_ms": round(statistics.median(way_in[20:]) * 1e3, 3),
            "first_message_p50_ms": round(statistics.median(first[20:]) * 1e3, 3)}


def _wait_ready(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=150)
    args = parser.parse_args()
    ports = {name: ephemeral_port() for name in ("backend", "proxy", "proxy-sync")}
    backend = f"127.0.0.1:{ports['backend']}"
    context = multiprocessing.get_context("spawn")
    servers = [context.Process(target=run_backend, args=(ports["backend"],), daemon=True),
               context.Process(target=run_proxy, args=(ports["proxy"], backend), daemon=True),
               context.Process(target=run_proxy_sync, args=(ports["proxy-sync"], backend),
                               daemon=True)]
    for server in servers:
        server.start()
    try:
        for port in ports.values():
            _wait_ready(f"127.0.0.1:{port}")
        figures: dict[str, dict] = {}
        for gap in GAPS_S:
            row = {name: uvloop.run(measure(f"127.0.0.1:{port}", backend, gap, args.calls))
                   for name, port in ports.items()}
            for name in ("proxy", "proxy-sync"):
                row[f"{name}_adds_to_first_message_ms"] = round(
                    row[name]["first_message_p50_ms"] - row["backend"]["first_message_p50_ms"],
                    3)
            figures[f"gap_{gap * 1e3:.0f}ms"] = row
            print(f"gap {gap * 1e3:.0f} ms: direct first message "
                  f"{row['backend']['first_message_p50_ms']:.3f} ms; a pass-through proxy adds "
                  f"{row['proxy_adds_to_first_message_ms']:.3f} ms (aio), "
                  f"{row['proxy-sync_adds_to_first_message_ms']:.3f} ms (thread pool)")
    finally:
        for server in servers:
            server.kill()
    parameters = {"calls": args.calls, "warmup_calls": 20, "request_bytes": 2000,
                  "response": "two 20-byte messages", "gaps_s": list(GAPS_S),
                  "servers": "grpc.aio on uvloop (backend, proxy); grpc.server thread pool "
                             "(proxy-sync); loopback TCP"}
    print(f"wrote {write_result('grpc-hop', parameters, figures)}")


if __name__ == "__main__":
    main()
