"""W3 `single` (docs/benchmarks.md): one stream alone, and where its time goes per token.

One request at a time, 512 random prompt tokens, 256 output tokens, greedy with ignore_eos (so
it always runs to max_tokens), nothing else running; one untimed warm-up per target, then 10
repeats. Targets: `engine` (EngineService.Generate, token ids) and `router` (GenerateService,
`prompt_token_ids`, detokenized by a router in front of the same engine). Repeats alternate the
targets; every request has its own random prompt (seeded), so none hits the prefix cache.
Reports TTFT p50 and ITL p50/p99 (and TPOT), measured on the client as "Measuring a stream"
defines them, and with both targets the router's cost (router minus direct).

Time breakdown (on by default; --no-breakdown skips it), measured without touching engine code:
- engine step: after the servers stop, the same model and engine flags load in this process
  (`LLM`) and every `EngineCore.step` call of three requests of the same shape is timed (no
  frontend, no pipe): the calls up to the first token (prefill), then one per decode step (with
  async scheduling on CUDA a call reads the previous step's tokens while launching the next, so
  its time is the loop's period); then the decode step split into model runner / sampler / the
  rest (`step_breakdown.py`, synchronized timers, which stop the overlap).
- hand-off: the engine's /metrics is scraped before and after each request. Its ITL histogram
  (gaps between tokens reaching the gRPC frontend) has the serving loop's period as its mean; that
  minus the offline decode step is the core loop's hand-off per token (step result to the pipe,
  the frontend's dispatch). Its TTFT histogram is frontend receipt -> first token at the frontend.
- serialization / transport: the engine's JSON log stamps `request_started` (wall clock, same
  host): client send -> that stamp is the request's way in. Client TTFT minus the way in minus
  the engine's TTFT is the first token's way out: the latency each token carries from the
  engine's frontend to the client (protobuf, HTTP/2, the client's event loop). It adds latency,
  not period: the frontend serializes while the core computes the next step.
- serialization: what building, serializing and parsing one token's message costs on this host's
  CPU, for each message a token travels in (timed here, in a loop: the messages' share of the
  way out, with no transport).
- router: router target minus engine target, for ITL (period) and for the ways in and out.

    python benchmarks/single.py                                    # both targets, breakdown
    python benchmarks/single.py --model /tmp/qwen3-0.6b-shape --engine-arg=--enforce-eager
    python benchmarks/single.py --output-tokens 64 --repeats 3 --out-dir /tmp/w3   # CPU smoke
"""

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import grpc
from result_file import device_name, write_result
from stream_bench import (
    Servers,
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


def prompt_source(seed: int, length: int, vocab: int) -> Callable[[], list[int]]:
    """Fresh random prompts of ids 0..10000 (W1's range; the vocabulary's on a smaller model)."""
    rng = random.Random(seed)
    return lambda: [rng.randrange(min(vocab, 10001)) for _ in range(length)]


async def run_streams(
    servers: Servers,
    targets: list[str],
    next_prompt: Callable[[], list[int]],
    output_tokens: int,
    repeats: int,
    timeout: float,
) -> tuple[dict[str, list[StreamRecord]], dict[str, list[dict]]]:
    """A warm-up per target, then `repeats` rounds of one request per target, one at a time,
    each with the engine's /metrics scraped just before and after it."""
    records: dict[str, list[StreamRecord]] = {t: [] for t in targets}
    sides: dict[str, list[dict]] = {t: [] for t in targets}
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for target in targets:
            channel = grpc.aio.insecure_channel(servers.address(target))
            await stack.enter_async_context(channel)
            await channel.channel_ready()
            clients[target] = StreamClient(channel, target)

        async def one(target: str, request_id: str) -> tuple[StreamRecord, dict]:
            before = scrape_metrics(servers.metrics_port)
            record = await clients[target].stream(
                0, next_prompt(), output_tokens, 0.0, request_id, timeout
            )
            if record.status != "OK":
                raise RuntimeError(f"{request_id} through {target} failed: {record.status}")
            side = engine_side([(before, scrape_metrics(servers.metrics_port))])
            return record, side | {"request_id": request_id}

        for target in targets:
            await one(target, f"w3-warmup-{target}")
        for repeat in range(repeats):
            for target in targets:  # alternating, so drift hits both alike
                record, side = await one(target, f"w3-{target}-{repeat}")
                records[target].append(record)
                sides[target].append(side)
    return records, sides


def received_at(servers: Servers) -> dict[str, float]:
    """Wall-clock time at which the engine's frontend logged each request (our request id)."""
    return {
        event["request_id"].rsplit("-", 1)[0]: datetime.fromisoformat(
            event["timestamp"]
        ).timestamp()
        for event in servers.engine.log_events()
        if event.get("event") == "request_started"
    }


def engine_settings(model: Path, flags: list[str]) -> dict:
    """The settings of the EngineConfig the engine built from `flags`, for an in-process LLM."""
    from llmserve.engine_service.cli import parse_config

    settings = asdict(parse_config(["--model", str(model), *flags]))
    del settings["model"]
    return settings


def offline_steps(
    model: Path, flags: list[str], next_prompt: Callable[[], list[int]], output_tokens: int
) -> dict:
    """Engine steps of the same request shape timed in this process: prefill, decode, split."""
    import torch
    from step_breakdown import step_breakdown

    from llmserve.engine_service.llm import LLM
    from llmserve.engine_service.seam import EngineRequest, SamplingOptions

    settings = engine_settings(model, flags)
    if settings["device"] == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))  # as the engine's core process
    llm = LLM(model, **settings)
    greedy = SamplingOptions(temperature=0.0, ignore_eos=True, max_tokens=output_tokens)
    llm.generate([next_prompt()], greedy, use_tqdm=False)  # warm-up
    prefills, decodes = [], []
    for run in range(3):
        llm.core.add_request(EngineRequest(f"offline-{run}", next_prompt(), greedy))
        first = True
        while llm.core.has_work:
            began = time.perf_counter()
            outputs = llm.core.step()  # ends with the sampled tokens on the host: synchronized
            (prefills if first else decodes).append(time.perf_counter() - began)
            first = first and not outputs
    split = step_breakdown(llm, [next_prompt()], output_tokens, temperature=0.0)
    return {
        "prefill_step_s": round(statistics.fmean(prefills), 6),
        "decode_step_s": percentiles(decodes),
        "decode_step_split_ms": split["ms_per_step"] | {"other": split["other_ms_per_step"]},
        "attention_backend": llm.info.attention_backend,
    }


def serialization_costs(repeats: int = 20000) -> dict[str, float]:
    """Seconds per message to build + serialize, and to parse, each message carrying one token."""
    import timeit

    from llmserve.v1 import engine_service_pb2, generate_service_pb2

    def engine_response() -> bytes:
        message = engine_service_pb2.EngineServiceGenerateResponse(token_ids=[9707])
        return message.SerializeToString()

    def streams_response() -> bytes:
        message = engine_service_pb2.GenerateStreamsResponse()
        update = message.updates.add(stream_id=7)
        update.response.token_ids.append(9707)
        return message.SerializeToString()

    def router_response() -> bytes:
        message = generate_service_pb2.GenerateResponse(
            request_id="w3-router-0", text="Hello", token_ids=[9707]
        )
        return message.SerializeToString()

    engine, router = engine_service_pb2, generate_service_pb2
    costs = {}
    for name, build, parse in (
        ("engine_generate_response", engine_response, engine.EngineServiceGenerateResponse),
        ("generate_streams_response", streams_response, engine.GenerateStreamsResponse),
        ("router_generate_response", router_response, router.GenerateResponse),
    ):
        data = build()
        costs[f"{name}_build_serialize_s"] = timeit.timeit(build, number=repeats) / repeats
        costs[f"{name}_parse_s"] = (
            timeit.timeit(lambda p=parse, d=data: p.FromString(d), number=repeats) / repeats
        )
    return {k: round(v, 9) for k, v in costs.items()}


def target_figures(records: list[StreamRecord], sides: list[dict], output_tokens: int) -> dict:
    """Client latency over the repeats, and the engine-side means with the ways in and out."""
    figures = outcome_figures(records, [output_tokens] * len(records))
    figures |= latency_figures(records)
    figures["ttft_each_s"] = [round(r.ttft or 0.0, 6) for r in records]
    ins = [s["request_in_s"] for s in sides if s.get("request_in_s") is not None]
    outs = [
        r.ttft - s["request_in_s"] - s["engine_ttft_mean_s"]
        for r, s in zip(records, sides, strict=True)
        if r.ttft is not None
        and s.get("request_in_s") is not None
        and s["engine_ttft_mean_s"] is not None
    ]
    itls = [s["engine_itl_mean_s"] for s in sides if s["engine_itl_mean_s"] is not None]
    ttfts = [s["engine_ttft_mean_s"] for s in sides if s["engine_ttft_mean_s"] is not None]
    figures["engine_side"] = {
        "engine_ttft_mean_s": _mean(ttfts),
        "engine_itl_mean_s": _mean(itls),
        "request_in_mean_s": _mean(ins),
        "first_token_out_mean_s": _mean(outs),
    }
    return figures


def breakdown(per_target: dict[str, dict], offline: dict | None) -> dict:
    """Per token and per first token: engine step, hand-off, gRPC, router (seconds)."""
    out: dict = {"offline_engine": offline, "serialization_per_message": serialization_costs()}
    direct = per_target.get("engine")
    if direct is not None and offline is not None and "error" not in offline:
        step = offline["decode_step_s"]["mean"]
        engine_itl = direct["engine_side"]["engine_itl_mean_s"]
        out["per_token_direct"] = {
            "client_itl_mean_s": direct["itl_s"]["mean"],
            "engine_step_s": step,
            "core_handoff_s": _sub(engine_itl, step),
            "frontend_to_client_latency_s": direct["engine_side"]["first_token_out_mean_s"],
        }
        out["first_token_direct"] = {
            "client_ttft_mean_s": direct["ttft_s"]["mean"],
            "request_in_s": direct["engine_side"]["request_in_mean_s"],
            "engine_ttft_s": direct["engine_side"]["engine_ttft_mean_s"],
            "of_which_prefill_step_s": offline["prefill_step_s"],
            "first_token_out_s": direct["engine_side"]["first_token_out_mean_s"],
        }
    if direct is not None and "router" in per_target:
        routed = per_target["router"]
        out["router_minus_direct"] = {
            "itl_p50_s": _sub(routed["itl_s"]["p50"], direct["itl_s"]["p50"]),
            "itl_p99_s": _sub(routed["itl_s"]["p99"], direct["itl_s"]["p99"]),
            "itl_mean_s": _sub(routed["itl_s"]["mean"], direct["itl_s"]["mean"]),
            "ttft_p50_s": _sub(routed["ttft_s"]["p50"], direct["ttft_s"]["p50"]),
            "request_in_s": _sub(
                routed["engine_side"]["request_in_mean_s"],
                direct["engine_side"]["request_in_mean_s"],
            ),
            "token_out_s": _sub(
                routed["engine_side"]["first_token_out_mean_s"],
                direct["engine_side"]["first_token_out_mean_s"],
            ),
        }
    return out


def fp8_label(flags: list[str]) -> str:
    """'-wfp8' and '-kvfp8' for the FP8 engine flags, so that W3L's configurations in one call
    write one file each."""
    pairs = dict(itertools.pairwise(flags))
    weights = pairs.get("--quantization", "none") != "none"
    kv = pairs.get("--kv-cache-dtype", "auto") != "auto"
    return "-wfp8" * weights + "-kvfp8" * kv


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 6) if values else None


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-breakdown", action="store_true", help="skip the offline step timing")
    parser.add_argument("--workload", choices=["W3", "W3L"], default="W3",
                        help="W3L: the same requests on qwen3-8b-shape (docs/benchmarks.md)")
    args = parser.parse_args()
    targets = targets_of(args)
    model = args.model or default_model()
    vocab = vocab_size(model)
    next_prompt = prompt_source(args.seed, args.prompt_tokens, vocab)
    flags = engine_flags([], args)
    timeout = args.request_timeout_s
    pinning = pinning_of(args)
    own_cpus = os.sched_getaffinity(0)

    with started_servers(model, flags, "router" in targets, router_flags(args), pinning) as servers:
        if pinning is not None:
            os.sched_setaffinity(0, pinning.load)  # this process is the client
        records, sides = asyncio.run(
            run_streams(servers, targets, next_prompt, args.output_tokens, args.repeats, timeout)
        )
        received = received_at(servers)
    os.sched_setaffinity(0, own_cpus)  # the offline breakdown has the machine to itself
    for target in targets:
        for record, side in zip(records[target], sides[target], strict=True):
            at = received.get(side["request_id"])
            side["request_in_s"] = None if at is None else at - record.sent_wall
    per_target = {t: target_figures(records[t], sides[t], args.output_tokens) for t in targets}
    offline = None
    if not args.no_breakdown:
        try:
            offline = offline_steps(model, flags, next_prompt, args.output_tokens)
        except Exception as exc:  # keep the measured streams; say why the breakdown is missing
            offline = {"error": repr(exc)[:500]}
    figures = {"targets": per_target, "breakdown": breakdown(per_target, offline)}
    parameters = {
        "targets": targets,
        "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens,
        "repeats": args.repeats,
        "warmup": "one request of the same shape per target, untimed",
        "sampling": "greedy (temperature 0), ignore_eos",
        "prompts": f"random ids 0..10000 (seed {args.seed}), a fresh prompt per request",
        "model": model.name,
        "engine_flags": flags,
        "router_flags": router_flags(args),
        "cpu_pinning": pinning.describe() if pinning else None,
    }
    path = write_result(args.workload, parameters, figures, out_dir=args.out_dir)
    label = "".join(f"-{t}" for t in targets if len(targets) == 1) + fp8_label(flags)
    if label:
        path = path.rename(path.with_name(path.name.replace(
            f"{args.workload}-", f"{args.workload}{label}-", 1)))
    for target, f in per_target.items():
        print(
            f"W3 {target} on {device_name()}: {f['completed']}/{f['requests']} ok, TTFT p50 "
            f"{f['ttft_s']['p50'] * 1e3:.2f} ms, ITL p50/p99 {f['itl_s']['p50'] * 1e3:.3f}/"
            f"{f['itl_s']['p99'] * 1e3:.3f} ms, TPOT p50 {f['tpot_s']['p50'] * 1e3:.3f} ms"
        )
    for part, values in figures["breakdown"].items():
        if part not in ("offline_engine", "serialization_per_message") and values:
            print(f"  {part}: " + ", ".join(f"{k} {_ms(v)}" for k, v in values.items()))
    costs = figures["breakdown"]["serialization_per_message"]
    print("  serialization per message: " + ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in
                                                     costs.items()))
    print(f"wrote {path}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.3f} ms"


if __name__ == "__main__":
    main()
