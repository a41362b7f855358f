"""How many detokenized tokens per second one router process streams to 256 concurrent clients.

Engines fast enough not to be the limit (on a GPU: one engine on the demo model), one router,
and a load generator split over several processes. Reports the tokens/s the clients received and
the router's CPU seconds per 1,000 tokens (from its rusage when it exits).

    python benchmarks/router_throughput.py [--clients 256] [--engines 1] [--processes 4]
"""

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import grpc
from result_file import write_result

from llmserve.common.launcher import start_engine, start_router
from llmserve.engine_service.demo_model import ensure_demo_model
from llmserve.v1 import common_pb2, generate_service_pb2, generate_service_pb2_grpc


async def _clients(address: str, streams: int, tokens: int, rounds: int, seed: int) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_service_pb2_grpc.GenerateServiceStub(channel)

        async def one(index: int) -> int:
            received = 0
            for r in range(rounds):
                request = generate_service_pb2.GenerateRequest(
                    prompt_token_ids=[(seed + index * 31 + r + i) % 600 + 3 for i in range(16)],
                    sampling=common_pb2.SamplingParams(temperature=0),
                    stopping=common_pb2.StoppingCriteria(max_tokens=tokens, ignore_eos=True),
                )
                async for response in stub.Generate(request):
                    received += len(response.token_ids)
                    assert response.text or response.token_ids
            return received

        return sum(await asyncio.gather(*(one(i) for i in range(streams))))


def _client_process(
    address: str,
    streams: int,
    tokens: int,
    rounds: int,
    seed: int,
    start_at: float,
    results: "multiprocessing.Queue[int]",
) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    results.put(asyncio.run(_clients(address, streams, tokens, rounds, seed)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: demo)")
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engine-args", default="--max-num-seqs 256")
    args = parser.parse_args()
    model = Path(args.model) if args.model else ensure_demo_model()
    with tempfile.TemporaryDirectory() as tmp:
        engines = [
            start_engine(model, Path(tmp), *args.engine_args.split()) for _ in range(args.engines)
        ]
        router = start_router(model, engines, Path(tmp), "--max-queue", "4096")
        try:
            context = multiprocessing.get_context("spawn")
            results: multiprocessing.Queue[int] = context.Queue()
            per_process = args.clients // args.processes
            start_at = time.time() + 3.0  # every load process connected before the clock starts
            workers = [
                context.Process(
                    target=_client_process,
                    args=(
                        router.address,
                        per_process,
                        args.tokens,
                        args.rounds,
                        p * 1000,
                        start_at,
                        results,
                    ),
                )
                for p in range(args.processes)
            ]
            for worker in workers:
                worker.start()
            received = sum(results.get(timeout=900) for _ in workers)
            elapsed = time.time() - start_at
            for worker in workers:
                worker.join()
        finally:
            router.process.terminate()
            _, _, usage = os.wait4(router.process.pid, 0)
            router.process.returncode = 0
            for engine in engines:
                engine.stop()
    tok_s = received / elapsed
    router_cpu = usage.ru_utime + usage.ru_stime
    figures = {
        "tokens": received,
        "seconds": round(elapsed, 2),
        "tok_per_s": round(tok_s),
        "router_cpu_s": round(router_cpu, 2),
        "router_user_s": round(usage.ru_utime, 2),
        "router_sys_s": round(usage.ru_stime, 2),
        "router_cpu_us_per_token": round(1e6 * router_cpu / max(received, 1), 1),
        "router_cores_busy": round(router_cpu / elapsed, 2),
    }
    path = write_result(
        f"router-throughput-{args.engines}engines",
        {
            "clients": args.clients,
            "load_processes": args.processes,
            "engines": args.engines,
            "tokens_per_request": args.tokens,
            "rounds": args.rounds,
            "prompt_tokens": 16,
            "engine_args": args.engine_args,
            "model": model.name,
            "detokenize": True,
        },
        figures,
    )
    print(
        f"router-throughput: {tok_s:,.0f} tok/s to {args.clients} clients; router CPU "
        f"{router_cpu:.1f} s ({figures['router_cores_busy']} cores busy) -> {path}"
    )


if __name__ == "__main__":
    main()
