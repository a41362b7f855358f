"""Overload with priorities (the router issue's bar): critical requests keep their time to first
token while batch work beyond what the engines hold is queued or shed, never silently.

One demo engine (--max-num-seqs 8) behind a router (--max-queue 32). First, critical requests
alone (the unloaded TTFT); then the same critical requests, one every 0.25 s, while 100 clients
flood batch-priority requests with a 30 s deadline.

    python benchmarks/priority.py
"""

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import grpc
from harness import start_engine, start_router
from result_file import write_result

from llmserve.engine_service.demo_model import ensure_demo_model
from llmserve.v1 import common_pb2, generate_service_pb2, generate_service_pb2_grpc

CRITICAL_REQUESTS, BATCH_REQUESTS, BATCH_CLIENTS, BATCH_DEADLINE_S = 20, 300, 100, 30.0


def request(index: int, priority: int, max_tokens: int) -> generate_service_pb2.GenerateRequest:
    prompt = [(7 * index + i) % 600 + 3 for i in range(32)]
    return generate_service_pb2.GenerateRequest(
        prompt_token_ids=prompt,
        priority=priority,
        request_id=f"p{priority}-{index}",
        sampling=common_pb2.SamplingParams(temperature=0),
        stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
    )


async def timed(stub, message, deadline: float | None) -> dict:
    sent = time.perf_counter()
    ttft = None
    call = stub.Generate(message, timeout=deadline)
    try:
        async for response in call:
            if ttft is None and response.token_ids:
                ttft = time.perf_counter() - sent
        return {"status": "OK", "ttft": ttft, "elapsed": time.perf_counter() - sent}
    except grpc.aio.AioRpcError as exc:
        metadata = dict(await call.initial_metadata() or ())
        return {
            "status": exc.code().name,
            "elapsed": time.perf_counter() - sent,
            "retry_after_ms": metadata.get("retry-after-ms"),
        }


def p90(values: list[float]) -> float:
    values = sorted(values)
    return values[int(0.9 * (len(values) - 1))]


async def scenario(address: str) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_service_pb2_grpc.GenerateServiceStub(channel)
        await timed(stub, request(999, common_pb2.PRIORITY_CRITICAL, 4), None)  # warm-up
        unloaded = [
            await timed(stub, request(i, common_pb2.PRIORITY_CRITICAL, 8), None)
            for i in range(CRITICAL_REQUESTS)
        ]
        queue = list(range(BATCH_REQUESTS))
        batch_results: list[dict] = []

        async def batch_client() -> None:
            while queue:
                index = queue.pop(0)
                batch_results.append(
                    await timed(
                        stub, request(index, common_pb2.PRIORITY_BATCH, 64), BATCH_DEADLINE_S
                    )
                )

        flood = [asyncio.create_task(batch_client()) for _ in range(BATCH_CLIENTS)]
        await asyncio.sleep(2.0)  # let the overload build up
        loaded = []
        for i in range(CRITICAL_REQUESTS):
            loaded.append(
                asyncio.create_task(
                    timed(stub, request(100 + i, common_pb2.PRIORITY_CRITICAL, 8), None)
                )
            )
            await asyncio.sleep(0.25)
        loaded_results = await asyncio.gather(*loaded)
        await asyncio.gather(*flood)
    statuses: dict[str, int] = {}
    for result in batch_results:
        statuses[result["status"]] = statuses.get(result["status"], 0) + 1
    shed = [r for r in batch_results if r["status"] == "RESOURCE_EXHAUSTED"]
    return {
        "critical_unloaded_ttft_p90_s": round(p90([r["ttft"] for r in unloaded]), 4),
        "critical_loaded_ttft_p90_s": round(p90([r["ttft"] for r in loaded_results]), 4),
        "critical_loaded_failed": sum(r["status"] != "OK" for r in loaded_results),
        "batch_outcomes": statuses,
        "batch_shed_without_retry_hint": sum(r["retry_after_ms"] is None for r in shed),
        "batch_past_deadline": sum(r["elapsed"] > BATCH_DEADLINE_S + 0.5 for r in batch_results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: demo)")
    args = parser.parse_args()
    model = Path(args.model) if args.model else ensure_demo_model()
    with tempfile.TemporaryDirectory() as tmp:
        engine = start_engine(model, Path(tmp), "--max-num-seqs", "8", "--num-kv-blocks", "2048")
        router = start_router(model, [engine], Path(tmp), "--max-queue", "32")
        try:
            figures = asyncio.run(scenario(router.address))
        finally:
            router.stop()
            engine.stop()
    figures["ratio"] = round(
        figures["critical_loaded_ttft_p90_s"] / figures["critical_unloaded_ttft_p90_s"], 2
    )
    path = write_result(
        "priority-overload",
        {
            "engine_max_num_seqs": 8,
            "router_max_queue": 32,
            "critical_requests": CRITICAL_REQUESTS,
            "batch_requests": BATCH_REQUESTS,
            "batch_clients": BATCH_CLIENTS,
            "batch_deadline_s": BATCH_DEADLINE_S,
            "model": model.name,
        },
        figures,
    )
    print(
        f"priority-overload: critical TTFT p90 {figures['critical_unloaded_ttft_p90_s'] * 1000:.0f}"
        f" ms unloaded, {figures['critical_loaded_ttft_p90_s'] * 1000:.0f} ms under overload "
        f"(x{figures['ratio']}); batch {figures['batch_outcomes']} -> {path}"
    )


if __name__ == "__main__":
    main()
