"""W2 `serving` (docs/benchmarks.md): online latency of streaming Generate calls over gRPC.

W1's prompts and lengths (temperature 0.6, ignore_eos, per-request max_tokens), Poisson arrivals
at 4, 16 and 64 requests/s and all at once, (a) straight to one engine's EngineService.Generate
with token ids, (b) through a router (GenerateService.Generate, `prompt_token_ids`, text
detokenized by the router) in front of the same engine. Per rate and target: request throughput,
output tok/s, and TTFT, TPOT and ITL at p50/p90/p99, measured on the client as "Measuring a
stream" defines them; with both targets, the router's cost (router minus direct) per rate.

How it runs:
- One fresh engine (default flags --max-model-len 4096 --max-num-seqs 256, then --engine-arg's)
  and, for the router target, one router in front of it. One short untimed warm-up per target.
  Each (rate, target) run in turn, rates outermost, so drift hits both targets alike.
- --repeats N runs each (rate, target) N times, the targets' order reversed every other time
  (engine, router, router, engine, ...), so a drift that is linear in time cancels in the
  difference. A (rate, target)'s figures pool the records of its runs; `repeats` keeps each
  run's TTFT p50 and output tok/s to show the spread.
- The arrival schedule is drawn once (seed 0, unit-rate exponential gaps, first request at 0)
  and scaled by 1/rate. Request i goes to load process i % --processes; each process has its
  own grpc.aio channel and sends at its requests' absolute times from a shared start. The JSON
  records the processes, the worst lateness of a send against its schedule and the busiest
  process's CPU share, to show the load generator was never the bottleneck.
- The engine is shared by every run, so run k (0-based) shifts each prompt's first token by k
  (mod the vocabulary): same lengths, no prefix-cache hits from an earlier run. Run 0 sends W1's
  prompts unchanged. `cached_prompt_tokens` in the JSON proves no hits.
- Every request must complete: failures are counted by gRPC status, short streams separately.

Time breakdown: the engine's /metrics (llmserve_engine_time_to_first_token_seconds and
..._inter_token_latency_seconds, recorded at its gRPC frontend) is scraped before and after
each run; `engine_side` holds their means. Client TTFT mean minus engine TTFT mean is what the
path outside the engine core's frontend adds to each request (gRPC transport and serialization,
plus the router for that target). The engine exposes no per-step timer without code changes;
W3 (`single.py`) times engine steps offline for the single-stream breakdown.

    python benchmarks/serving.py                                  # all rates, both targets
    python benchmarks/serving.py --model /tmp/qwen3-0.6b-shape --engine-arg=--enforce-eager
    python benchmarks/serving.py --num-requests 64 --rates 4 all --out-dir /tmp/w2  # CPU smoke
    python benchmarks/serving.py --rates 4 --repeats 2 --pin-cpus --router-arg=--busy-poll
"""

import argparse
import asyncio
import math
import multiprocessing
import os
import queue
import random
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing.synchronize import Event

import grpc
from result_file import device_name, write_result
from stream_bench import (
    Scrape,
    StreamClient,
    StreamRecord,
    add_common_args,
    default_model,
    engine_flags,
    engine_side,
    latency_figures,
    outcome_figures,
    percentiles,
    pinning_of,
    router_flags,
    scrape_metrics,
    started_servers,
    targets_of,
    vocab_size,
)
from w1_draws import fold_into_vocab, salted, w1_requests, warmup_prompts

DEFAULT_RATES = ("4", "16", "64", "all")
DEFAULT_ENGINE_FLAGS = ["--max-model-len", "4096", "--max-num-seqs", "256"]
TEMPERATURE = 0.6
SCHEDULE_SEED = 0
START_LEAD_S = 0.5  # from "every process is connected" to the shared start

Item = tuple[int, float, list[int], int]  # (request index, send offset s, prompt, max_tokens)


def arrival_offsets(count: int, rate: float) -> list[float]:
    """Send times from the start: Poisson at `rate`/s (unit gaps drawn once, seeded), or 0."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(SCHEDULE_SEED)
    gaps = [rng.expovariate(1.0) for _ in range(count - 1)]
    offsets, now = [0.0], 0.0
    for gap in gaps:
        now += gap / rate
        offsets.append(now)
    return offsets


async def _send_shard(
    address: str,
    target: str,
    shard: list[Item],
    tag: str,
    timeout: float,
    ready: "multiprocessing.Queue[int]",
    go: Event,
    start_wall: "multiprocessing.sharedctypes.Synchronized[float]",
) -> tuple[list[StreamRecord], float]:
    """Sends one process's share at its scheduled times; returns its records (times from the
    shared start) and the CPU seconds it spent from the start on."""
    async with grpc.aio.insecure_channel(address) as channel:
        await channel.channel_ready()
        client = StreamClient(channel, target)
        ready.put(os.getpid())
        await asyncio.to_thread(go.wait)
        origin = time.perf_counter() + (start_wall.value - time.time())  # shared start, our clock
        cpu_before = _cpu_seconds()

        async def one(
            index: int, offset: float, prompt: list[int], max_tokens: int
        ) -> StreamRecord:
            await asyncio.sleep(max(0.0, origin + offset - time.perf_counter()))
            record = await client.stream(
                index, prompt, max_tokens, TEMPERATURE, f"{tag}-{index}", timeout
            )
            return record.shifted(origin)

        records = await asyncio.gather(*(one(*item) for item in shard))
        return records, _cpu_seconds() - cpu_before


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load_process(
    address: str,
    target: str,
    shard: list[Item],
    tag: str,
    timeout: float,
    ready: "multiprocessing.Queue[int]",
    go: Event,
    start_wall: "multiprocessing.sharedctypes.Synchronized[float]",
    results: "multiprocessing.Queue[tuple[list[StreamRecord], float]]",
    cpus: frozenset[int] | None,
) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    results.put(
        asyncio.run(_send_shard(address, target, shard, tag, timeout, ready, go, start_wall))
    )


def run_load(
    address: str,
    target: str,
    items: list[Item],
    processes: int,
    tag: str,
    timeout: float,
    cpus: frozenset[int] | None = None,
) -> tuple[list[StreamRecord], list[float]]:
    """Sends `items` from `processes` load processes (on `cpus` if given); returns the records
    (times relative to the shared start) and each process's CPU seconds."""
    context = multiprocessing.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    go, start_wall = context.Event(), context.Value("d", 0.0)
    workers = [
        context.Process(
            target=_load_process,
            args=(
                address,
                target,
                items[p::processes],
                tag,
                timeout,
                ready,
                go,
                start_wall,
                results,
                cpus,
            ),
            daemon=True,
        )
        for p in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            _get_alive(ready, workers)
        start_wall.value = time.time() + START_LEAD_S
        go.set()
        gathered = [_get_alive(results, workers) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    records = sorted((r for batch, _ in gathered for r in batch), key=lambda r: r.index)
    return records, [cpu for _, cpu in gathered]


def _get_alive(source: "multiprocessing.Queue", workers: list) -> object:
    """The next item from `source`; raises if a load process died instead of answering."""
    while True:
        try:
            return source.get(timeout=5)
        except queue.Empty:
            dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a load process exited with {dead}") from None


def warm_up(address: str, target: str, prompt: list[int], timeout: float) -> None:
    """One short untimed request; raises unless it completes."""

    async def go() -> StreamRecord:
        async with grpc.aio.insecure_channel(address) as channel:
            return await StreamClient(channel, target).stream(
                0, prompt, 16, TEMPERATURE, f"w2-warmup-{target}", timeout
            )

    record = asyncio.run(go())
    if record.status != "OK" or len(record.arrivals) != 16:
        raise RuntimeError(f"warm-up through {target} failed: {record.status}")


@dataclass
class Run:
    """One pass of a rate's requests at one target, as the load processes saw it."""

    records: list[StreamRecord]
    cpu: list[float]  # each load process's CPU seconds

    @property
    def duration(self) -> float:
        """From the shared start, where the first request is sent, to the last token."""
        return max(max((r.arrivals[-1] for r in self.records if r.arrivals), default=0.0), 1e-9)


def run_figures(runs: list[Run], max_tokens: list[int], offsets: list[float]) -> dict:
    """One (rate, target)'s figures over the records of all its runs; throughput over their
    summed durations."""
    records = [r for run in runs for r in run.records]
    outcome = outcome_figures(records, max_tokens)
    duration = sum(run.duration for run in runs)
    lags = [r.sent - offsets[r.index] for r in records]
    return {
        **outcome,
        "duration_s": round(duration, 3),
        "request_throughput_per_s": round(outcome["completed"] / duration, 3),
        "output_tok_per_s": round(outcome["output_tokens"] / duration, 1),
        **latency_figures(records),
        "send_lateness_s": {k: v for k, v in percentiles(lags).items() if k in ("p99", "mean")}
        | {"max": round(max(lags), 6)},
        "load_process_cpu_busy_max": round(max(max(run.cpu) / run.duration for run in runs), 3),
    }


def run_order(targets: list[str], repeats: int) -> Iterable[str]:
    """Each target `repeats` times, the order reversed every other time: A B B A A B ..."""
    for repeat in range(repeats):
        yield from targets if repeat % 2 == 0 else reversed(targets)


def deltas(runs: dict[str, dict[str, dict]]) -> dict:
    """Router minus direct per rate: TTFT/TPOT/ITL deltas (s) and the output tok/s ratio."""
    out = {}
    for rate, by_target in runs.items():
        direct, routed = by_target["engine"], by_target["router"]
        row = {
            f"{metric[:-2]}_{p}_delta_s": round(routed[metric][p] - direct[metric][p], 6)
            for metric in ("ttft_s", "tpot_s", "itl_s")
            for p in ("p50", "p99")
            if p in routed[metric] and p in direct[metric]
        }
        row["output_tok_s_ratio"] = round(
            routed["output_tok_per_s"] / max(direct["output_tok_per_s"], 1e-9), 4
        )
        out[rate] = row
    return out


def parse_rate(text: str) -> float:
    return math.inf if text in ("all", "inf") else float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument(
        "--rates",
        nargs="+",
        default=list(DEFAULT_RATES),
        help="requests/s; 'all' = every request at once",
    )
    parser.add_argument(
        "--num-requests", type=int, default=256, help="the first N of W1's 256 (default all)"
    )
    parser.add_argument("--processes", type=int, default=4, help="load-generator processes")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per rate and target, in the order engine, router, router, engine, ...",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be 1 or more")
    pinning = pinning_of(args)
    targets = targets_of(args)
    rates = {label: parse_rate(label) for label in args.rates}
    model = args.model or default_model()
    vocab = vocab_size(model)
    prompts, max_tokens = w1_requests()
    prompts = fold_into_vocab(prompts[: args.num_requests], vocab)
    max_tokens = max_tokens[: args.num_requests]
    flags = engine_flags(DEFAULT_ENGINE_FLAGS, args)

    runs: dict[str, dict[str, dict]] = {}
    with started_servers(model, flags, "router" in targets, router_flags(args), pinning) as servers:
        for target in targets:
            warm_up(servers.address(target), target, warmup_prompts(vocab)[0], 600)
        run = 0
        for label, rate in rates.items():
            offsets = arrival_offsets(len(prompts), rate)
            passes: dict[str, list[Run]] = {t: [] for t in targets}
            each: dict[str, list[dict]] = {t: [] for t in targets}  # each run's own figures
            windows: dict[str, list[tuple[Scrape, Scrape]]] = {t: [] for t in targets}
            for target in run_order(targets, args.repeats):
                items = list(
                    zip(
                        range(len(prompts)),
                        offsets,
                        salted(prompts, run, vocab),
                        max_tokens,
                        strict=True,
                    )
                )
                before = scrape_metrics(servers.metrics_port)
                records, cpu = run_load(
                    servers.address(target),
                    target,
                    items,
                    args.processes,
                    f"w2-{run}",
                    args.request_timeout_s,
                    pinning and pinning.load,
                )
                windows[target].append((before, scrape_metrics(servers.metrics_port)))
                passes[target].append(Run(records, cpu))
                each[target].append(run_figures(passes[target][-1:], max_tokens, offsets))
                print(_summary(target, label, each[target][-1]), flush=True)
                run += 1
            for target in targets:
                figures = run_figures(passes[target], max_tokens, offsets)
                side = engine_side(windows[target])
                if side["engine_ttft_mean_s"] is not None:
                    side["client_minus_engine_ttft_mean_s"] = round(
                        figures["ttft_s"]["mean"] - side["engine_ttft_mean_s"], 6
                    )
                figures["engine_side"] = side
                if args.repeats > 1:
                    figures["repeats"] = [
                        {
                            "ttft_p50_s": one["ttft_s"]["p50"],
                            "output_tok_per_s": one["output_tok_per_s"],
                        }
                        for one in each[target]
                    ]
                runs.setdefault(label, {})[target] = figures

    results: dict = {"runs": runs}
    if len(targets) == 2:
        results["router_vs_direct"] = deltas(runs)
        everything = next((k for k, r in rates.items() if math.isinf(r)), None)
        if everything is not None:
            results["all_at_once_output_tok_s_ratio"] = results["router_vs_direct"][everything][
                "output_tok_s_ratio"
            ]
    parameters = {
        "targets": targets,
        "rates_per_s": list(rates),
        "requests": len(prompts),
        "max_tokens_total": sum(max_tokens),
        "temperature": TEMPERATURE,
        "ignore_eos": True,
        "schedule": f"Poisson, unit-rate gaps seeded {SCHEDULE_SEED}, scaled by 1/rate",
        "load_processes": args.processes,
        "repeats": args.repeats,
        "cpu_pinning": pinning.describe() if pinning else None,
        "model": model.name,
        "engine_flags": flags,
        "router_flags": router_flags(args),
        "prompt_ids_folded_into_vocab": vocab <= 10000,
        "prompt_salt": "run k shifts each prompt's first token by k (mod vocab)",
        "request_timeout_s": args.request_timeout_s,
    }
    path = write_result("W2", parameters, results, out_dir=args.out_dir)
    if len(targets) == 1:
        path = path.rename(path.with_name(path.name.replace("W2-", f"W2-{targets[0]}-", 1)))
    if "router_vs_direct" in results:
        for label, row in results["router_vs_direct"].items():
            print(
                f"W2 router vs direct @{label}: TTFT p50 {row['ttft_p50_delta_s'] * 1e3:+.1f} "
                f"ms, ITL p50 {row['itl_p50_delta_s'] * 1e3:+.2f} ms, output tok/s "
                f"x{row['output_tok_s_ratio']:.3f}"
            )
    print(f"wrote {path}")


def _summary(target: str, label: str, f: dict) -> str:
    def ms(d: dict, p: str) -> str:
        return f"{d[p] * 1e3:.1f}" if p in d else "-"

    return (
        f"W2 {target} @{label} on {device_name()}: {f['completed']}/{f['requests']} ok "
        f"{f['failed'] or ''}, {f['request_throughput_per_s']:.2f} req/s, "
        f"{f['output_tok_per_s']:,.0f} tok/s; TTFT p50/p90/p99 {ms(f['ttft_s'], 'p50')}/"
        f"{ms(f['ttft_s'], 'p90')}/{ms(f['ttft_s'], 'p99')} ms; TPOT p50 "
        f"{ms(f['tpot_s'], 'p50')} ms; ITL p50/p90/p99 {ms(f['itl_s'], 'p50')}/"
        f"{ms(f['itl_s'], 'p90')}/{ms(f['itl_s'], 'p99')} ms; max send lateness "
        f"{f['send_lateness_s']['max'] * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
