"""Streaming-latency plumbing shared by W2 (`serving.py`) and W3 (`single.py`).

- The two targets: `engine` (one engine's EngineService.Generate, prompt token ids) and `router`
  (GenerateService.Generate with `prompt_token_ids` through a router in front of the same
  engine, which detokenizes what it streams).
- Client-side measurement, as docs/benchmarks.md defines stream measurement: TTFT = sent ->
  first response carrying a token; a response carrying k tokens is k arrivals at one instant;
  ITL = gaps between consecutive arrivals; TPOT = (last - first arrival) / (tokens - 1).
- The servers both scripts start (fresh processes, engine /metrics on a free port) and the
  engine-side figures read from that /metrics endpoint.
- With --pin-cpus, the engine, the router and the load generator each run on their own CPUs.

No torch at import time: the load-generator processes import this module.
"""

import argparse
import json
import os
import shlex
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from harness import ServerProcess, start_engine, start_router
from prometheus_client.parser import text_string_to_metric_families
from result_file import RESULTS_DIR

from llmserve.common.ports import ephemeral_port
from llmserve.v1 import (
    common_pb2,
    engine_service_pb2,
    engine_service_pb2_grpc,
    generate_service_pb2,
    generate_service_pb2_grpc,
)

TARGETS = ("engine", "router")
BENCH_CHECKPOINT = Path("/tmp/qwen3-0.6b-shape")  # where scripts/device-run.sh writes it
ENGINE_TTFT = "llmserve_engine_time_to_first_token_seconds"
ENGINE_ITL = "llmserve_engine_inter_token_latency_seconds"


@dataclass
class StreamRecord:
    """One request as its client saw it; times in seconds on one clock."""

    index: int
    sent: float
    arrivals: list[float] = field(default_factory=list)  # one entry per token
    status: str = "OK"  # a gRPC status name, or NO_FINISH for a stream that ended unfinished
    cached_prompt_tokens: int = 0
    sent_wall: float = 0.0  # time.time() when sent, to line up with server log timestamps

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.sent if self.arrivals else None

    @property
    def tpot(self) -> float | None:
        n = len(self.arrivals)
        return (self.arrivals[-1] - self.arrivals[0]) / (n - 1) if n > 1 else None

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]

    def shifted(self, origin: float) -> "StreamRecord":
        """The same record with every time relative to `origin`."""
        self.sent -= origin
        self.arrivals = [t - origin for t in self.arrivals]
        return self


class StreamClient:
    """Sends Generate streams to one target over one grpc.aio channel and times them."""

    def __init__(self, channel: grpc.aio.Channel, target: str) -> None:
        if target == "engine":
            self._generate = engine_service_pb2_grpc.EngineServiceStub(channel).Generate
            self._message = engine_service_pb2.EngineServiceGenerateRequest
        elif target == "router":
            self._generate = generate_service_pb2_grpc.GenerateServiceStub(channel).Generate
            self._message = generate_service_pb2.GenerateRequest
        else:
            raise ValueError(f"unknown target {target!r}")

    async def stream(
        self,
        index: int,
        prompt: list[int],
        max_tokens: int,
        temperature: float,
        request_id: str,
        timeout: float | None,
    ) -> StreamRecord:
        message = self._message(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling=common_pb2.SamplingParams(temperature=temperature),
            stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
        )
        record = StreamRecord(index, time.perf_counter(), sent_wall=time.time())
        finished = False
        try:
            async for response in self._generate(message, timeout=timeout):
                now = time.perf_counter()
                record.arrivals.extend([now] * len(response.token_ids))
                if response.finish_reason:
                    finished = True
                    record.cached_prompt_tokens = response.usage.cached_prompt_tokens
        except grpc.aio.AioRpcError as exc:
            record.status = exc.code().name
        else:
            record.status = "OK" if finished else "NO_FINISH"
        return record


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99 (linear interpolation between ranks, as numpy's default) and the mean."""
    if not values:
        return {}
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else []
    pick = (lambda p: cuts[p - 1]) if cuts else (lambda p: values[0])
    return {f"p{p}": round(pick(p), 6) for p in (50, 90, 99)} | {
        "mean": round(statistics.fmean(values), 6)
    }


def latency_figures(records: list[StreamRecord]) -> dict[str, dict[str, float]]:
    """TTFT and TPOT over requests, ITL over all tokens, in seconds."""
    return {
        "ttft_s": percentiles([r.ttft for r in records if r.ttft is not None]),
        "tpot_s": percentiles([r.tpot for r in records if r.tpot is not None]),
        "itl_s": percentiles([g for r in records for g in r.gaps()]),
    }


def outcome_figures(records: list[StreamRecord], max_tokens: list[int]) -> dict:
    """Completed and failed requests (by status), short streams, tokens, prefix-cache hits."""
    failed: dict[str, int] = {}
    for r in records:
        if r.status != "OK":
            failed[r.status] = failed.get(r.status, 0) + 1
    return {
        "requests": len(records),
        "completed": sum(r.status == "OK" for r in records),
        "failed": failed,
        "short_streams": sum(
            r.status == "OK" and len(r.arrivals) != max_tokens[r.index] for r in records
        ),
        "output_tokens": sum(len(r.arrivals) for r in records),
        "cached_prompt_tokens": sum(r.cached_prompt_tokens for r in records),
    }


Scrape = dict[str, float]  # one /metrics read: sample name (with labels) -> value


def scrape_metrics(port: int) -> Scrape:
    """Every sample on the engine's /metrics, keyed by name (and labels, where it has any)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        sample.name + (str(sorted(sample.labels.items())) if sample.labels else ""): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def histogram_delta(windows: list[tuple[Scrape, Scrape]], name: str) -> dict:
    """Observations, their sum and mean of histogram `name` within (before, after) windows."""
    count = sum(a.get(name + "_count", 0.0) - b.get(name + "_count", 0.0) for b, a in windows)
    total = sum(a.get(name + "_sum", 0.0) - b.get(name + "_sum", 0.0) for b, a in windows)
    return {"count": int(count), "sum_s": total, "mean_s": total / count if count else None}


def engine_side(windows: list[tuple[Scrape, Scrape]]) -> dict:
    """The engine's own mean TTFT (frontend received -> first token handed to the stream) and
    ITL (gap between tokens reaching its frontend) over what ran within (before, after) scrape
    windows."""
    ttft = histogram_delta(windows, ENGINE_TTFT)
    itl = histogram_delta(windows, ENGINE_ITL)
    return {
        "engine_ttft_mean_s": _round(ttft["mean_s"]),
        "engine_itl_mean_s": _round(itl["mean_s"]),
        "engine_streams": ttft["count"],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


@dataclass(frozen=True)
class CpuPinning:
    """Disjoint CPU sets for the engine, the router and the load generator.

    Meant to keep a busy-polling router's core away from the engine's step loop. On the H200
    host, a VM that hides which vCPUs share a physical core, it made W2's router cost worse
    (+1.50 against +0.80 ms at 4 req/s on one lease): an option for hosts that show topology.
    """

    engine: frozenset[int]
    router: frozenset[int]
    load: frozenset[int]

    @classmethod
    def split(cls, cpus: Iterable[int]) -> "CpuPinning":
        """Half of `cpus` (in order) for the engine, a quarter each for the router and load."""
        ordered = sorted(cpus)
        if len(ordered) < 4:
            raise ValueError(f"--pin-cpus needs 4 CPUs or more; this process may use {ordered}")
        quarter = len(ordered) // 4
        engine_end = len(ordered) - 2 * quarter
        return cls(
            frozenset(ordered[:engine_end]),
            frozenset(ordered[engine_end : engine_end + quarter]),
            frozenset(ordered[engine_end + quarter :]),
        )

    def describe(self) -> dict[str, list[int]]:
        return {
            "engine": sorted(self.engine),
            "router": sorted(self.router),
            "load": sorted(self.load),
        }


def pinning_of(args: argparse.Namespace) -> CpuPinning | None:
    """The CPU split --pin-cpus asks for, over the CPUs this process may use; else None."""
    return CpuPinning.split(os.sched_getaffinity(0)) if args.pin_cpus else None


@dataclass
class Servers:
    """The engine, the router in front of it (when asked for) and the engine's metrics port."""

    engine: ServerProcess
    router: ServerProcess | None
    metrics_port: int

    def address(self, target: str) -> str:
        server = self.engine if target == "engine" else self.router
        assert server is not None, f"no {target} started"
        return server.address


@contextmanager
def started_servers(
    model: Path,
    engine_args: list[str],
    with_router: bool,
    router_args: list[str],
    pinning: CpuPinning | None = None,
) -> Iterator[Servers]:
    """A fresh engine (its /metrics on a free port) and, if asked, a router in front of it,
    each on its CPUs of `pinning` when given."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics_port = ephemeral_port()
        engine = start_engine(
            model,
            Path(tmp),
            *engine_args,
            "--metrics-port",
            str(metrics_port),
            cpus=pinning and pinning.engine,
        )
        router = None
        try:
            if with_router:
                router = start_router(
                    model, [engine], Path(tmp), *router_args, cpus=pinning and pinning.router
                )
            yield Servers(engine, router, metrics_port)
        finally:
            if router is not None:
                router.stop()
            engine.stop()


def default_model() -> Path:
    """The demo model on the CPU; qwen3-0.6b-shape where CUDA is (written once if missing)."""
    import torch

    if not torch.cuda.is_available():
        from llmserve.engine_service.demo_model import ensure_demo_model

        return ensure_demo_model()
    if not (BENCH_CHECKPOINT / "model.safetensors").is_file():
        from bench_checkpoint import write_bench_checkpoint

        write_bench_checkpoint(BENCH_CHECKPOINT)
    return BENCH_CHECKPOINT


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"checkpoint directory (default: the demo model on the CPU, {BENCH_CHECKPOINT} "
        "on CUDA)",
    )
    parser.add_argument(
        "--target",
        nargs="+",
        choices=[*TARGETS, "both"],
        default=["both"],
        help="engine: straight to the engine; router: through a router in front of it",
    )
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="FLAGS",
        help="extra engine flags, repeatable: --engine-arg=--enforce-eager "
        "--engine-arg='--num-kv-blocks 4096'",
    )
    parser.add_argument(
        "--router-arg",
        action="append",
        default=[],
        metavar="FLAGS",
        help="extra router flags, repeatable: --router-arg=--busy-poll",
    )
    parser.add_argument(
        "--pin-cpus",
        action="store_true",
        help="run the engine on half of the CPUs, the router and the load generator on a "
        "quarter each, none shared",
    )
    parser.add_argument("--request-timeout-s", type=float, default=3600.0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)


def targets_of(args: argparse.Namespace) -> list[str]:
    return [t for t in TARGETS if t in args.target or "both" in args.target]


def engine_flags(defaults: list[str], args: argparse.Namespace) -> list[str]:
    """The script's engine flags, then --engine-arg's (argparse lets the later ones win)."""
    return [*defaults, *(f for chunk in args.engine_arg for f in shlex.split(chunk))]


def router_flags(args: argparse.Namespace) -> list[str]:
    """The flags --router-arg gave, split as a shell would."""
    return [f for chunk in args.router_arg for f in shlex.split(chunk)]


def vocab_size(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["vocab_size"])
