"""Which implementation of each kernel the engine calls: the torch twins or the Triton kernels.

`kernel_ops(device)` gives the Triton kernels on CUDA and the torch twins on the CPU, unless
LLMSERVE_TRITON_ON_CPU=1 asks for the Triton kernels on the CPU too (run by Triton's
interpreter: tests only; importing llmserve.kernels then turns TRITON_INTERPRET on).
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmserve.kernels.activation import silu_and_mul, silu_and_mul_torch
from llmserve.kernels.paged_attention import paged_attention_torch
from llmserve.kernels.paged_decode import paged_decode_attention
from llmserve.kernels.paged_extend import paged_extend_attention
from llmserve.kernels.qkv_rope_store import qkv_rope_store, qkv_rope_store_torch
from llmserve.kernels.rms_norm import add_rms_norm, add_rms_norm_torch, rms_norm, rms_norm_torch


def paged_decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """paged_attention_torch for one query token per sequence (paged_decode_attention's twin)."""
    starts = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_attention_torch(q, k_cache, v_cache, starts, seq_lens, block_tables, scale)


@dataclass(frozen=True)
class KernelOps:
    """One implementation of every kernel; the fields share the twins' signatures.

    `attention` is the general varlen path (prefill, chunks, decode rows mixed in); `decode`
    is the faster path for steps where every sequence has exactly one query token (the Triton
    one also takes num_splits= and tiles=; called with the six shared arguments, either works).
    """

    name: str
    attention: Callable[..., torch.Tensor]
    decode: Callable[..., torch.Tensor]
    qkv_rope_store: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[..., torch.Tensor]


TORCH_OPS = KernelOps("torch", paged_attention_torch, paged_decode_attention_torch,
                      qkv_rope_store_torch, rms_norm_torch, add_rms_norm_torch,
                      silu_and_mul_torch)
TRITON_OPS = KernelOps("triton", paged_extend_attention, paged_decode_attention,
                       qkv_rope_store, rms_norm, add_rms_norm, silu_and_mul)


def kernel_ops(device: torch.device | str) -> KernelOps:
    """Triton on CUDA (or on the CPU with LLMSERVE_TRITON_ON_CPU=1), the torch twins otherwise."""
    if torch.device(device).type == "cuda" or os.environ.get("LLMSERVE_TRITON_ON_CPU") == "1":
        return TRITON_OPS
    return TORCH_OPS
