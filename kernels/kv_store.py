"""Writes this step's keys and values into their cache slots (block * block_size + offset).

The torch form; on the GPU the store is part of the fused `qkv_rope_store` kernel.
"""

import torch


def store_kv_torch(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k/v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D]; slots < 0 are padding."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()  # index_copy_ takes only int64; int32 maps are common
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep])
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep])
