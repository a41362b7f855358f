"""W4 `prefix` and W4h `hot-prefix` in docs/benchmarks.md: prefix-aware routing over four engines.

Four demo engines (KV cache capped at 16,384 tokens each) behind one router; each policy gets
fresh engines. Reports per policy: prefix-cache hit rate, TTFT mean/p90, total time, the share
of requests each engine served, and (W4h) how many engines ended up holding the hot prefix.

    python benchmarks/routing.py --workload W4 --policies prefix round_robin
"""

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from harness import ServerProcess, start_engine, start_router
from result_file import write_result

from llmserve.common.block_hash import hash_full_blocks
from llmserve.engine_service.demo_model import ensure_demo_model
from llmserve.v1 import (
    common_pb2,
    engine_service_pb2,
    engine_service_pb2_grpc,
    generate_service_pb2,
    generate_service_pb2_grpc,
)

NUM_ENGINES = 4
KV_TOKENS_PER_ENGINE = 16_384
BLOCK_SIZE = 16
PREFIX_LEN, SUFFIX_LEN, OUTPUT_LEN = 1024, 64, 32


def w4_requests(vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """32 prefixes x 16 requests, shuffled with seed 0. Returns (prompts, prefixes)."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(3, vocab) for _ in range(PREFIX_LEN)] for _ in range(32)]
    prompts = [
        p + [rng.randrange(3, vocab) for _ in range(SUFFIX_LEN)]
        for p in prefixes
        for _ in range(16)
    ]
    rng.shuffle(prompts)
    return prompts, prefixes


def w4h_requests(vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """512 requests: half share one hot prefix, half spread over 31 cold ones (seed 0)."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(3, vocab) for _ in range(PREFIX_LEN)] for _ in range(32)]
    chosen = [prefixes[0]] * 256 + [prefixes[1 + i % 31] for i in range(256)]
    prompts = [p + [rng.randrange(3, vocab) for _ in range(SUFFIX_LEN)] for p in chosen]
    rng.shuffle(prompts)
    return prompts, prefixes


async def run_load(router: str, prompts: list[list[int]], in_flight: int) -> list[dict]:
    """Sends every prompt with `in_flight` concurrent streams; returns per-request records."""
    records: list[dict] = []
    queue = list(enumerate(prompts))
    async with grpc.aio.insecure_channel(router) as channel:
        stub = generate_service_pb2_grpc.GenerateServiceStub(channel)

        async def worker() -> None:
            while queue:
                index, prompt = queue.pop(0)
                request = generate_service_pb2.GenerateRequest(
                    prompt_token_ids=prompt,
                    sampling=common_pb2.SamplingParams(temperature=0),
                    stopping=common_pb2.StoppingCriteria(max_tokens=OUTPUT_LEN, ignore_eos=True),
                    request_id=f"w4-{index}",
                )
                sent = time.perf_counter()
                ttft = None
                async for response in stub.Generate(request):
                    if ttft is None and response.token_ids:
                        ttft = time.perf_counter() - sent
                    if response.finish_reason:
                        records.append(
                            {
                                "ttft": ttft,
                                "prompt": len(prompt),
                                "cached": response.usage.cached_prompt_tokens,
                                "completion": response.usage.completion_tokens,
                            }
                        )

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return records


def engine_shares(router: ServerProcess, engines: list[ServerProcess]) -> dict[str, float]:
    routed = [e["engine"] for e in router.log_events() if e.get("event") == "request_routed"]
    return {e.address: round(routed.count(e.address) / max(len(routed), 1), 3) for e in engines}


def holders_of(prefix: list[int], engines: list[ServerProcess]) -> int:
    """How many engines hold every full block of `prefix` in their prefix cache now."""
    wanted = set(hash_full_blocks(prefix, BLOCK_SIZE, 0))
    count = 0
    for engine in engines:
        with grpc.insecure_channel(engine.address) as channel:
            stub = engine_service_pb2_grpc.EngineServiceStub(channel)
            snapshot = next(iter(stub.WatchKvEvents(engine_service_pb2.WatchKvEventsRequest())))
        count += wanted <= set(snapshot.block_hashes_stored)
    return count


def run_policy(
    model: Path, policy: str, prompts: list[list[int]], hot: list[int] | None, in_flights: list[int]
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        engines = [
            start_engine(
                model,
                work,
                "--num-kv-blocks",
                str(KV_TOKENS_PER_ENGINE // BLOCK_SIZE),
                "--block-size",
                str(BLOCK_SIZE),
                "--max-num-seqs",
                "32",
            )
            for _ in range(NUM_ENGINES)
        ]
        router = start_router(model, engines, work, "--routing-policy", policy)
        try:
            result: dict = {"policy": policy, "runs": []}
            for in_flight in in_flights:
                started = time.perf_counter()
                records = asyncio.run(run_load(router.address, prompts, in_flight))
                total = time.perf_counter() - started
                ttfts = sorted(r["ttft"] for r in records)
                result["runs"].append(
                    {
                        "in_flight": in_flight,
                        "completed": len(records),
                        "hit_rate": round(
                            sum(r["cached"] for r in records) / sum(r["prompt"] for r in records), 4
                        ),
                        "ttft_mean_s": round(statistics.fmean(ttfts), 4),
                        "ttft_p90_s": round(ttfts[int(0.9 * (len(ttfts) - 1))], 4),
                        "total_s": round(total, 2),
                    }
                )
            result["engine_share"] = engine_shares(router, engines)
            if hot is not None:
                result["hot_prefix_holders"] = holders_of(hot, engines)
            return result
        finally:
            router.stop()
            for engine in engines:
                engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["W4", "W4h"], default="W4")
    parser.add_argument("--policies", nargs="+", default=["prefix", "round_robin"])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: demo)")
    args = parser.parse_args()
    model = Path(args.model) if args.model else ensure_demo_model()
    vocab = int(__import__("json").loads((model / "config.json").read_text())["vocab_size"])
    if args.workload == "W4":
        prompts, _ = w4_requests(vocab)
        hot, in_flights = None, [32]
    else:
        prompts, prefixes = w4h_requests(vocab)
        hot, in_flights = prefixes[0], [32, 64]
    ideal = (
        (32 * 15 * PREFIX_LEN) / (512 * (PREFIX_LEN + SUFFIX_LEN))
        if args.workload == "W4"
        else None
    )
    results = [run_policy(model, policy, prompts, hot, in_flights) for policy in args.policies]
    figures = {"policies": results, "ideal_hit_rate": ideal}
    path = write_result(
        args.workload,
        {
            "engines": NUM_ENGINES,
            "kv_tokens_per_engine": KV_TOKENS_PER_ENGINE,
            "prefix_len": PREFIX_LEN,
            "suffix_len": SUFFIX_LEN,
            "output_len": OUTPUT_LEN,
            "requests": len(prompts),
            "in_flight": in_flights,
            "model": model.name,
        },
        figures,
    )
    for result in results:
        for run in result["runs"]:
            print(
                f"{args.workload} {result['policy']:>11} x{run['in_flight']}: "
                f"hit {run['hit_rate']:.1%} ttft mean {run['ttft_mean_s'] * 1000:.0f} ms "
                f"p90 {run['ttft_p90_s'] * 1000:.0f} ms total {run['total_s']:.1f} s "
                f"share {result['engine_share']} holders {result.get('hot_prefix_holders')}"
            )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
