"""What gRPC's socket poller costs one message: ping-pong round trips on one open stream.

The router sends each request, and gets each token back, as one message on a GenerateStreams
call that is already open. This times exactly that, with no router logic: a grpc.aio client on
uvloop writes a 40-byte message on a bidirectional stream, a grpc.aio server on uvloop echoes it,
and the client times write -> echo read. Client and server are separate processes, started for
each poller with GRPC_EXPERIMENTS set, since gRPC reads it once when it starts:

- `event-engine`: gRPC's default, sockets read on EventEngine threads;
- `classic`: `llmserve.common.grpc_polling.CLASSIC_POLLER`, what the router and engine run;
- `classic+busy-poll`: the classic poller with both event loops polling instead of sleeping
  (`llmserve.router.busy_poll`, the router's `--busy-poll`).

Round trips go back to back ("hot"), 1.5 ms apart ("step": one decode step, the pace of a token
stream) and 20 ms apart ("idle": the processes asleep between messages, when every thread
wake-up costs more). p50 and p90 per variant and pace.

    python benchmarks/grpc_poller.py [--messages 600] [--out-dir DIR]
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import uvloop
from result_file import RESULTS_DIR, write_result

from llmserve.common.grpc_polling import CLASSIC_POLLER
from llmserve.common.ports import ephemeral_port
from llmserve.router.busy_poll import BusyPoll

SERVICE = "llmserve.bench.Echo"
METHOD = f"/{SERVICE}/Stream"
# Variant: (GRPC_EXPERIMENTS, whether both event loops busy-poll).
VARIANTS = {
    "event-engine": ("", False),
    "classic": (CLASSIC_POLLER, False),
    "classic+busy-poll": (CLASSIC_POLLER, True),
}
PACES_S = {"hot": 0.0, "step": 0.0015, "idle": 0.02}


def _raw(message: bytes) -> bytes:
    return message


async def _serve(port: int, busy_poll: bool) -> None:
    async def echo(
        messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        with BusyPoll(enabled=busy_poll).in_flight():
            async for message in messages:
                yield message

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Stream": grpc.stream_stream_rpc_method_handler(echo, _raw, _raw)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _ping(port: int, gap_s: float, messages: int, busy_poll: bool) -> dict:
    with BusyPoll(enabled=busy_poll).in_flight():
        return await _round_trips(port, gap_s, messages)


async def _round_trips(port: int, gap_s: float, messages: int) -> dict:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await channel.channel_ready()
        call = channel.stream_stream(METHOD, request_serializer=_raw, response_deserializer=_raw)()
        payload = b"x" * 40
        rtts = []
        for _ in range(messages + 50):
            sent = time.perf_counter()
            await call.write(payload)
            await call.read()
            rtts.append((time.perf_counter() - sent) * 1e6)
            await asyncio.sleep(gap_s)
        await call.done_writing()
    deciles = statistics.quantiles(rtts[50:], n=10)
    return {"rtt_p50_us": round(statistics.median(rtts[50:]), 1),
            "rtt_p90_us": round(deciles[8], 1)}


def _measure(variant: str, gap_s: float, messages: int) -> dict:
    """Runs one server and one client process as `variant`; returns the client's figures."""
    experiments, busy_poll = VARIANTS[variant]
    env = {**os.environ, "GRPC_EXPERIMENTS": experiments}
    polling = ["--busy-poll"] if busy_poll else []
    port = ephemeral_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), *polling], env=env)
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--ping", str(port), "--gap", str(gap_s),
             "--messages", str(messages), *polling],
            env=env, check=True, capture_output=True, text=True, timeout=300)
    finally:
        server.kill()
        server.wait()
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ping", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--gap", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--busy-poll", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.messages < 2:
        parser.error(f"--messages: {args.messages}; at least 2 for a p90")
    if args.serve is not None:
        uvloop.run(_serve(args.serve, args.busy_poll))
        return
    if args.ping is not None:
        print(json.dumps(uvloop.run(_ping(args.ping, args.gap, args.messages, args.busy_poll))))
        return
    figures: dict[str, dict] = {}
    for variant in VARIANTS:
        for pace, gap_s in PACES_S.items():
            result = _measure(variant, gap_s, args.messages)
            figures.setdefault(variant, {})[pace] = result
            print(f"{variant:17s} {pace:4s}: round trip p50 {result['rtt_p50_us']:.0f} us, "
                  f"p90 {result['rtt_p90_us']:.0f} us", flush=True)
    parameters = {"messages": args.messages, "payload_bytes": 40, "gaps_s": PACES_S,
                  "variants": {k: {"grpc_experiments": e, "busy_poll": b}
                               for k, (e, b) in VARIANTS.items()}}
    print(f"wrote {write_result('grpc-poller', parameters, figures, args.out_dir)}")


if __name__ == "__main__":
    main()
