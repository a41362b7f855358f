"""W1's offline engine: its flags, the LLM built from them and the parameters a result records;
shared by W1 (throughput.py) and W7 (structured.py) so both measure the same configuration."""

import argparse

import torch

from llmserve.engine_service.llm import LLM

MAX_MODEL_LEN = 4096


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="through torch.distributed and the rank step channel even at TP=1",
    )
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8_e4m3"], default="auto")
    parser.add_argument("--quantization", choices=["none", "fp8"], default="none")
    parser.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read each step's tokens while the next runs (default: the engine's, on CUDA)",
    )


def build_llm(args: argparse.Namespace) -> LLM:
    return LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        distributed=args.distributed,
        async_scheduling=args.async_scheduling,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
    )


def implementation_tag(args: argparse.Namespace, attention_backend: str) -> str:
    """`llmserve-<backend>-<graphs|eager>[-sync][-tpN]`, as results_table.py rebuilds it."""
    tag = "llmserve-" + attention_backend.replace(",", "-").replace("=", "-")
    tag += "-eager" if args.enforce_eager or args.device != "cuda" else "-graphs"
    if args.async_scheduling is False:
        tag += "-sync"
    if args.tensor_parallel_size > 1 or args.distributed:
        tag += f"-tp{args.tensor_parallel_size}"
    if args.quantization != "none":
        tag += f"-w{args.quantization}"
    if args.kv_cache_dtype != "auto":
        tag += "-kv" + args.kv_cache_dtype.split("_")[0]
    return tag


def engine_parameters(args: argparse.Namespace) -> dict:
    return {
        "max_model_len": MAX_MODEL_LEN,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "block_size": args.block_size,
        "attention_backend": args.attention_backend,
        "enforce_eager": args.enforce_eager,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "tensor_parallel_size": args.tensor_parallel_size,
        "distributed": args.distributed or args.tensor_parallel_size > 1,
        "async_scheduling": args.async_scheduling,
        "dtype": args.dtype,
        "kv_cache_dtype": args.kv_cache_dtype,
        "quantization": args.quantization,
    }
