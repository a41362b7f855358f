"""The paged KV cache: per layer, K and V pages [num_blocks, block_size, Hkv, D] in the weights'
dtype, or with --kv-cache-dtype fp8_e4m3 in e4m3 with one fp32 scale per (token, KV head) row
beside the pages, [num_blocks, Hkv, block_size] (kernels/fp8_kv.py says why that scheme).

An e4m3 page is stored head by head (each KV head's block_size rows together) and handed out
as the same [num_blocks, block_size, Hkv, D] view with other strides: the kernels address pages
by strides, and a decode program, which reads one KV head, then streams one contiguous run per
page instead of 128-byte rows 1 KB apart (docs/benchmarks.md has the measurement).

Blocks are the unit of everything above (prefix caching, preemption, tensor parallel shards by
KV head), and a block's scales sit at the same block index, so none of it sees the dtype.
"""

from typing import NamedTuple

import torch

from llmserve.kernels.e4m3 import FP8_DTYPE, FP8_MIN_CAPABILITY

SCALE_DTYPE = torch.float32


class LayerCache(NamedTuple):
    """One layer's K and V pages and, for an e4m3 cache, their per-row scales."""

    k: torch.Tensor
    v: torch.Tensor
    scales: tuple[torch.Tensor, torch.Tensor] | None = None


def is_fp8(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype == "fp8_e4m3"


def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                    dtype: torch.dtype, kv_cache_dtype: str) -> int:
    """Bytes of one block over every layer, K and V, scales included."""
    if is_fp8(kv_cache_dtype):
        row = head_dim * FP8_DTYPE.itemsize + SCALE_DTYPE.itemsize
    else:
        row = head_dim * dtype.itemsize
    return 2 * num_layers * block_size * kv_heads * row


def allocate(num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
             dtype: torch.dtype, kv_cache_dtype: str, device: torch.device) -> list[LayerCache]:
    """The zeroed pool, one tensor for the pages and one for the scales, viewed per layer.

    Zeroed, not empty: kernels that load whole pages multiply masked-out rows by zero, and
    0 * NaN from uninitialized memory would still be NaN.
    """
    if not is_fp8(kv_cache_dtype):
        pool = torch.zeros(num_layers, 2, num_blocks, block_size, kv_heads, head_dim,
                           dtype=dtype, device=device)
        return [LayerCache(pool[layer, 0], pool[layer, 1]) for layer in range(num_layers)]
    pages = torch.zeros(num_layers, 2, num_blocks, kv_heads, block_size, head_dim,
                        dtype=FP8_DTYPE, device=device).transpose(3, 4)
    scales = torch.zeros(num_layers, 2, num_blocks, kv_heads, block_size, dtype=SCALE_DTYPE,
                         device=device)
    return [LayerCache(pages[layer, 0], pages[layer, 1], (scales[layer, 0], scales[layer, 1]))
            for layer in range(num_layers)]


def check_kv_cache_dtype(kv_cache_dtype: str, device: torch.device) -> None:
    """Refuses an e4m3 cache on a GPU that cannot convert e4m3 (before Ada, 8.9)."""
    if not is_fp8(kv_cache_dtype) or device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"--kv-cache-dtype {kv_cache_dtype} needs a GPU of compute capability 8.9 or newer "
            f"(Ada, Hopper); {torch.cuda.get_device_name(device)} is "
            f"{capability[0]}.{capability[1]}: use --kv-cache-dtype auto")
