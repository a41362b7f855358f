"""Which implementation of each pointwise kernel the model calls: the torch twins or the Triton
kernels (attention's are chosen per backend, in engine_service/attention/backends.py).

`kernel_ops(device)` gives the Triton kernels on CUDA and the torch twins on the CPU, unless
LLMSERVE_TRITON_ON_CPU=1 asks for the Triton kernels on the CPU too (run by Triton's
interpreter: tests only; importing llmserve.kernels then turns TRITON_INTERPRET on).
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmserve.kernels.activation import (
    silu_and_mul,
    silu_and_mul_fp8,
    silu_and_mul_fp8_torch,
    silu_and_mul_torch,
)
from llmserve.kernels.e4m3 import QuantizedRows
from llmserve.kernels.qkv_rope_store import qkv_rope_store, qkv_rope_store_torch
from llmserve.kernels.rms_norm import (
    add_rms_norm,
    add_rms_norm_fp8,
    add_rms_norm_fp8_torch,
    add_rms_norm_torch,
    rms_norm,
    rms_norm_fp8,
    rms_norm_fp8_torch,
    rms_norm_torch,
)


@dataclass(frozen=True)
class KernelOps:
    """One implementation of every pointwise kernel; the fields share the twins' signatures.
    The `*_fp8` ones hand an FP8 linear its input already rounded to e4m3 (QuantizedRows)."""

    name: str
    qkv_rope_store: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[..., torch.Tensor]
    rms_norm_fp8: Callable[..., QuantizedRows]
    add_rms_norm_fp8: Callable[..., tuple[QuantizedRows, torch.Tensor]]
    silu_and_mul_fp8: Callable[..., QuantizedRows]


TORCH_OPS = KernelOps("torch", qkv_rope_store_torch, rms_norm_torch, add_rms_norm_torch,
                      silu_and_mul_torch, rms_norm_fp8_torch, add_rms_norm_fp8_torch,
                      silu_and_mul_fp8_torch)
TRITON_OPS = KernelOps("triton", qkv_rope_store, rms_norm, add_rms_norm, silu_and_mul,
                       rms_norm_fp8, add_rms_norm_fp8, silu_and_mul_fp8)


def kernel_ops(device: torch.device | str) -> KernelOps:
    """Triton on CUDA (or on the CPU with LLMSERVE_TRITON_ON_CPU=1), the torch twins otherwise."""
    if torch.device(device).type == "cuda" or os.environ.get("LLMSERVE_TRITON_ON_CPU") == "1":
        return TRITON_OPS
    return TORCH_OPS
