"""`fp8-linear` (docs/benchmarks.md): the FP8 linears alone, the figures kernels/fp8_linear.py's
dispatch by token count M is based on.

Each projection of a Qwen3-8B and a Qwen3-0.6B layer (qkv, o, gate_up, down: weight [N, K]) at
M = 1 to 1024 tokens: bf16 `F.linear`; the W8A8 paths (torch's or the Triton activation
quantizer, then `torch._scaled_mm`; the Triton quantizer, then the Triton `w8a8_gemm` over its
configs, M >= 2); the weight-only Triton `w8a16_gemv` over its configs (M = 1); `fp8_linear`,
the engine's pick among them; and the two activation quantizers alone.

Every op is timed under a CUDA graph of back-to-back calls (>= 20; host launch costs excluded)
replayed a few times, CUDA events, median per call. The calls cycle over enough copies of the
weight (>= 2x L2) that every call reads its weight from HBM, as a model's decode step does.
Each op is checked once against its twin: norm-wise relative error against the fp32 W8A8 twin
(`fp8_linear_torch`) or, for the weight-only GEMV, `F.linear` with the dequantized weight; the
Triton quantizer's values and scales against torch's. Past `--deadline-s` only the default
configs (the ones `fp8_linear` launches) are timed. One progress line per (shape, M); the JSON
has every time, check and failure.

    python benchmarks/fp8_linear.py                       # on a CUDA device
    python benchmarks/fp8_linear.py --device cpu --small  # smoke run in Triton's interpreter
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from cpu_interpreter import use_interpreter_on_cpu
from result_file import RESULTS_DIR, commit, write_result

if TYPE_CHECKING:  # llmserve.kernels is imported once the Triton interpreter is set (main)
    from llmserve.kernels.fp8_gemm import GemmConfig, GemvConfig

WORKLOAD = "fp8-linear"
SHAPES = {  # (N, K) of the weight
    "8B.qkv": (6144, 4096),
    "8B.o": (4096, 4096),
    "8B.gate_up": (24576, 4096),
    "8B.down": (4096, 12288),
    "0.6B.qkv": (4096, 1024),
    "0.6B.o": (1024, 2048),
    "0.6B.gate_up": (6144, 1024),
    "0.6B.down": (1024, 3072),
}
TOKEN_COUNTS = (1, 2, 4, 8, 16, 64, 256, 1024)
CALLS = (20, 256)  # calls per graph: at least (launch costs amortized), at most (weight copies)
# --small, sized for Triton's interpreter: three shapes / 32 (the summary's, the longest K and
# the narrowest N; no K a multiple of the GEMV's tiles), one M per branch of fp8_linear (GEMV,
# Triton GEMM, torch._scaled_mm) and as few rows as each allows: the interpreter runs a program
# per row of the Triton quantizer.
SMALL_SHAPES = ("8B.gate_up", "8B.down", "0.6B.o")
SMALL_DIVISOR = 32
SMALL_TOKEN_COUNTS = (1, 16, 65)
SMALL_CALLS = (2, 2)
SUMMARY_SHAPE, SUMMARY_TOKEN_COUNTS = "8B.gate_up", (1, 256)  # the results table's figures
# Where torch reports no L2 or memory clock (and on the CPU): an H100 SXM5's.
H100_L2_BYTES = 50 << 20
H100_PEAK_BYTES_PER_S = 3.35e12
H100_MULTIPROCESSORS = 132
# Norm-wise error over which an op counts as off its twin (bf16 outputs round at 2^-9); the
# Triton quantizer must match torch's exactly.
TWIN_TOLERANCE = 1e-2
DEFAULT_DEADLINE_S = 125.0  # the whole run then fits in about 150 s on an H100

Call = Callable[[int], Any]  # call(i) runs the op once on weight copy i


@dataclass(frozen=True)
class Setup:
    """What a run measures and on what: the device's figures, or the interpreter's stand-ins."""

    device: str
    shapes: dict[str, tuple[int, int]]
    token_counts: tuple[int, ...]
    min_calls: int
    max_calls: int
    l2_bytes: int
    peak_bytes_per_s: float
    multiprocessors: int

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def make_setup(device: str, small: bool) -> Setup:
    shapes, token_counts, (min_calls, max_calls) = SHAPES, TOKEN_COUNTS, CALLS
    if small:
        shapes = {name: (SHAPES[name][0] // SMALL_DIVISOR, SHAPES[name][1] // SMALL_DIVISOR)
                  for name in SMALL_SHAPES}
        token_counts, (min_calls, max_calls) = SMALL_TOKEN_COUNTS, SMALL_CALLS
    l2, peak, sms = H100_L2_BYTES, H100_PEAK_BYTES_PER_S, H100_MULTIPROCESSORS
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        l2, sms = props.L2_cache_size or l2, props.multi_processor_count
        # DDR: two transfers per clock (kHz); a figure outside 1-10 TB/s is a misreport.
        reported = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8
        peak = reported if 1e12 < reported < 1e13 else peak
    return Setup(device, shapes, token_counts, min_calls, max_calls, l2, peak, sms)


def label(config: GemvConfig | GemmConfig) -> str:
    """A config's short name (the JSON's keys; parameters.configs has the full ones)."""
    from llmserve.kernels.fp8_gemm import GemvConfig

    if isinstance(config, GemvConfig):
        return f"fma{config.block_n}x{config.block_k}/w{config.num_warps}"
    split = f"/k{config.split_k}" if config.split_k > 1 else ""
    return (
        f"{config.block_m}x{config.block_n}x{config.block_k}/g{config.group_m}"
        f"/w{config.num_warps}s{config.num_stages}{split}"
    )


def timed(call: Call, n_calls: int, cuda: bool) -> float:
    """Median microseconds per call of `n_calls` back-to-back calls captured in one CUDA graph
    (on the CPU: each call timed alone)."""
    call(0)  # compiles, and warms cuBLAS outside the capture
    if not cuda:
        times = []
        for i in range(n_calls):
            start = time.perf_counter()
            call(i)
            times.append((time.perf_counter() - start) * 1e6)
        return statistics.median(times)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_calls):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    once_ms = start.elapsed_time(end)
    times = []
    for _ in range(max(3, min(15, int(25 / max(once_ms, 1e-3))))):  # ~25 ms of replays
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph  # its memory pool, before the next capture
    return statistics.median(times) * 1e3 / n_calls


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    return float(f"{err:.4g}")


def try_op(
    row: dict,
    times: dict,
    key: str,
    call: Call,
    n_calls: int,
    cuda: bool,
    check: Callable[[], float] | None = None,
) -> None:
    """Stores check()'s figure in row["checks"][key] and the microseconds per call in
    times[key]; an op that fails (a config that does not compile or launch) goes to
    row["failed"][key] instead, and the run goes on."""
    try:
        if check is not None:
            row["checks"][key] = check()
        times[key] = round(timed(call, n_calls, cuda), 2)
    except Exception as exc:
        row["failed"][key] = f"{type(exc).__name__}: {str(exc)[:300]}"
        if cuda:
            torch.cuda.synchronize()
        else:  # in the smoke run every failure is a bug: show where
            traceback.print_exc()


def off_twin(row: dict) -> list[str]:
    """The ops of a row whose check is over its tolerance."""
    return [
        key
        for key, value in row["checks"].items()
        if value > (0 if key == "quant_triton" else TWIN_TOLERANCE)
    ]


def read_bandwidth() -> float:
    """Bytes per second torch's sum reads from a 2 GiB tensor (a practical peak)."""
    t = torch.empty(1 << 29, dtype=torch.float32, device="cuda").uniform_()
    t.sum()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        t.sum()
    end.record()
    torch.cuda.synchronize()
    return 5 * t.numel() * 4 / (start.elapsed_time(end) * 1e-3)


class Weights:
    """One shape's weight: bf16, e4m3 with its scales, the fp32 dequantized one for the twins,
    and enough copies of the first two that the calls of a graph read theirs from HBM."""

    def __init__(self, n: int, k: int, setup: Setup) -> None:
        from llmserve.kernels.fp8_gemm import quantize_rows_torch

        self.n, self.k = n, k
        gen = torch.Generator(device=setup.device).manual_seed(n * 7 + k)
        w = torch.randn(n, k, device=setup.device, generator=gen, dtype=torch.bfloat16) * 0.02
        w8, self.scale = quantize_rows_torch(w)
        self.dequantized = w8.float() * self.scale
        self.copies = max(1, min(setup.max_calls, math.ceil(2 * setup.l2_bytes / (n * k))))
        self.calls = min(setup.max_calls, max(setup.min_calls, self.copies))
        self.fp8 = [w8] + [w8.clone() for _ in range(self.copies - 1)]
        self.bf16 = [w] + [w.clone() for _ in range(self.copies - 1)]

    def e4m3(self, i: int) -> torch.Tensor:
        return self.fp8[i % self.copies]


def bench(name: str, wt: Weights, m: int, sweep: bool, setup: Setup) -> dict:
    """One (shape, M): every op's microseconds per call and its check against its twin."""
    from llmserve.kernels import fp8_gemm as g
    from llmserve.kernels.fp8_linear import fp8_linear, fp8_linear_torch

    x = torch.randn(m, wt.k, device=setup.device, dtype=torch.bfloat16)
    w8a8_twin = fp8_linear_torch(x.float(), wt.dequantized, None)
    w8a16_twin = F.linear(x.float(), wt.dequantized)
    scale, cuda = wt.scale, setup.cuda
    row: dict[str, Any] = {
        "shape": name, "N": wt.n, "K": wt.k, "M": m,
        "calls_per_graph": wt.calls, "weight_copies": wt.copies,
        "us": {}, "gemv": {}, "gemm": {}, "checks": {}, "failed": {},
    }
    us = row["us"]
    try_op(row, us, "bf16", lambda i: F.linear(x, wt.bf16[i % wt.copies]), wt.calls, cuda)
    try_op(row, us, "quant_torch", lambda i: g.quantize_rows_torch(x), setup.min_calls, cuda)

    def quant_mismatches() -> float:
        """Values and scales of the Triton quantizer that differ from torch's (values, not
        bytes: the Triton one makes -0.0 +0.0)."""
        (q, s), (q_ref, s_ref) = g.quantize_rows_triton(x), g.quantize_rows_torch(x)
        return float((q.float() != q_ref.float()).sum() + (s != s_ref).sum())

    try_op(row, us, "quant_triton", lambda i: g.quantize_rows_triton(x), setup.min_calls, cuda,
           check=quant_mismatches)

    def scaled_mm(quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> Call:
        def call(i: int) -> torch.Tensor:
            x_q, x_s = quantize(x)
            return torch._scaled_mm(x_q, wt.e4m3(i).t(), scale_a=x_s, scale_b=scale.t(),
                                    out_dtype=torch.bfloat16)

        return call

    def gemv(config: GemvConfig) -> Call:
        return lambda i: g.w8a16_gemv(x, wt.e4m3(i), scale, None, config)

    def gemm(config: GemmConfig) -> Call:
        def call(i: int) -> torch.Tensor:
            x_q, x_s = g.quantize_rows_triton(x)
            return g.w8a8_gemm(x_q, x_s, wt.e4m3(i), scale, None, config)

        return call

    def checked(call: Call, twin: torch.Tensor) -> Callable[[], float]:
        return lambda: rel_err(call(0), twin)

    ops = [
        (us, "quant_torch+scaled_mm", scaled_mm(g.quantize_rows_torch), w8a8_twin),
        (us, "quant_triton+scaled_mm", scaled_mm(g.quantize_rows_triton), w8a8_twin),
        # The engine's pick: the GEMV's twin at M = 1 (no activation rounding), else W8A8's.
        (us, "fp8_linear", lambda i: fp8_linear(x, wt.e4m3(i), scale, None),
         w8a16_twin if m == 1 else w8a8_twin),
    ]
    if m == 1:  # the GEMV reads the whole weight again for every row of x
        for config in g.GEMV_CONFIGS if sweep else (g.GEMV_CONFIG,):
            ops.append((row["gemv"], label(config), gemv(config), w8a16_twin))
    else:
        # The tile fp8_linear picks for this shape, then (sweeping) the fixed ones.
        picked = g.gemm_config(m, wt.n, wt.k, setup.multiprocessors)
        row["gemm_picked"] = label(picked)
        for config in dict.fromkeys((picked, *(g.GEMM_CONFIGS if sweep else ()))):
            ops.append((row["gemm"], label(config), gemm(config), w8a8_twin))
    for times, key, call, twin in ops:
        try_op(row, times, key, call, wt.calls, cuda, check=checked(call, twin))

    def best(times: dict[str, float]) -> list:
        return list(min(times.items(), key=lambda kv: kv[1])) if times else [None, None]

    def fraction(us_per_call: float | None, bytes_per_value: int = 1) -> float | None:
        """The weight's bytes per call over the peak HBM bandwidth."""
        if us_per_call is None:
            return None
        bytes_per_s = wt.n * wt.k * bytes_per_value / (us_per_call * 1e-6)
        return round(bytes_per_s / setup.peak_bytes_per_s, 3)

    row["best_gemv"], row["best_gemm"] = best(row["gemv"]), best(row["gemm"])
    row["hbm_fraction"] = {
        "bf16": fraction(us.get("bf16"), 2),
        "gemv": fraction(row["best_gemv"][1]),
        "quant_triton+scaled_mm": fraction(us.get("quant_triton+scaled_mm")),
        "quant_triton+gemm": fraction(row["best_gemm"][1]),
        "fp8_linear": fraction(us.get("fp8_linear")),
    }
    return row


def progress_line(row: dict) -> str:
    def f(us: float | None) -> str:
        return "   -    " if us is None else f"{us:8.2f}"

    us, frac = row["us"], row["hbm_fraction"]
    failed, off = list(row["failed"]), off_twin(row)
    return (
        f"{row['shape']:13s} M={row['M']:5d} | bf16 {f(us.get('bf16'))} ({frac['bf16']}) "
        f"| fp8_linear {f(us.get('fp8_linear'))} ({frac['fp8_linear']}) "
        f"| torchq+mm {f(us.get('quant_torch+scaled_mm'))} "
        f"| tritonq+mm {f(us.get('quant_triton+scaled_mm'))} "
        f"| gemv {f(row['best_gemv'][1])} [{row['best_gemv'][0]}] "
        f"| tritonq+gemm {f(row['best_gemm'][1])} [{row['best_gemm'][0]}] "
        f"| quant torch {f(us.get('quant_torch'))} triton {f(us.get('quant_triton'))}"
        + (f" | FAILED {failed}" if failed else "")
        + (f" | OFF TWIN {off}" if off else "")
    )


def summarize(rows: list[dict]) -> dict:
    """fp8_linear's speed-up over bf16 on SUMMARY_SHAPE at each M, and what went wrong."""
    speedups = {}
    for row in rows:
        bf16, fp8 = row["us"].get("bf16"), row["us"].get("fp8_linear")
        if row["shape"] == SUMMARY_SHAPE and bf16 and fp8:
            speedups[str(row["M"])] = round(bf16 / fp8, 3)
    return {
        "shape": SUMMARY_SHAPE,
        "fp8_linear_speedup_over_bf16_by_m": speedups,
        "failed_ops": sum(len(row["failed"]) for row in rows),
        "ops_off_twin": sum(len(off_twin(row)) for row in rows),
    }


def run(args: argparse.Namespace) -> tuple[dict, dict, str]:
    """(parameters, figures, device name) of one run."""
    import triton

    from llmserve.kernels import fp8_gemm as g

    began = time.perf_counter()
    setup = make_setup(args.device, args.small)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 twins stay fp32
    torch.manual_seed(0)  # the same x, so the same checks, run to run
    device = torch.cuda.get_device_name() if setup.cuda else "cpu (Triton interpreter)"
    read_bps = read_bandwidth() if setup.cuda else None
    parameters = {
        "shapes": setup.shapes,
        "token_counts": list(setup.token_counts),
        "small": args.small,
        "timing": (
            f"{setup.min_calls}-{setup.max_calls} back-to-back calls captured in one CUDA "
            "graph, replayed 3-15 times (about 25 ms), CUDA events; median per call"
            if setup.cuda
            else "each call timed alone on the CPU (Triton's interpreter); median per call"
        ),
        "weight_copies": (
            "per shape, enough e4m3 weights (and as many bf16 ones) to span 2x L2, at most "
            f"{setup.max_calls}, cycled over the calls of a graph: every call reads its weight "
            "from HBM"
        ),
        "l2_bytes": setup.l2_bytes,
        "peak_hbm_bytes_per_s": setup.peak_bytes_per_s,
        "checks": (
            "norm-wise relative error against fp8_linear_torch (W8A8) or F.linear with the "
            "dequantized weight (GEMV; fp8_linear at M = 1); quant_triton: values and scales "
            "differing from quantize_rows_torch's"
        ),
        "twin_tolerance": TWIN_TOLERANCE,
        "configs": {label(c): repr(c) for c in (*g.GEMV_CONFIGS, *g.GEMM_CONFIGS)},
        "defaults": {"gemv": label(g.GEMV_CONFIG), "gemm": "gemm_config(M, N, K, SMs)"},
        "deadline_s": args.deadline_s,
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    read = "-" if read_bps is None else f"{read_bps / 1e12:.2f}"
    print(
        f"{device}: peak HBM {setup.peak_bytes_per_s / 1e12:.2f} TB/s, torch.sum reads {read} "
        f"TB/s; L2 {setup.l2_bytes >> 20} MiB. Columns: us per call (fraction of peak HBM on "
        "weight bytes)",
        flush=True,
    )
    rows: list[dict] = []
    figures: dict[str, Any] = {}
    swept_all = True
    try:
        for name, (n, k) in setup.shapes.items():
            weights = Weights(n, k, setup)
            for m in setup.token_counts:
                if time.perf_counter() - began > args.deadline_s:
                    swept_all = False
                rows.append(bench(name, weights, m, swept_all, setup))
                print(f"[{time.perf_counter() - began:6.1f} s] {progress_line(rows[-1])}",
                      flush=True)
            del weights
            if setup.cuda:
                torch.cuda.empty_cache()
    except Exception:  # keep what was measured: the JSON is written anyway
        figures["fatal"] = traceback.format_exc()
        print(figures["fatal"], flush=True)
    figures |= {
        "summary": summarize(rows),
        "swept_all": swept_all,  # False: past deadline_s only the default configs ran
        "elapsed_s": round(time.perf_counter() - began, 1),
        "read_bytes_per_s": read_bps,
        "rows": rows,
    }
    return parameters, figures, device


def summary_line(device: str, figures: dict) -> str:
    s = figures["summary"]
    speedups = s["fp8_linear_speedup_over_bf16_by_m"]
    by_m = ", ".join(f"x{speedups.get(str(m), '?')} at M = {m}" for m in SUMMARY_TOKEN_COUNTS)
    text = (
        f"{WORKLOAD} on {device} @ {commit()}: {s['shape']} fp8_linear over bf16 {by_m}; "
        f"{s['failed_ops']} ops failed, {s['ops_off_twin']} off their twin"
    )
    if not figures["swept_all"]:
        text += "; past the deadline only the default configs ran"
    return text + ("; FATAL (see figures.fatal)" if "fatal" in figures else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (for --device cpu)")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=DEFAULT_DEADLINE_S,
        help="past this many seconds only the default configs are timed",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the JSON result")
    args = parser.parse_args()
    use_interpreter_on_cpu(parser, args)
    parameters, figures, device = run(args)
    path = write_result(WORKLOAD, parameters, figures, out_dir=args.out, device=device)
    print(summary_line(device, figures))
    print(f"wrote {path}")
    if "fatal" in figures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
