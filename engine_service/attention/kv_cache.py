"""The paged KV cache: per layer, K and V pages [num_blocks, block_size, Hkv, D] in the weights'
dtype, or with --kv-cache-dtype fp8_e4m3 in e4m3 with one bfloat16 scale per (token, KV head) row
beside the pages, [num_blocks, Hkv, block_size] (kernels/fp8_kv.py says why that scheme).

An e4m3 page is stored head by head and handed out as the same [num_blocks, block_size, Hkv,
D] view with other strides (the kernels address pages and scales by strides): per (layer,
block, KV head), K's block_size rows, their scales, V's rows and theirs lie side by side. A
decode program reads one KV head, so each page it visits is one contiguous run of rows and
scales, not 128-byte rows 1 KB apart with the scales in another tensor (docs/benchmarks.md has
the measurements).

Blocks are the unit of everything above (prefix caching, preemption, tensor parallel shards by
KV head), and a block's scales sit at the same block index, so none of it sees the dtype.
"""

from typing import NamedTuple

import torch

from llmserve.kernels.e4m3 import FP8_DTYPE, FP8_MIN_CAPABILITY
from llmserve.kernels.fp8_kv import KV_SCALE_DTYPE, quantize_kv_torch


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
        row = head_dim * FP8_DTYPE.itemsize + KV_SCALE_DTYPE.itemsize
    else:
        row = head_dim * dtype.itemsize
    return 2 * num_layers * block_size * kv_heads * row


def allocate(num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
             dtype: torch.dtype, kv_cache_dtype: str, device: torch.device) -> list[LayerCache]:
    """The zeroed pool, one tensor (an e4m3 cache's scales inside it), viewed per layer.

    Zeroed, not empty: kernels that load whole pages multiply masked-out rows by zero, and
    0 * NaN from uninitialized memory would still be NaN.
    """
    if not is_fp8(kv_cache_dtype):
        pool = torch.zeros(num_layers, 2, num_blocks, block_size, kv_heads, head_dim,
                           dtype=dtype, device=device)
        return [LayerCache(pool[layer, 0], pool[layer, 1]) for layer in range(num_layers)]
    # Per (layer, block, KV head), side by side: K's rows, their scales, V's rows, theirs.
    rows = block_size * head_dim  # e4m3 bytes of one head's rows in a page
    step = KV_SCALE_DTYPE.itemsize
    part = rows + block_size * step
    unit = 2 * part
    pool = torch.zeros(num_layers * num_blocks * kv_heads * unit, dtype=torch.uint8,
                       device=device)
    values, scales = pool.view(FP8_DTYPE), pool.view(KV_SCALE_DTYPE)

    def view(layer: int, which: int) -> tuple[torch.Tensor, torch.Tensor]:
        at = layer * num_blocks * kv_heads * unit + which * part
        return (values.as_strided((num_blocks, block_size, kv_heads, head_dim),
                                  (kv_heads * unit, head_dim, unit, 1), at),
                scales.as_strided((num_blocks, kv_heads, block_size),
                                  (kv_heads * unit // step, unit // step, 1), (at + rows) // step))

    caches = []
    for layer in range(num_layers):
        (k, k_scales), (v, v_scales) = view(layer, 0), view(layer, 1)
        caches.append(LayerCache(k, v, (k_scales, v_scales)))
    return caches


def quantize_pages(k: torch.Tensor, v: torch.Tensor, chunk: int = 256) -> LayerCache:
    """One layer's e4m3 cache in allocate's layout holding K/V pages [num_blocks, block_size,
    Hkv, D] as the store writes them (each row scaled by its own amax), `chunk` blocks at a
    time: the kernels' tests and benchmarks measure the cache the engine reads."""
    num_blocks, block_size, kv_heads, head_dim = k.shape
    cache = allocate(1, num_blocks, block_size, kv_heads, head_dim, k.dtype, "fp8_e4m3",
                     k.device)[0]
    assert cache.scales is not None
    for src, values, scales in zip((k, v), (cache.k, cache.v), cache.scales, strict=True):
        for lo in range(0, num_blocks, chunk):
            x8, scale = quantize_kv_torch(src[lo : lo + chunk])
            values[lo : lo + chunk] = x8
            scales[lo : lo + chunk] = scale.transpose(1, 2)
    return cache


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
