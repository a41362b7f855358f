"""W5 `failover` in docs/benchmarks.md: an engine dies mid-load; streams must carry on exactly.

Three demo engines behind one router; 300 greedy streaming requests (W1's prompts cut to 256
tokens, 128 output tokens), 24 in flight. An undisturbed run first gives each request's tokens;
then, on fresh engines, one engine is SIGKILLed when a third of the requests have finished.
W1's token ids are folded into the model's vocabulary (the demo model has fewer than 10,000).

    python benchmarks/failover.py
"""

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import grpc
from harness import start_engine, start_router
from result_file import write_result
from w1_draws import w1_requests

from llmserve.engine_service.demo_model import ensure_demo_model
from llmserve.v1 import common_pb2, generate_service_pb2, generate_service_pb2_grpc

NUM_REQUESTS, PROMPT_LEN, OUTPUT_LEN, IN_FLIGHT = 300, 256, 128, 24


def w5_prompts(vocab: int) -> list[list[int]]:
    prompts, _ = w1_requests()
    cut = [[t % vocab for t in p[:PROMPT_LEN]] for p in prompts]
    return [cut[i % len(cut)] for i in range(NUM_REQUESTS)]


async def run_load(router: str, prompts: list[list[int]], on_progress) -> list[dict]:
    results: list[dict] = [{} for _ in prompts]
    queue = list(range(len(prompts)))
    done = 0
    async with grpc.aio.insecure_channel(router) as channel:
        stub = generate_service_pb2_grpc.GenerateServiceStub(channel)

        async def worker() -> None:
            nonlocal done
            while queue:
                index = queue.pop(0)
                request = generate_service_pb2.GenerateRequest(
                    prompt_token_ids=prompts[index],
                    sampling=common_pb2.SamplingParams(temperature=0),
                    stopping=common_pb2.StoppingCriteria(max_tokens=OUTPUT_LEN, ignore_eos=True),
                    request_id=f"w5-{index}",
                )
                tokens: list[int] = []
                try:
                    async for response in stub.Generate(request, timeout=600):
                        tokens.extend(response.token_ids)
                    results[index] = {"tokens": tokens, "status": "OK"}
                except grpc.aio.AioRpcError as exc:
                    results[index] = {"tokens": tokens, "status": exc.code().name}
                done += 1
                on_progress(done)

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return results


def cluster_run(model: Path, prompts: list[list[int]], kill: bool) -> tuple[list[dict], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        engines = [
            start_engine(model, work, "--num-kv-blocks", "2048", "--max-num-seqs", "32")
            for _ in range(3)
        ]
        router = start_router(model, engines, work)
        killed: dict = {}

        def on_progress(done: int) -> None:
            if kill and not killed and done >= NUM_REQUESTS // 3:
                victim = engines[0]
                victim.process.kill()
                killed.update(engine=victim.address, at=time.monotonic(), after_done=done)

        try:
            results = asyncio.run(run_load(router.address, prompts, on_progress))
            if killed:
                left = [
                    e
                    for e in router.log_events()
                    if e.get("event") == "engine_left" and e.get("engine") == killed["engine"]
                ]
                killed["router_noticed"] = bool(left)
                killed["failovers"] = sum(
                    1 for e in router.log_events() if e.get("event") == "engine_failed_over"
                )
            return results, killed
        finally:
            router.stop()
            for engine in engines:
                engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: demo)")
    args = parser.parse_args()
    model = Path(args.model) if args.model else ensure_demo_model()
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts = w5_prompts(vocab)
    reference, _ = cluster_run(model, prompts, kill=False)
    disturbed, killed = cluster_run(model, prompts, kill=True)
    exact = sum(
        1
        for r, d in zip(reference, disturbed, strict=True)
        if d["status"] == "OK" and d["tokens"] == r["tokens"]
    )
    failed: dict[str, int] = {}
    for d in disturbed:
        if d["status"] != "OK":
            failed[d["status"]] = failed.get(d["status"], 0) + 1
    duplicated_or_lost = sum(
        abs(len(d["tokens"]) - len(r["tokens"]))
        for r, d in zip(reference, disturbed, strict=True)
        if d["status"] == "OK"
    )
    figures = {
        "requests": NUM_REQUESTS,
        "exact": exact,
        "failed": failed,
        "token_count_mismatches": duplicated_or_lost,
        "reference_all_ok": all(r["status"] == "OK" for r in reference),
        "killed": killed,
    }
    path = write_result(
        "W5",
        {
            "engines": 3,
            "prompt_len": PROMPT_LEN,
            "output_len": OUTPUT_LEN,
            "in_flight": IN_FLIGHT,
            "model": model.name,
            "prompts": "W1 draws cut to 256 tokens, ids mod vocab",
        },
        figures,
    )
    print(
        f"W5: {exact}/{NUM_REQUESTS} exact, failed {failed}, token count mismatches "
        f"{duplicated_or_lost}, killed {killed} -> {path}"
    )


if __name__ == "__main__":
    main()
