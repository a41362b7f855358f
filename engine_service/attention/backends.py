"""The attention backends by name, and the start-up check that the one asked for can run.

A backend that is asked for and cannot load stops start-up with an error naming what is
missing: the engine never falls back to another one silently.
"""

import os

import torch

from llmserve.engine_service.attention.flash_attention import load_flash_attention
from llmserve.engine_service.attention.layer import (
    AttentionKernels,
    AttentionMetadata,
    BackendUnavailableError,
    KVScales,
)
from llmserve.kernels.paged_attention import paged_attention_torch
from llmserve.kernels.paged_decode import paged_decode_attention
from llmserve.kernels.paged_extend import paged_extend_attention

BACKENDS = ("torch", "triton", "flash_attn")


def _torch_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   meta: AttentionMetadata, scale: float, kv_scales: KVScales = None
                   ) -> torch.Tensor:
    return paged_attention_torch(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                                 meta.block_tables, scale, kv_scales)


def _torch_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float, kv_scales: KVScales = None
                  ) -> torch.Tensor:
    # One query per row, as the Triton decode path assumes (it takes no query_start_loc).
    starts = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_attention_torch(q, k_cache, v_cache, starts, meta.seq_lens, meta.block_tables,
                                 scale, kv_scales)


def _triton_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, kv_scales: KVScales = None
                    ) -> torch.Tensor:
    return paged_extend_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                                  meta.block_tables, scale, kv_scales)


def _triton_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   meta: AttentionMetadata, scale: float, kv_scales: KVScales = None
                   ) -> torch.Tensor:
    # The split count comes from shapes only (batch rows, block-table width, SM count): inside
    # a CUDA graph it is fixed per captured batch size, never read from device data.
    return paged_decode_attention(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale,
                                  kv_scales=kv_scales, order=meta.decode_order)


# The torch twin reads query_start_loc and seq_lens on the host: correct anywhere, but a sync
# per layer, so never inside a CUDA graph.
TORCH_ATTENTION = AttentionKernels("torch", _torch_prefill, _torch_decode, graph_safe=False)
TRITON_ATTENTION = AttentionKernels("triton", _triton_prefill, _triton_decode,
                                    varlen_graph_safe=True)


def phase_backends(requested: str, prefill: str | None, decode: str | None,
                   device: torch.device) -> tuple[str, str]:
    """(prefill, decode) backend names: `auto` = triton on CUDA, torch on the CPU."""
    for name in (requested, prefill, decode):
        if name is not None and name not in (*BACKENDS, "auto"):
            raise BackendUnavailableError(
                f"attention backend {name!r} is unknown; choose from auto, {', '.join(BACKENDS)}")
    default = requested
    if requested == "auto":
        default = "triton" if device.type == "cuda" else "torch"
    return (prefill if prefill not in (None, "auto") else default,
            decode if decode not in (None, "auto") else default)


def load_backend(name: str, device: torch.device, dtype: torch.dtype) -> AttentionKernels:
    """The named backend's kernels, or BackendUnavailableError saying why it cannot run here."""
    if name == "torch":
        return TORCH_ATTENTION
    if name == "triton":
        if device.type != "cuda" and os.environ.get("LLMSERVE_TRITON_ON_CPU") != "1":
            raise BackendUnavailableError(
                "attention backend 'triton' needs a CUDA device (on the CPU only in Triton's "
                "interpreter, with LLMSERVE_TRITON_ON_CPU=1); use --attention-backend torch")
        return TRITON_ATTENTION
    if name == "flash_attn":
        return load_flash_attention(device, dtype)
    raise BackendUnavailableError(f"attention backend {name!r} is unknown")
