"""W1 `throughput` (docs/benchmarks.md): offline throughput, nano-vllm's bench reproduced.

256 random prompts (100-1024 tokens) and lengths (100-1024 tokens, 133,966 in all), temperature
0.6, ignore_eos, max_model_len 4096; one short untimed warm-up generation, then one timed
`LLM.generate` call. Reports tok/s and the fraction of the memory-bandwidth floor, with the
device-to-device copy bandwidth measured in the same run.

KV pages are 128 tokens here (the engine's default is 16): an offline job has no prefixes to
share at a finer grain, and the decode kernel reads long pages faster (K1 at page 128: 291.5 us
against 297.8 us at page 16 on an H100). nano-vllm's own bench runs with 256-token blocks.

    python benchmarks/throughput.py --model /tmp/qwen3-0.6b-shape             # CUDA graphs
    python benchmarks/throughput.py --model DIR --enforce-eager               # eager decode
    python benchmarks/throughput.py --model DIR --attention-backend flash_attn
    python benchmarks/throughput.py --model DIR --peer transformers [--peer-deadline-s 90]
    python benchmarks/throughput.py --model "$(llmserve-demo-model)" --limit 4  # CPU smoke run
"""

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from result_file import RESULTS_DIR, device_name, write_result
from step_breakdown import sampler_versus_kernel, step_breakdown
from step_timeline import StepTimeline
from transformers_peer import run_transformers_peer
from w1_draws import fold_into_vocab, w1_requests, warmup_prompts
from w1_engine import add_engine_arguments, build_llm, engine_parameters, implementation_tag

from llmserve.engine_service.attention.kv_cache import bytes_per_block
from llmserve.engine_service.llm import LLM
from llmserve.engine_service.models.checkpoint import read_model_spec
from llmserve.engine_service.seam import SamplingOptions


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of 10 copies."""
    nbytes = (2 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - began)
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times[2:])


def floor_bytes(
    prompts: list[list[int]], max_tokens: list[int], kv_bytes_per_token: int, weight_bytes: int
) -> tuple[int, int]:
    """(KV bytes, weight bytes) the decode steps must read at the least.

    The step that draws a sequence's j-th token reads its context of len(prompt) + j tokens;
    the longest request takes max(max_tokens) steps, each reading every weight once.
    """
    kv_tokens = sum(m * len(p) + m * (m - 1) // 2 for p, m in zip(prompts, max_tokens, strict=True))
    return kv_tokens * kv_bytes_per_token, max(max_tokens) * weight_bytes


def run_ours(
    args: argparse.Namespace, prompts: list[list[int]], max_tokens: list[int]
) -> tuple[dict, LLM]:
    started = time.perf_counter()
    llm = build_llm(args)
    start_s = time.perf_counter() - started
    warm = time.perf_counter()
    llm.generate(
        warmup_prompts(llm.info.vocab_size),
        SamplingOptions(temperature=0.6, ignore_eos=True, max_tokens=16),
        use_tqdm=False,
    )
    warm_s = time.perf_counter() - warm
    sampling = [SamplingOptions(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]
    synchronize = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    synchronize()
    with StepTimeline(llm) as timeline:
        began = time.perf_counter()
        outputs = llm.generate(prompts, sampling, use_tqdm=not args.no_progress)
        synchronize()
        ended = time.perf_counter()
    wall_s = ended - began
    generated = sum(len(o.token_ids) for o in outputs)
    breakdown = None
    if args.breakdown_tokens:
        breakdown = step_breakdown(llm, prompts, args.breakdown_tokens)
        if args.device == "cuda":
            breakdown["sampler_vs_one_pass_kernel"] = sampler_versus_kernel(
                len(prompts), llm.info.vocab_size, args.device
            )
    figures = {
        "tok_per_s": round(sum(max_tokens) / wall_s, 2),
        "wall_s": round(wall_s, 3),
        "generated_tokens": generated,
        "all_tokens_generated": generated == sum(max_tokens),
        "engine_start_s": round(start_s, 2),
        "warmup_s": round(warm_s, 2),
        "attention_backend": llm.info.attention_backend,
        "dtype": llm.info.dtype,
        "num_kv_blocks": llm.info.num_blocks,
        "weight_bytes": llm.core.runner.weight_bytes,
        "step_kinds": timeline.summary(began, ended),
        "step_breakdown": breakdown,
    }
    return figures, llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    add_engine_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="only the first N requests")
    parser.add_argument("--workload", choices=["W1", "W1L"], default="W1",
                        help="W1L: the same requests on qwen3-8b-shape (docs/benchmarks.md)")
    parser.add_argument(
        "--peer",
        choices=["transformers"],
        default=None,
        help="run the peer baseline instead of llmserve",
    )
    parser.add_argument(
        "--peer-deadline-s",
        type=float,
        default=None,
        help="stop the peer after this long and count the tokens it made",
    )
    parser.add_argument(
        "--breakdown-tokens",
        type=int,
        default=None,
        help="after the timed run, time decode steps' parts over this many "
        "tokens per request (default 64 on CUDA, 8 on the CPU; 0 = off)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    if args.breakdown_tokens is None:
        args.breakdown_tokens = 64 if args.device == "cuda" else 8

    prompts, max_tokens = w1_requests()
    prompts, max_tokens = prompts[: args.limit], max_tokens[: args.limit]
    spec = read_model_spec(args.model)
    folded = spec.vocab_size <= 10000  # a small smoke-test model
    prompts = fold_into_vocab(prompts, spec.vocab_size)
    bandwidth = copy_bandwidth(args.device)
    llm = None
    if args.peer == "transformers":
        figures = run_transformers_peer(
            str(args.model),
            prompts,
            max_tokens,
            warmup_prompts(spec.vocab_size)[0],
            args.peer_deadline_s,
        )
        tag = "transformers"
    else:
        figures, llm = run_ours(args, prompts, max_tokens)
        tag = implementation_tag(args, figures["attention_backend"])
    figures["copy_bandwidth_tb_per_s"] = round(bandwidth / 1e12, 4)
    if "error" not in figures:
        # KV bytes per token as docs/benchmarks.md counts them (28 layers x K,V x 8 x 128 x 2
        # for the benchmark model in bf16; e4m3 rows and their scales with an FP8 cache);
        # weights as loaded (bf16 on the GPU).
        kv_per_token = bytes_per_block(spec.num_layers, 1, spec.num_kv_heads, spec.head_dim,
                                       torch.bfloat16, args.kv_cache_dtype)
        weight_bytes = figures.pop("weight_bytes", None) or _bf16_weight_bytes(args.model)
        kv_bytes, w_bytes = floor_bytes(prompts, max_tokens, kv_per_token, weight_bytes)
        floor_s = (kv_bytes + w_bytes) / bandwidth
        figures |= {
            "floor_s": round(floor_s, 3),
            "kv_bytes_read": kv_bytes,
            "weight_bytes_read": w_bytes,
        }
        if not figures.get("partial"):
            figures["fraction_of_floor"] = round(floor_s / figures["wall_s"], 4)
    parameters = {
        "impl": tag,
        "model": args.model.name,
        "requests": len(prompts),
        "limit": args.limit,
        "max_tokens_total": sum(max_tokens),
        "temperature": 0.6,
        "ignore_eos": True,
        **engine_parameters(args),
        "peer_deadline_s": args.peer_deadline_s,
        "prompt_ids_folded_into_vocab": folded,
        "torch": torch.__version__,
    }
    path = write_result(args.workload, parameters, figures, out_dir=args.out)
    path = path.rename(path.with_name(path.name.replace(f"{args.workload}-",
                                                        f"{args.workload}-{tag}-", 1)))
    print(_summary(args.workload, tag, figures))
    if llm is not None:
        # After the result is written: tensor-parallel ranks take a while to tear down.
        llm.close()
    print(f"wrote {path}")


def _bf16_weight_bytes(model_dir: Path) -> int:
    """Parameter bytes in bf16 from the checkpoint's safetensors headers (tied weights once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                total += 2 * math.prod(f.get_slice(name).get_shape())
    return total


def _summary(workload: str, tag: str, figures: dict) -> str:
    if "error" in figures:
        return f"{workload} {tag} on {device_name()}: failed: {figures['error'][:300]}"
    line = (
        f"{workload} {tag} on {device_name()}: {figures['tok_per_s']:,.0f} tok/s "
        f"({figures['wall_s']:.2f} s; floor {figures['floor_s']:.2f} s at "
        f"{figures['copy_bandwidth_tb_per_s']:.2f} TB/s copy"
    )
    if "fraction_of_floor" in figures:
        line += f" = {figures['fraction_of_floor']:.1%} of the floor"
    if figures.get("partial"):
        line += (
            f"; partial: {figures['requests_finished']} of {figures['requests']} "
            f"requests finished in {figures['deadline_s']} s"
        )
    if figures.get("all_tokens_generated") is False:
        line += "; NOT every requested token was generated"
    return line + ")"


if __name__ == "__main__":
    main()
