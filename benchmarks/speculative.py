"""W8 `speculative` (docs/benchmarks.md): speculative decoding's speed-up on a model pair whose
predictions are real.

Acceptance needs trained weights, so the run trains its own pair first (spec_models.py, in a
child process, so this one never holds GPU memory): a Qwen3 target and a much smaller draft,
on the Python standard library's own .py files (every machine has them offline), split by file
into training and held-out parts. Prompts are --prompt-tokens (512) token windows of held-out
files, --output-tokens (256) output tokens, greedy (--temperature), ignore_eos, so every stream
is exactly that long.

Then, same target, same prompts, one fresh engine per method (its real gRPC server, loading the
checkpoints with its real loader): no speculation (`none`), `ngram` (prompt lookup) and `draft`
(the trained draft). Per method an untimed warm-up (two full-size streams at once, then one
alone, as the first level runs), then for each concurrency C in --concurrency (1, 4, 16, 64):
C streaming Generate calls at a time, each
slot sending its next request when its last one ends, --rounds-at-1 (8) requests per slot at
C = 1 and --rounds (2) above, every request on a prompt of its own (no prefix-cache hits; the
same prompts for every method). The load is spread over --processes load processes, started
once. Per (method, C): output tok/s (tokens / first send to last token), TTFT, TPOT and ITL
percentiles as docs/benchmarks.md's "Measuring a stream" defines them (a response carrying k
tokens is k arrivals at one instant, so with speculation most gaps are 0 and ITL p50 can be 0:
TPOT and the gap between responses say what a step costs), and acceptance:
- `acceptance`, from each stream's last usage (`speculative_proposed_tokens`,
  `speculative_accepted_tokens`), summed: the rate accepted / proposed; the mean accepted
  length, the tokens a verification step yields, 1 + accepted / drafts from the engine's
  /metrics counters over the level (kept beside, `metrics`), or accepted / (proposed / k) + 1
  from an engine that does not count drafts; and `tokens_per_decode_step`: an accepted token is
  one generated without a step of its own (a last step's accepted tokens past max_tokens count
  too, so this errs high by at most k per stream).
- `tokens_per_decode_response`: what the client saw, tokens after the first response over the
  responses after the first (1.0 without speculation; a lagging reader's merged responses would
  raise it, which the `none` rows would show).
Greedy outputs are compared with `none`'s, prompt by prompt (`outputs_equal_to_none`).

Also W3 with speculation: the benchmark model (qwen3-0.6b-shape, random weights; on the CPU the
demo model) at one stream, W3's random 512-token prompts (single.py's), --w3-repeats requests
after a warm-up, `none` against `ngram`: acceptance is whatever random weights give.

Reported: ratios of each method to `none` at each C, and the targets: at one stream `draft`
output tok/s >= 2.0x `none` and `ngram` >= 1.3x; at the highest C speculation costs at most 5%.
The run fits one device call: --budget-s bounds it, the plan printed first shortens training
when the rest would not fit, and the W3 part is skipped (and says so) when too little is left.

    python benchmarks/speculative.py --out-dir "$OUT"                       # H100, <= 520 s
    python benchmarks/speculative.py --methods none ngram --no-w3           # no draft
    python benchmarks/speculative.py --smoke --methods none ngram --out-dir /tmp/w8   # CPU
"""

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import grpc
from result_file import RESULTS_DIR, write_result
from single import prompt_source
from stream_bench import (
    BENCH_CHECKPOINT,
    Scrape,
    StreamClient,
    StreamRecord,
    engine_flags,
    latency_figures,
    outcome_figures,
    percentiles,
    scrape_metrics,
    started_servers,
    vocab_size,
)

HERE = Path(__file__).resolve().parent
METHODS = ("none", "ngram", "draft")
START_LEAD_S = 1.0  # from handing a level to the load processes to its shared start
WARMUP_STREAMS = 2
# Rough costs for the time plan (H100 / CPU, measured, with margin): an engine's start and
# stop, a method's streams, what preparing costs besides training (imports, tokenizing,
# saving, the bench checkpoint).
ENGINE_START_S = {"cuda": 20.0, "cpu": 8.0}
SERVE_S = {"cuda": 15.0, "cpu": 4.0}
PREPARE_S = {"cuda": 45.0, "cpu": 15.0}
PROPOSED_METRIC = "llmserve_engine_speculative_proposed_tokens_total"
ACCEPTED_METRIC = "llmserve_engine_speculative_accepted_tokens_total"
DRAFTS_METRIC = "llmserve_engine_speculative_drafts_total"
SPEEDUP_TARGETS = {"draft": 2.0, "ngram": 1.3}
MAX_COST_AT_HIGH_CONCURRENCY = 0.05

SMOKE = {  # a CPU run of every path in about a minute: tiny models, a few steps, short streams
    "target_layers": 2, "target_hidden": 64, "draft_layers": 1, "draft_hidden": 32,
    "target_train_s": 2.0, "draft_train_s": 1.0, "seq_len": 64, "batch_size": 2,
    "micro_batch": 2, "warmup_steps": 2, "max_files": 40, "heldout_windows": 2,
    "prompt_tokens": 32, "output_tokens": 8, "concurrency": [1, 2], "rounds_at_1": 2,
    "rounds": 1, "w3_repeats": 2, "processes": 2, "log_every_s": 1.0, "budget_s": 300.0,
    "threads": 1,
}


# --- the load: slots of back-to-back streams, in load processes -------------------------------


class TapClient(StreamClient):
    """stream_bench's engine StreamClient, timing untouched, that also keeps every response of
    each stream (token ids, usage) by request id."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        super().__init__(channel, "engine")
        self.responses: dict[str, list] = {}
        generate = self._generate

        def tapped(message: object, timeout: float | None = None) -> object:
            kept = self.responses.setdefault(message.request_id, [])

            async def each():  # the call's responses, each kept on its way through
                async for response in generate(message, timeout=timeout):
                    kept.append(response)
                    yield response

            return each()

        self._generate = tapped


# What a load process hands back per stream: its record (times from the shared start), token
# ids, responses that carried tokens, tokens of the first one, and (proposed, accepted) if the
# engine's last response reports them.
Stream = tuple[StreamRecord, list[int], int, int, tuple[int, int] | None]


def reported_spec(response: object) -> tuple[int, int] | None:
    """(proposed, accepted) draft tokens so far from a response's usage; None where the
    engine's messages have no such fields (an engine from before speculative decoding)."""
    usage = response.usage
    if "speculative_accepted_tokens" not in usage.DESCRIPTOR.fields_by_name:
        return None
    return usage.speculative_proposed_tokens, usage.speculative_accepted_tokens


def _stream_of(record: StreamRecord, responses: list) -> Stream:
    with_tokens = [r for r in responses if r.token_ids]
    return (record, [t for r in with_tokens for t in r.token_ids], len(with_tokens),
            len(with_tokens[0].token_ids) if with_tokens else 0,
            reported_spec(responses[-1]) if responses else None)


async def _run_slots(address: str, slots: list[list[tuple[int, list[int]]]], max_tokens: int,
                     temperature: float, tag: str, start_wall: float, timeout: float
                     ) -> tuple[list[Stream], float]:
    async with grpc.aio.insecure_channel(address) as channel:
        await channel.channel_ready()
        client = TapClient(channel)
        origin = time.perf_counter() + (start_wall - time.time())  # the shared start
        late = time.perf_counter() - origin
        await asyncio.sleep(max(0.0, -late))

        async def slot(items: list[tuple[int, list[int]]]) -> list[Stream]:
            done = []
            for index, prompt in items:
                request_id = f"{tag}-{index}"
                record = await client.stream(index, prompt, max_tokens, temperature,
                                             request_id, timeout)
                done.append(_stream_of(record.shifted(origin),
                                       client.responses.pop(request_id, [])))
            return done

        streams = await asyncio.gather(*(slot(items) for items in slots))
    return [s for batch in streams for s in batch], max(0.0, late)


def _load_process(*args: object) -> tuple[list[Stream], float]:
    return asyncio.run(_run_slots(*args))


def _ready(_: int) -> int:
    return os.getpid()


def run_level(pool: concurrent.futures.Executor, processes: int, address: str,
              prompts: list[list[int]], concurrency: int, max_tokens: int, temperature: float,
              tag: str, timeout: float) -> tuple[list[Stream], float]:
    """`concurrency` slots, slot s sending prompts s, s + C, s + 2C, ... one after another,
    the slots spread over min(processes, C) load processes from one shared start. Returns the
    streams in prompt order and the latest a load process started after the shared start."""
    indexed = list(enumerate(prompts))
    slots = [indexed[s::concurrency] for s in range(concurrency)]
    workers = min(processes, concurrency)
    start_wall = time.time() + START_LEAD_S
    futures = [pool.submit(_load_process, address, slots[w::workers], max_tokens, temperature,
                           tag, start_wall, timeout) for w in range(workers)]
    results = [f.result() for f in futures]
    streams = sorted((s for batch, _ in results for s in batch), key=lambda s: s[0].index)
    return streams, max(late for _, late in results)


# --- figures ---------------------------------------------------------------------------------


def response_gaps(record: StreamRecord) -> list[float]:
    """Gaps between the responses of a stream that carried tokens (distinct arrival instants)."""
    instants = sorted(set(record.arrivals))
    return [b - a for a, b in pairwise(instants)]


def metric_spec(before: Scrape, after: Scrape) -> tuple[int, int, int | None] | None:
    """(proposed, accepted, drafts verified) over a window from the engine's /metrics counters,
    if it has them (drafts None from an engine without that counter)."""
    if PROPOSED_METRIC not in after or ACCEPTED_METRIC not in after:
        return None

    def delta(name: str) -> int:
        return int(after[name] - before.get(name, 0.0))

    drafts = delta(DRAFTS_METRIC) if DRAFTS_METRIC in after else None
    return delta(PROPOSED_METRIC), delta(ACCEPTED_METRIC), drafts


def acceptance_figures(proposed: int, accepted: int, k: int, tokens: int, streams: int,
                       window: tuple[int, int, int | None] | None = None) -> dict:
    """Proposed and accepted draft tokens (from the streams' usage), the acceptance rate, and
    the mean accepted length, the tokens one verification step yields: 1 + accepted / drafts
    verified, from the /metrics counters over the level (`window`: proposed, accepted,
    drafts) where the engine counts drafts, else accepted / (proposed / k) + 1 (exact when
    every draft is k long). Also tokens per decode step: an accepted token is one generated
    without a step of its own, so `tokens` took tokens - accepted steps, the first of each
    stream its prefill's (high by the accepted tokens a last step drew past max_tokens, at most
    k a stream)."""
    figures: dict = {"proposed": proposed, "accepted": accepted, "k": k}
    if window is not None:
        figures["metrics"] = dict(zip(("proposed", "accepted", "drafts"), window, strict=True))
    if proposed:
        figures["acceptance_rate"] = round(accepted / proposed, 4)
        if window is not None and window[2]:
            figures["mean_accepted_length"] = round(1 + window[1] / window[2], 3)
            figures["mean_accepted_length_from"] = "1 + accepted / drafts (/metrics)"
        else:
            figures["mean_accepted_length"] = round(accepted / (proposed / k) + 1, 3)
            figures["mean_accepted_length_from"] = "accepted / (proposed / k) + 1"
    decode_steps = tokens - accepted - streams
    if decode_steps > 0:
        figures["tokens_per_decode_step"] = round((tokens - streams) / decode_steps, 3)
    return figures


def level_figures(streams: list[Stream], max_tokens: int, late: float, k: int | None,
                  window: tuple[Scrape, Scrape] | None) -> dict:
    """One (method, concurrency): outcome, throughput, latency, acceptance."""
    records = [s[0] for s in streams]
    figures = outcome_figures(records, [max_tokens] * len(records))
    duration = max((r.arrivals[-1] for r in records if r.arrivals), default=0.0)
    figures["duration_s"] = round(duration, 4)
    figures["output_tok_per_s"] = round(figures["output_tokens"] / max(duration, 1e-9), 1)
    figures |= latency_figures(records)
    figures["response_gap_s"] = percentiles([g for r in records for g in response_gaps(r)])
    decode_tokens = sum(len(s[1]) - s[3] for s in streams)
    decode_responses = sum(s[2] - 1 for s in streams if s[2])
    figures["tokens_per_decode_response"] = (
        round(decode_tokens / decode_responses, 3) if decode_responses else None)
    figures["load_start_lateness_s"] = round(late, 4)
    if k is not None:
        reported = [s[4] for s in streams]
        tokens = sum(len(s[1]) for s in streams)
        counts = None if window is None else metric_spec(*window)
        if reported and all(r is not None for r in reported):
            figures["acceptance"] = acceptance_figures(
                sum(r[0] for r in reported), sum(r[1] for r in reported), k, tokens,
                len(streams), counts)
        else:
            figures["acceptance"] = {"k": k, "metrics": counts, "error": "the engine's "
                                     "responses carry no speculative counts"}
    return figures


def compare_outputs(streams: list[Stream], baseline: list[Stream]) -> dict:
    """How many outputs equal `none`'s for the same prompt, and where the others first differ."""
    equal, first_diffs = 0, []
    for mine, theirs in zip(streams, baseline, strict=True):
        a, b = mine[1], theirs[1]
        if a == b:
            equal += 1
        else:
            first_diffs.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=False))
                                     if x != y), min(len(a), len(b))))
    return {"equal": equal, "of": len(streams), "first_difference_at": sorted(first_diffs)}


# --- the plan ---------------------------------------------------------------------------------


def time_plan(args: argparse.Namespace, device: str) -> dict:
    """Seconds each phase is expected to take; training shortened (both alike) when the whole
    would not fit --budget-s, to no less than a quarter of what was asked."""
    engines = len(args.methods) + (2 if args.w3 else 0)
    plan = {
        "prepare_s": PREPARE_S[device],
        "target_train_s": args.target_train_s,
        "draft_train_s": args.draft_train_s if "draft" in args.methods else 0.0,
        "serve_s": len(args.methods) * (ENGINE_START_S[device] + SERVE_S[device]),
        "w3_s": 2 * (ENGINE_START_S[device] + SERVE_S[device]) if args.w3 else 0.0,
    }
    rest = sum(plan.values()) - plan["target_train_s"] - plan["draft_train_s"]
    training = plan["target_train_s"] + plan["draft_train_s"]
    room = args.budget_s - rest
    if training > room:
        scale = max(0.25, room / training)
        plan["target_train_s"] = round(plan["target_train_s"] * scale, 1)
        plan["draft_train_s"] = round(plan["draft_train_s"] * scale, 1)
    plan["total_s"] = round(sum(plan.values()), 1)
    plan["budget_s"] = args.budget_s
    plan["engines"] = engines
    return plan


def method_flags(method: str, args: argparse.Namespace, draft_dir: str | None) -> list[str]:
    if method == "none":
        return ["--speculative-method", "none"]
    if method == "ngram":
        return ["--speculative-method", "ngram", "--num-speculative-tokens", str(args.ngram_k)]
    return ["--speculative-method", "draft", "--num-speculative-tokens", str(args.draft_k),
            "--speculative-draft-model", str(draft_dir)]


def k_of(method: str, args: argparse.Namespace) -> int | None:
    return {"ngram": args.ngram_k, "draft": args.draft_k}.get(method)


# --- running ----------------------------------------------------------------------------------


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.began = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def log(event: dict) -> None:
    print(json.dumps(event), flush=True)


def prepare(args: argparse.Namespace, plan: dict, work: Path, num_prompts: int,
            bench_model: Path | None, cpu: bool) -> dict:
    """spec_models.py in a child process: corpus, prompts, the trained pair (and the bench
    checkpoint, if missing). Its progress lines go straight to our stdout."""
    options = {
        "work_dir": str(work), "cpu": cpu, "seed": args.seed, "threads": args.threads,
        "heldout_percent": args.heldout_percent, "max_files": args.max_files,
        "prompt_tokens": args.prompt_tokens, "num_prompts": num_prompts,
        "target_layers": args.target_layers, "target_hidden": args.target_hidden,
        "draft_layers": args.draft_layers, "draft_hidden": args.draft_hidden,
        "target_train_s": plan["target_train_s"], "draft_train_s": plan["draft_train_s"],
        "target_lr": args.target_lr, "draft_lr": args.draft_lr, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "micro_batch": args.micro_batch,
        "warmup_steps": args.warmup_steps, "log_every_s": args.log_every_s,
        "train_draft": "draft" in args.methods, "distill": args.distill,
        "heldout_windows": args.heldout_windows,
        "bench_model": str(bench_model) if bench_model else None,
    }
    (work / "prepare.json").write_text(json.dumps(options))
    result = work / "prepared.json"
    limit = plan["prepare_s"] * 4 + plan["target_train_s"] + plan["draft_train_s"] + 120
    # Tokenizing the stdlib on every core: this child forks nothing after it.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    subprocess.run([sys.executable, str(HERE / "spec_models.py"), str(work / "prepare.json"),
                    str(result)], check=True, timeout=limit, env=env)
    return json.loads(result.read_text())


def serve_method(pool: concurrent.futures.Executor, args: argparse.Namespace, model: Path,
                 flags: list[str], k: int | None, warmup: list[list[int]],
                 levels: dict[int, list[list[int]]], max_tokens: int, tag: str
                 ) -> tuple[dict, dict[int, list[Stream]]]:
    """One fresh engine with `flags`: the warm-up, then each level; figures and the streams."""
    began = time.perf_counter()
    figures: dict = {"engine_flags": flags, "levels": {}}
    streams_of: dict[int, list[Stream]] = {}
    with started_servers(model, flags, False, []) as servers:
        figures["engine_start_s"] = round(time.perf_counter() - began, 1)
        address = servers.address("engine")
        warm, _ = run_level(pool, args.processes, address, warmup, len(warmup), max_tokens,
                            args.temperature, f"{tag}-warmup", args.request_timeout_s)
        alone, _ = run_level(pool, args.processes, address, warmup[:1], 1, max_tokens,
                             args.temperature, f"{tag}-warmup-alone", args.request_timeout_s)
        if any(s[0].status != "OK" for s in warm + alone):
            raise RuntimeError(f"{tag}: warm-up failed: {[s[0].status for s in warm]}")
        for concurrency, prompts in levels.items():
            before = scrape_metrics(servers.metrics_port)
            streams, late = run_level(pool, args.processes, address, prompts, concurrency,
                                      max_tokens, args.temperature, f"{tag}-c{concurrency}",
                                      args.request_timeout_s)
            window = (before, scrape_metrics(servers.metrics_port))
            figures["levels"][str(concurrency)] = level_figures(streams, max_tokens, late, k,
                                                                window)
            streams_of[concurrency] = streams
            log({"event": "level", "tag": tag, "concurrency": concurrency,
                 **_headline(figures["levels"][str(concurrency)])})
        # What start-up measured a draft pass to cost against a verifying step (draft lengths
        # are chosen from it); absent where the engine did not measure it.
        costs = [e.get("guess_cost") for e in servers.engine.log_events()
                 if e.get("event") == "speculation_guess_cost"]
        if costs:
            figures["guess_cost"] = costs[0]
    figures["wall_s"] = round(time.perf_counter() - began, 1)
    return figures, streams_of


def _headline(f: dict) -> dict:
    acceptance = f.get("acceptance") or {}
    return {
        "ok": f"{f['completed']}/{f['requests']}",
        "output_tok_per_s": f["output_tok_per_s"],
        "itl_p50_ms": _ms(f["itl_s"].get("p50")),
        "tpot_p50_ms": _ms(f["tpot_s"].get("p50")),
        "tokens_per_decode_response": f["tokens_per_decode_response"],
        "tokens_per_decode_step": acceptance.get("tokens_per_decode_step"),
        "acceptance_rate": acceptance.get("acceptance_rate"),
        "mean_accepted_length": acceptance.get("mean_accepted_length"),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


def ratios(methods: dict[str, dict], concurrency: list[int]) -> dict:
    """Each method against `none` per concurrency: output tok/s and TPOT p50 ratios."""
    base = methods.get("none", {}).get("levels")
    out: dict = {}
    if not base:
        return out
    for method, figures in methods.items():
        if method == "none" or "levels" not in figures:
            continue
        for c in map(str, concurrency):
            mine, theirs = figures["levels"].get(c), base.get(c)
            if not mine or not theirs:
                continue
            row = out.setdefault(c, {})
            row[f"{method}_over_none_tok_s"] = _ratio(mine["output_tok_per_s"],
                                                      theirs["output_tok_per_s"])
            row[f"{method}_over_none_tpot_p50"] = _ratio(mine["tpot_s"].get("p50"),
                                                         theirs["tpot_s"].get("p50"))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 4)


def targets(ratio_rows: dict, concurrency: list[int], methods: dict[str, dict]) -> dict:
    """The speed-up targets at one stream and the cost bound at the highest concurrency."""
    out: dict = {}
    low, high = str(min(concurrency)), str(max(concurrency))
    for method, bar in SPEEDUP_TARGETS.items():
        value = ratio_rows.get(low, {}).get(f"{method}_over_none_tok_s")
        if value is not None:
            level = methods[method]["levels"][low]
            out[f"{method}_at_{low}_stream"] = {
                "speedup": value, "target": bar, "met": value >= bar,
                "mean_accepted_length": (level.get("acceptance") or {}).get(
                    "mean_accepted_length"),
                "tokens_per_decode_step": (level.get("acceptance") or {}).get(
                    "tokens_per_decode_step"),
                "tokens_per_decode_response": level["tokens_per_decode_response"],
            }
        value = ratio_rows.get(high, {}).get(f"{method}_over_none_tok_s")
        if value is not None:
            out[f"{method}_at_{high}_streams"] = {
                "ratio": value, "target": f">= {1 - MAX_COST_AT_HIGH_CONCURRENCY}",
                "met": value >= 1 - MAX_COST_AT_HIGH_CONCURRENCY,
            }
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    clock = Clock(args.budget_s)
    import torch  # CUDA's presence only: no context in this process

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    plan = time_plan(args, device)
    log({"event": "plan", "device": device, **plan})
    levels_spec = {c: (args.rounds_at_1 if c == 1 else args.rounds) * c
                   for c in args.concurrency}
    num_prompts = WARMUP_STREAMS + sum(levels_spec.values())
    bench_model = None
    if args.w3:
        bench_model = args.bench_model or (BENCH_CHECKPOINT if device == "cuda" else None)
    with tempfile.TemporaryDirectory(prefix="w8-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepared = prepare(args, plan, work, num_prompts, bench_model, device == "cpu")
        # prepared["phases_s"]: when each part of preparing ended, from the child's start.
        phases = {"prepared_at_s": round(clock.elapsed(), 1), "prepare": prepared["phases_s"]}
        prompts = prepared["prompts"]
        warmup, rest = prompts[:WARMUP_STREAMS], prompts[WARMUP_STREAMS:]
        levels: dict[int, list[list[int]]] = {}
        for c, count in levels_spec.items():
            levels[c], rest = rest[:count], rest[count:]
        target = Path(prepared["target"]["dir"])
        draft = prepared.get("draft", {}).get("dir")
        defaults = ["--max-model-len", str(max(1024, args.prompt_tokens + args.output_tokens + 32)),
                    "--max-num-seqs", str(max(64, *args.concurrency))]
        if args.cpu:
            defaults += ["--device", "cpu"]
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.processes, mp_context=context) as pool:
            list(pool.map(_ready, range(args.processes)))  # the load processes, started once
            methods: dict[str, dict] = {}
            streams: dict[str, dict[int, list[Stream]]] = {}
            for method in args.methods:
                flags = engine_flags(defaults + method_flags(method, args, draft), args)
                try:
                    methods[method], streams[method] = serve_method(
                        pool, args, target, flags, k_of(method, args), warmup, levels,
                        args.output_tokens, f"w8-{method}")
                except Exception as exc:  # keep the other methods' figures; say why
                    methods[method] = {"engine_flags": flags, "error": repr(exc)[-2000:]}
                    log({"event": "method_failed", "method": method, "error": repr(exc)[:500]})
            if "none" in streams:
                for method, by_level in streams.items():
                    if method != "none":
                        methods[method]["outputs_equal_to_none"] = {
                            str(c): compare_outputs(s, streams["none"][c])
                            for c, s in by_level.items() if c in streams["none"]}
            phases["served_at_s"] = round(clock.elapsed(), 1)
            w3 = None
            if args.w3:
                w3 = run_w3(pool, args, bench_model, clock, device)
                phases["w3_done_at_s"] = round(clock.elapsed(), 1)
        phases["total_s"] = round(clock.elapsed(), 1)
        ratio_rows = ratios(methods, args.concurrency)
        figures = {
            "methods": methods,
            "ratios_to_none": ratio_rows,
            "targets": targets(ratio_rows, args.concurrency, methods),
            "w3": w3,
            "training": {name: prepared[name] for name in ("target", "draft") if name in prepared},
            "heldout": prepared["heldout"],
            "phases_s": phases,
            "plan_s": plan,
        }
        parameters = {
            "smoke": args.smoke,
            "methods": args.methods,
            "concurrency": args.concurrency,
            "requests_per_level": {str(c): n for c, n in levels_spec.items()},
            "warmup": f"{WARMUP_STREAMS} streams of the same shape at once, then one alone, "
                      "untimed",
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "sampling": f"temperature {args.temperature}, ignore_eos",
            "num_speculative_tokens": {"ngram": args.ngram_k, "draft": args.draft_k},
            "prompts": "held-out stdlib windows, one per request, the same for every method",
            "distinct_prompts": len({tuple(p) for p in prompts}),
            "corpus": prepared["corpus"],
            "model": {"target": _named(prepared.get("target")),
                      "draft": _named(prepared.get("draft"))},
            "training": {"seq_len": args.seq_len, "batch_size": args.batch_size,
                         "micro_batch": args.micro_batch, "target_lr": args.target_lr,
                         "draft_lr": args.draft_lr, "distill": args.distill,
                         "train_device": prepared["device"]},
            "engine_flags": defaults + engine_flags([], args),
            "load_processes": args.processes,
            "w3_model": bench_model.name if bench_model else ("demo" if args.w3 else None),
            "budget_s": args.budget_s,
        }
        path = write_result("W8", parameters, figures, out_dir=args.out_dir)
        if args.smoke:  # never mistaken for a result
            path = path.rename(path.with_name(path.name.replace("W8-", "W8-smoke-", 1)))
    summarize(figures, args)
    print(f"wrote {path}")


def _named(part: dict | None) -> dict | None:
    return None if part is None else part["config"]


def run_w3(pool: concurrent.futures.Executor, args: argparse.Namespace, bench_model: Path | None,
           clock: Clock, device: str) -> dict:
    """W3's shape at one stream on the benchmark model, none against ngram."""
    need = 2 * (ENGINE_START_S[device] + SERVE_S[device])
    if clock.left() < need:
        return {"skipped": f"out of budget: {clock.left():.0f} s left, ~{need:.0f} s needed"}
    if bench_model is None:
        from llmserve.engine_service.demo_model import ensure_demo_model

        bench_model = ensure_demo_model()
    vocab = vocab_size(bench_model)
    next_prompt = prompt_source(args.seed, args.prompt_tokens, vocab)
    warmup = [next_prompt()]
    prompts = [next_prompt() for _ in range(args.w3_repeats)]
    out: dict = {"model": bench_model.name, "repeats": args.w3_repeats}
    streams: dict[str, list[Stream]] = {}
    for method in ("none", "ngram"):
        flags = engine_flags(method_flags(method, args, None), args)
        try:
            figures, by_level = serve_method(pool, args, bench_model, flags, k_of(method, args),
                                             warmup, {1: prompts}, args.output_tokens,
                                             f"w8-w3-{method}")
        except Exception as exc:
            out[method] = {"engine_flags": flags, "error": repr(exc)[-2000:]}
            continue
        out[method] = figures | figures.pop("levels")["1"]
        streams[method] = by_level[1]
    if "none" in streams and "ngram" in streams:
        out["ngram_over_none_tok_s"] = _ratio(out["ngram"]["output_tok_per_s"],
                                              out["none"]["output_tok_per_s"])
        out["ngram"]["outputs_equal_to_none"] = compare_outputs(streams["ngram"], streams["none"])
    return out


def summarize(figures: dict, args: argparse.Namespace) -> None:
    for method, f in figures["methods"].items():
        if "error" in f:
            print(f"W8 {method}: FAILED {f['error'][:300]}")
            continue
        for c, level in f["levels"].items():
            h = _headline(level)
            print(f"W8 {method} @{c}: {h['ok']} ok, {h['output_tok_per_s']:,.1f} tok/s, ITL p50 "
                  f"{h['itl_p50_ms']} ms, TPOT p50 {h['tpot_p50_ms']} ms, tokens/response "
                  f"{h['tokens_per_decode_response']}, tokens/step {h['tokens_per_decode_step']}, "
                  f"acceptance {h['acceptance_rate']}, mean accepted length "
                  f"{h['mean_accepted_length']}")
    for c, row in figures["ratios_to_none"].items():
        print(f"W8 ratios @{c}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    for name, t in figures["targets"].items():
        print(f"W8 target {name}: {t}")
    w3 = figures["w3"]
    if w3 and "skipped" not in w3:
        for method in ("none", "ngram"):
            f = w3.get(method, {})
            if "error" in f:
                print(f"W8 W3 {method}: FAILED {f['error'][:300]}")
            elif f:
                print(f"W8 W3 {method}: TTFT p50 {_ms(f['ttft_s'].get('p50'))} ms, ITL p50/p99 "
                      f"{_ms(f['itl_s'].get('p50'))}/{_ms(f['itl_s'].get('p99'))} ms, TPOT p50 "
                      f"{_ms(f['tpot_s'].get('p50'))} ms, {f['output_tok_per_s']:,.1f} tok/s")
        print(f"W8 W3 ngram/none tok/s: {w3.get('ngram_over_none_tok_s')}")
    elif w3:
        print(f"W8 W3: {w3['skipped']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a CPU run of every path: tiny models, short streams "
                             f"(defaults: {SMOKE})")
    parser.add_argument("--budget-s", type=float, default=520.0,
                        help="the whole run, training included (default: one device call "
                             "less its set-up)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rounds-at-1", type=int, default=8, help="requests at one stream")
    parser.add_argument("--rounds", type=int, default=2,
                        help="requests per slot above one stream (C x this in all)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ngram-k", type=int, default=4, help="--num-speculative-tokens, ngram")
    parser.add_argument("--draft-k", type=int, default=8, help="--num-speculative-tokens, draft")
    parser.add_argument("--target-layers", type=int, default=24)
    parser.add_argument("--target-hidden", type=int, default=1024)
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--draft-hidden", type=int, default=512)
    parser.add_argument("--target-train-s", type=float, default=150.0)
    parser.add_argument("--draft-train-s", type=float, default=90.0)
    parser.add_argument("--target-lr", type=float, default=6e-4)
    parser.add_argument("--draft-lr", type=float, default=1e-3)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per pass")
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--no-distill", dest="distill", action="store_false",
                        help="train the draft on the text instead of on the target's outputs")
    parser.add_argument("--heldout-percent", type=int, default=10)
    parser.add_argument("--heldout-windows", type=int, default=32,
                        help="held-out windows for the held-out loss and agreement")
    parser.add_argument("--max-files", type=int, default=None, help="a cut of the stdlib")
    parser.add_argument("--log-every-s", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads to train (0: all)")
    parser.add_argument("--no-w3", dest="w3", action="store_false",
                        help="skip W3 with n-gram on the benchmark model")
    parser.add_argument("--w3-repeats", type=int, default=10)
    parser.add_argument("--bench-model", type=Path, default=None,
                        help=f"W3's model (default {BENCH_CHECKPOINT} on CUDA, written if "
                             "missing; the demo model on the CPU)")
    parser.add_argument("--processes", type=int, default=4, help="load-generator processes")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="FLAGS",
                        help="extra engine flags for every engine, repeatable")
    parser.add_argument("--cpu", action="store_true", help="train and serve on the CPU")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the checkpoints here (default: a temporary folder)")
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    first, _ = parser.parse_known_args(argv)
    if first.smoke:
        parser.set_defaults(**SMOKE)
    args = parser.parse_args(argv)
    if "none" not in args.methods:
        parser.error("--methods needs none: every figure is relative to it")
    return args


if __name__ == "__main__":
    main()
