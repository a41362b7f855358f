"""How many detokenized tokens per second one router process streams to 256 concurrent clients.

Engines fast enough not to be the limit (on a GPU: one engine on the demo model), one router,
and a load generator split over several processes. Reports the tokens/s the clients received,
how many tokens each response carried, and the router's CPU time per token and per response
while the clients ran (from /proc: start-up excluded), split by thread. `--profile` also runs the
router under cProfile and records its top functions ("where the CPU time goes"); a profiled run's
timings are inflated by the profiler.

    python benchmarks/router_throughput.py [--clients 256] [--engines 1] [--processes 4]
        [--profile] [--out DIR]
"""

import argparse
import asyncio
import multiprocessing
import os
import pstats
import tempfile
import time
from pathlib import Path

import grpc
from harness import ServerProcess, start_engine, start_router
from result_file import RESULTS_DIR, write_result

from llmserve.engine_service.demo_model import ensure_demo_model
from llmserve.v1 import common_pb2, generate_service_pb2, generate_service_pb2_grpc

PROFILE_TOP = 30


async def _clients(
    address: str, streams: int, tokens: int, rounds: int, seed: int
) -> tuple[int, int]:
    """Runs `streams` concurrent clients; returns (tokens, responses) received."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_service_pb2_grpc.GenerateServiceStub(channel)

        async def one(index: int) -> tuple[int, int]:
            received = responses = 0
            for r in range(rounds):
                request = generate_service_pb2.GenerateRequest(
                    prompt_token_ids=[(seed + index * 31 + r + i) % 600 + 3 for i in range(16)],
                    sampling=common_pb2.SamplingParams(temperature=0),
                    stopping=common_pb2.StoppingCriteria(max_tokens=tokens, ignore_eos=True),
                )
                async for response in stub.Generate(request):
                    received += len(response.token_ids)
                    responses += 1
                    assert response.text or response.token_ids
            return received, responses

        counts = await asyncio.gather(*(one(i) for i in range(streams)))
        return sum(c[0] for c in counts), sum(c[1] for c in counts)


def _client_process(
    address: str,
    streams: int,
    tokens: int,
    rounds: int,
    seed: int,
    start_at: float,
    results: "multiprocessing.Queue[tuple[int, int]]",
) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    results.put(asyncio.run(_clients(address, streams, tokens, rounds, seed)))


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of `pid`, summed by thread name.

    The main thread runs the event loop (Python, grpc's Cython layer, and the C-core work it
    starts inline); the others are grpc's completion-queue poller and C-core threads.
    """
    tick = os.sysconf("SC_CLK_TCK")
    cpu: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        # Fields after the command name start at field 3 (state): utime is 14, stime 15.
        cpu[name] = cpu.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return cpu


# Where a function's own time goes, from its file (or a built-in's name): first match wins.
PROFILE_GROUPS = (
    # grpc's Cython coroutines and the C-core work they start show as the callbacks' own time.
    ("grpc: Cython layer and C-core (event-loop callbacks)", ("_contextvars.Context",)),
    ("grpc: Python layer", ("/grpc/",)),
    ("asyncio event loop", ("/asyncio/", "selectors.py", "select.epoll", "_asyncio")),
    ("detokenization (tokenizers)", ("tokenizers",)),
    ("router code", ("/router/",)),
    ("protobuf", ("protobuf", "_upb", "FromString", "SerializeToString")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("logging", ("structlog", "/json/", "/logging/")),
)


def _profile_stats(path: Path) -> tuple[list[dict[str, object]], dict[str, float]]:
    """The profiled router's top functions by own time, and own time summed by group (in % of
    all profiled time)."""
    stats = pstats.Stats(str(path))
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])  # type: ignore[attr-defined]
    total = sum(row[2] for _, row in rows) or 1.0
    groups: dict[str, float] = {}
    for (file, _, name), (_, _, tottime, _, _) in rows:
        where = name if file == "~" else file
        group = next(
            (g for g, keys in PROFILE_GROUPS if any(k in where for k in keys)),
            "other (built-ins such as len and list.extend, whoever calls them)",
        )
        groups[group] = groups.get(group, 0.0) + tottime
    by_group = {
        g: round(100 * t / total, 1) for g, t in sorted(groups.items(), key=lambda i: -i[1])
    }
    top = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in rows[:PROFILE_TOP]:
        where = name if file == "~" else f"{'/'.join(Path(file).parts[-2:])}:{line} {name}"
        top.append(
            {
                "function": where,
                "calls": calls,
                "own_s": round(tottime, 3),
                "own_pct": round(100 * tottime / total, 1),
                "cumulative_s": round(cumtime, 3),
            }
        )
    return top, by_group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: demo)")
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engine-args", default="--max-num-seqs 256")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the JSON result")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the router under cProfile and record its top functions (slows it down)",
    )
    args = parser.parse_args()
    model = Path(args.model) if args.model else ensure_demo_model()
    with tempfile.TemporaryDirectory() as tmp:
        profile_path = Path(tmp) / "router.prof"
        # Engines are stopped whatever fails after them, a router that cannot start included.
        engines: list[ServerProcess] = []
        try:
            for _ in range(args.engines):
                engines.append(start_engine(model, Path(tmp), *args.engine_args.split()))
            router_args = ["--max-queue", "4096"]
            if args.profile:
                router_args += ["--cprofile-out", str(profile_path)]
            router = start_router(model, engines, Path(tmp), *router_args)
            try:
                context = multiprocessing.get_context("spawn")
                results: multiprocessing.Queue[tuple[int, int]] = context.Queue()
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
                time.sleep(max(0.0, start_at - time.time()))
                cpu_before = _thread_cpu(router.process.pid)
                counts = [results.get(timeout=900) for _ in workers]
                elapsed = time.time() - start_at
                cpu_after = _thread_cpu(router.process.pid)
                for worker in workers:
                    worker.join()
            finally:
                router.process.terminate()
                _, _, usage = os.wait4(router.process.pid, 0)
                router.process.returncode = 0
        finally:
            for engine in engines:
                engine.stop()
        profile = _profile_stats(profile_path) if args.profile else None
    received = sum(c[0] for c in counts)
    responses = sum(c[1] for c in counts)
    tok_s = received / elapsed
    by_thread = {
        name: round(cpu_after[name] - cpu_before.get(name, 0.0), 2) for name in sorted(cpu_after)
    }
    router_cpu = sum(by_thread.values())
    lifetime_cpu = usage.ru_utime + usage.ru_stime
    figures: dict[str, object] = {
        "tokens": received,
        "responses": responses,
        "tokens_per_response": round(received / max(responses, 1), 2),
        "seconds": round(elapsed, 2),
        "tok_per_s": round(tok_s),
        # While the clients ran (what streaming costs; start-up and shutdown excluded).
        "router_cpu_s": round(router_cpu, 2),
        "router_cpu_s_by_thread": by_thread,
        "router_cpu_us_per_token": round(1e6 * router_cpu / max(received, 1), 1),
        "router_cpu_us_per_response": round(1e6 * router_cpu / max(responses, 1), 1),
        "router_cores_busy": round(router_cpu / elapsed, 2),
        # The whole process life (rusage at exit), as results before this figure was split.
        "router_lifetime_cpu_s": round(lifetime_cpu, 2),
        "router_lifetime_user_s": round(usage.ru_utime, 2),
        "router_lifetime_sys_s": round(usage.ru_stime, 2),
    }
    if profile is not None:
        figures["router_profile_pct_by_group"] = profile[1]
        figures["router_profile_top"] = profile[0]
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
            "profiled": args.profile,
        },
        figures,
        out_dir=args.out,
    )
    print(
        f"router-throughput: {tok_s:,.0f} tok/s to {args.clients} clients, "
        f"{figures['tokens_per_response']} tokens/response; router CPU {router_cpu:.2f} s "
        f"({figures['router_cpu_us_per_token']} us/token, "
        f"{figures['router_cpu_us_per_response']} us/response, "
        f"{figures['router_cores_busy']} cores busy; by thread {by_thread}) -> {path}"
    )
    if profile is not None:
        print("  event-loop thread CPU by group (%):", profile[1])
        for row in profile[0][:15]:
            print(
                f"  {row['own_pct']:5.1f}% {row['own_s']:8.3f}s {row['calls']:>9} {row['function']}"
            )


if __name__ == "__main__":
    main()
