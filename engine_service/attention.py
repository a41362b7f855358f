"""Attention backends: where a layer's keys and values are stored and attended to each step."""

from dataclasses import dataclass
from typing import Protocol

import torch

from llmserve.kernels.kv_store import store_kv_torch
from llmserve.kernels.paged_attention import paged_attention_torch


@dataclass
class AttentionMetadata:
    """Where each sequence of the flat batch sits in the paged KV cache this step."""

    query_start_loc: torch.Tensor  # [B + 1] int32: sequence b's tokens are [qsl[b], qsl[b+1])
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache after this step
    block_tables: torch.Tensor  # [B, max_pages] int32
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token


class AttentionBackend(Protocol):
    """Stores this step's K/V for a layer and attends the queries over the cache."""

    name: str

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...


class TorchAttentionBackend:
    """The pure-torch path (CPU, CI, the demo): the kernels' reference twins."""

    name = "torch"

    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
        self.kv_caches = kv_caches
        self.scale = scale
        self.metadata: AttentionMetadata | None = None

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        meta = self.metadata
        assert meta is not None, "set metadata before the forward pass"
        k_cache, v_cache = self.kv_caches[layer]
        store_kv_torch(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_torch(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, self.scale
        )
