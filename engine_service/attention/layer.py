"""Paged attention for the model: store each layer's new K/V, attend with the phase's backend."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmserve.engine_service.attention.kv_cache import LayerCache
from llmserve.kernels.e4m3 import UnscaledProduct

KVScales = tuple[torch.Tensor, torch.Tensor] | None

class BackendUnavailableError(ValueError):
    """The attention backend asked for cannot run here; the message says what is missing."""


@dataclass
class AttentionMetadata:
    """Where each sequence of the flat batch sits in the paged KV cache this step.

    The tensors live on the model's device; the two host values are known when the batch is
    built, so no kernel launch has to read a device tensor to size its grid.
    """

    query_start_loc: torch.Tensor  # [B + 1] int32: sequence b's tokens are [qsl[b], qsl[b+1])
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache after this step (0 = padding row)
    block_tables: torch.Tensor  # [B, max_pages] int32
    slot_mapping: torch.Tensor  # [T] int32: cache slot of each new token (< 0 = store nothing)
    decode_only: bool  # every sequence has exactly one query token
    max_query_len: int
    # [B] int32, decode steps: the rows longest first, the order the decode kernel takes them in
    decode_order: torch.Tensor | None = None


# q [T, Hq, D], k_cache, v_cache [num_blocks, block_size, Hkv, D], metadata, scale, and an
# e4m3 cache's scales (None otherwise) -> [T, Hq, D]
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float,
                     KVScales], torch.Tensor]


@dataclass(frozen=True)
class AttentionKernels:
    """One attention backend: its varlen (prefill/mixed) and pure-decode paths.

    `graph_safe` is False for a backend that reads device tensors on the host (a sync that
    CUDA-graph capture forbids). `varlen_graph_safe`: its prefill path also runs correctly in a
    graph captured for a padded step (grid from the token and row counts only, padding rows
    of no tokens skipped).
    """

    name: str
    prefill: AttendFn
    decode: AttendFn
    graph_safe: bool = True
    varlen_graph_safe: bool = False


class PagedAttention:
    """What the model's attention layers call: q/k norm, rotary and the K/V store (one fused
    op), then the prefill or decode backend.

    `metadata` is set by the runner before each forward pass (and before each graph capture,
    which freezes the choice of phase into the graph).
    """

    def __init__(
        self,
        prefill: AttentionKernels,
        decode: AttentionKernels,
        qkv_rope_store: Callable[..., torch.Tensor],
        scale: float,
    ) -> None:
        self.prefill, self.decode, self.scale = prefill, decode, scale
        self.qkv_rope_store = qkv_rope_store
        self.kv_caches: list[LayerCache] = []
        self.metadata: AttentionMetadata | None = None

    @property
    def name(self) -> str:
        if self.prefill.name == self.decode.name:
            return self.prefill.name
        return f"prefill={self.prefill.name},decode={self.decode.name}"

    def forward(
        self,
        layer: int,
        qkv: torch.Tensor | UnscaledProduct,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None,
    ) -> torch.Tensor:
        """qkv [T, (Hq + 2 Hkv) * D] from the fused projection (an FP8 one's maybe before its
        scales) -> attention output [T, Hq, D].

        `qk_norm` is (q scale, k scale, eps) for models with per-head q/k RMSNorm."""
        meta = self.metadata
        assert meta is not None, "set metadata before the forward pass"
        k_cache, v_cache, kv_scales = self.kv_caches[layer]
        q_weight, k_weight, eps = qk_norm if qk_norm is not None else (None, None, 0.0)
        q = self.qkv_rope_store(qkv, positions, cos_sin, q_weight, k_weight, eps, k_cache,
                                v_cache, meta.slot_mapping, kv_scales)
        attend = self.decode.decode if meta.decode_only else self.prefill.prefill
        return attend(q, k_cache, v_cache, meta, self.scale, kv_scales)
