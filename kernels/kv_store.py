"""Writes this step's keys and values into their cache slots (block * block_size + offset).

The torch form; on the GPU the store is part of the fused `qkv_rope_store` kernel.
"""

import torch

from llmserve.kernels.fp8_kv import quantize_kv_torch


def store_kv_torch(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """k/v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D]; slots < 0 are padding.

    With `kv_scales` ([num_blocks, Hkv, block_size] fp32 each) the caches are e4m3: each row is
    quantized with its own scale, stored there (see fp8_kv)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()  # index_copy_ takes only int64; int32 maps are common
    if kv_scales is None:
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep])
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep])
        return
    block_size = k_cache.shape[1]
    for x, cache, scales in ((k, k_cache, kv_scales[0]), (v, v_cache, kv_scales[1])):
        x8, scale = quantize_kv_torch(x[keep])
        # No float8 indexing kernels on the CPU: copy the bytes (the e4m3 pool is a strided
        # view, see kv_cache.allocate, so by page and slot rather than through a flat view).
        cache.view(torch.uint8)[slots // block_size, slots % block_size] = x8.view(torch.uint8)
        scales[slots // block_size, :, slots % block_size] = scale
