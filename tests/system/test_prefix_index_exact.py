"""The router's prefix index holds exactly what the engines hold, and its memory stays flat.

10,000 short random prompts sharing prefixes go through one router to four engines whose KV
caches are far too small for them, so blocks are stored, reused and evicted all the time.
"""

import asyncio
import json
import random
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from llmserve.clients import AsyncLLMClient
from llmserve.v1 import engine_service_pb2, engine_service_pb2_grpc

NUM_ENGINES = 4
NUM_REQUESTS = 10_000
CONCURRENCY = 48
BLOCK_SIZE = 4
# Each prompt block is one of these, so prompts share prefixes at every depth.
BLOCK_CHOICES = [[10 + 4 * i + j for j in range(BLOCK_SIZE)] for i in range(12)]


def random_prompt(rng: random.Random) -> list[int]:
    """2 to 6 full blocks: a few hot prefixes, a long tail of distinct ones."""
    blocks = rng.randint(2, 6)
    return [token for _ in range(blocks) for token in rng.choice(BLOCK_CHOICES)]


def engine_cached_hashes(address: str) -> set[int]:
    """The engine's own view of its prefix cache: the snapshot opening WatchKvEvents."""
    with grpc.insecure_channel(address) as channel:
        stream = engine_service_pb2_grpc.EngineServiceStub(channel).WatchKvEvents(
            engine_service_pb2.WatchKvEventsRequest(), timeout=10
        )
        snapshot = next(stream)
        stream.cancel()
    assert snapshot.snapshot
    return set(snapshot.block_hashes_stored)


def index_sizes(metrics_port: int) -> tuple[float, dict[str, float]]:
    """The router's index: distinct hashes, and blocks per engine."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total, per_engine = -1.0, {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llmserve_router_prefix_index_blocks":
                total = sample.value
            elif sample.name == "llmserve_router_prefix_index_engine_blocks":
                per_engine[sample.labels["engine"]] = sample.value
    return total, per_engine


def resident_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def send(address: str, prompts: list[list[int]]) -> None:
    async with AsyncLLMClient(address) as client:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(prompt: list[int]) -> None:
            async with gate:
                completion = await client.generate_text(
                    prompt_token_ids=prompt, max_tokens=1, ignore_eos=True, timeout=60
                )
                assert completion.finish_reason == "length"

        await asyncio.gather(*(one(p) for p in prompts))


def test_index_equals_the_engines_caches_after_10000_requests(
    tiny_checkpoint, start_engine, start_router, unused_port
) -> None:
    model = tiny_checkpoint("qwen3")
    engine_args = ("--block-size", str(BLOCK_SIZE), "--num-kv-blocks", "96")
    with ThreadPoolExecutor(NUM_ENGINES) as pool:
        engines = list(pool.map(lambda _: start_engine(model, *engine_args), range(NUM_ENGINES)))
    metrics_port = unused_port()
    router = start_router(model, engines, "--metrics-port", str(metrics_port))
    rng = random.Random(7)
    prompts = [random_prompt(rng) for _ in range(NUM_REQUESTS)]

    started = time.monotonic()
    asyncio.run(send(router.address, prompts[: NUM_REQUESTS // 2]))
    halfway_kib = resident_kib(router.process.pid)
    asyncio.run(send(router.address, prompts[NUM_REQUESTS // 2 :]))
    end_kib = resident_kib(router.process.pid)
    elapsed = time.monotonic() - started

    # Every engine's last KV events may still be on their way: exact once they arrived.
    deadline = time.monotonic() + 10
    while True:
        cached = {e.address: engine_cached_hashes(e.address) for e in engines}
        total, per_engine = index_sizes(metrics_port)
        expected = {address: len(hashes) for address, hashes in cached.items()}
        if per_engine == expected and total == len(set().union(*cached.values())):
            break
        assert time.monotonic() < deadline, (total, per_engine, expected)
        time.sleep(0.2)
    assert min(expected.values()) > 0, expected
    assert end_kib < 1.10 * halfway_kib, (halfway_kib, end_kib)

    details = json.loads(
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=10).read()
    )
    # Under load and constant eviction, no correct engine is taken for a hash mismatch.
    assert {e["prefix_routing"] for e in details["engines"]} == {"ok"}
    assert not any(e.get("event") == "prefix_hash_mismatch" for e in router.log_events())
    print(
        f"{NUM_REQUESTS} requests in {elapsed:.1f} s; index {total:.0f} distinct blocks, "
        f"per engine {sorted(expected.values())}; router RSS {halfway_kib} KiB at half, "
        f"{end_kib} KiB at the end"
    )
