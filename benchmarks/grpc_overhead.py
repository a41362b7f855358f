"""Offline generation vs. the same requests as concurrent gRPC streams to one engine process.

The engine-core issue's bar: with 64 streams, the gRPC path reaches >= 90 % of offline
throughput. Runs on the CPU with the demo model (or any checkpoint with --model).

On the CPU the serving engine's core process computes with all cores but one (the gRPC frontend
and this load generator need the last one), so the headline ratio compares it with offline
generation on the same number of compute threads; offline on every core is reported beside it.

    python benchmarks/grpc_overhead.py [--streams 64] [--max-tokens 64]
"""

import argparse
import asyncio
import os
import random
import tempfile
import time
from pathlib import Path

import grpc
import torch
from harness import start_engine
from result_file import write_result

from llmserve.engine_service.demo_model import ensure_demo_model
from llmserve.engine_service.llm import LLM
from llmserve.engine_service.seam import SamplingOptions
from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc


def workload(streams: int, max_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 600) for _ in range(rng.randrange(32, 129))] for _ in range(streams)]


def offline(model: Path, prompts: list[list[int]], max_tokens: int, settings: dict) -> float:
    llm = LLM(model, device="cpu", **settings)
    options = SamplingOptions(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([[5, 6, 7]], SamplingOptions(temperature=0, max_tokens=4), use_tqdm=False)
    started = time.perf_counter()
    results = llm.generate(prompts, options, use_tqdm=False)
    elapsed = time.perf_counter() - started
    assert all(len(r.token_ids) == max_tokens for r in results)
    return len(prompts) * max_tokens / elapsed


async def _streams(address: str, prompts: list[list[int]], max_tokens: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)

        async def one(prompt: list[int], limit: int) -> int:
            request = engine_service_pb2.EngineServiceGenerateRequest(
                prompt_token_ids=prompt,
                sampling=common_pb2.SamplingParams(temperature=0.0),
                stopping=common_pb2.StoppingCriteria(max_tokens=limit, ignore_eos=True),
            )
            return sum([len(r.token_ids) async for r in stub.Generate(request)])

        await one([5, 6, 7], 4)
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(p, max_tokens) for p in prompts))
        elapsed = time.perf_counter() - started
    assert all(c == max_tokens for c in counts)
    return sum(counts) / elapsed


def through_grpc(model: Path, prompts: list[list[int]], max_tokens: int, settings: dict) -> float:
    flags = [
        f for key, value in settings.items() for f in (f"--{key.replace('_', '-')}", str(value))
    ]
    with tempfile.TemporaryDirectory() as workdir:
        engine = start_engine(model, Path(workdir), "--device", "cpu", *flags)
        try:
            return asyncio.run(_streams(engine.address, prompts, max_tokens))
        finally:
            engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: demo)")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = Path(args.model) if args.model else ensure_demo_model()
    settings = {"max_num_seqs": args.streams, "num_kv_blocks": 2048, "max_num_batched_tokens": 2048}
    prompts = workload(args.streams, args.max_tokens)
    all_cores = torch.get_num_threads()
    serving_threads = max(1, (os.cpu_count() or 1) - 1)
    offline_all, offline_runs, grpc_runs = [], [], []
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all alike
        torch.set_num_threads(all_cores)
        offline_all.append(offline(model, prompts, args.max_tokens, settings))
        torch.set_num_threads(serving_threads)
        offline_runs.append(offline(model, prompts, args.max_tokens, settings))
        grpc_runs.append(through_grpc(model, prompts, args.max_tokens, settings))
    best_offline, best_grpc = max(offline_runs), max(grpc_runs)
    ratio = best_grpc / best_offline
    path = write_result(
        "grpc-overhead",
        {
            "model": model.name,
            "streams": args.streams,
            "max_tokens": args.max_tokens,
            "prompt_tokens": "32..128 random",
            "repeats": args.repeats,
            **settings,
            "cpu_cores": os.cpu_count(),
            "compute_threads": serving_threads,
        },
        {
            "offline_tok_s": offline_runs,
            "grpc_tok_s": grpc_runs,
            "offline_all_cores_tok_s": offline_all,
            "grpc_over_offline_all_cores": round(best_grpc / max(offline_all), 3),
            "best_offline_tok_s": round(best_offline, 1),
            "best_grpc_tok_s": round(best_grpc, 1),
            "grpc_over_offline": round(ratio, 3),
        },
    )
    print(
        f"grpc-overhead: offline {best_offline:,.0f} tok/s ({serving_threads} threads; "
        f"{max(offline_all):,.0f} on {all_cores}), gRPC x{args.streams} {best_grpc:,.0f} tok/s, "
        f"ratio {ratio:.1%} -> {path}"
    )


if __name__ == "__main__":
    main()
