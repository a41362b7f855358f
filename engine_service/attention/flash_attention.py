"""flash-attn 4 (the CuTe-DSL flash-attn) as an attention backend, over the same paged KV cache.

Its paged path takes the cache as [num_pages, page_size, Hkv, D] with `page_table` and
`seqused_k`, the layout the engine already keeps; bottom-right causal alignment matches ours
(a sequence's queries are its last positions). It runs bf16/fp16 only, on a CUDA device, and
reads no e4m3 cache (EngineConfig refuses --kv-cache-dtype fp8_e4m3 with it).
"""

from collections.abc import Callable
from functools import partial

import torch

from llmserve.engine_service.attention.layer import (
    AttentionKernels,
    AttentionMetadata,
    BackendUnavailableError,
    KVScales,
)

# flash-attn 4 has no split-KV on Hopper (sm_90): "SplitKV not supported on SM 9.0".
DECODE_SPLITS = 1
PREFILL_SPLITS = 1


def _attend(fa4: Callable, num_splits: int, q: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
            kv_scales: KVScales = None) -> torch.Tensor:
    assert kv_scales is None, "flash-attn 4 reads no e4m3 KV cache"
    out = fa4(q, k_cache, v_cache, cu_seqlens_q=meta.query_start_loc,
              max_seqlen_q=meta.max_query_len, seqused_k=meta.seq_lens,
              page_table=meta.block_tables, softmax_scale=scale, causal=True,
              num_splits=num_splits)
    return out[0] if isinstance(out, tuple) else out


def load_flash_attention(device: torch.device, dtype: torch.dtype) -> AttentionKernels:
    """flash-attn 4's kernels, or BackendUnavailableError naming what is missing."""
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception as exc:  # any import failure means the backend cannot run: say which
        raise BackendUnavailableError(
            "attention backend 'flash_attn' needs flash-attn 4 (package flash-attn-4: "
            f"`from flash_attn.cute import flash_attn_varlen_func` failed: {exc!r:.300}); "
            "install it or choose --attention-backend triton") from exc
    if device.type != "cuda":
        raise BackendUnavailableError(
            f"attention backend 'flash_attn' (flash-attn 4) needs a CUDA device, not {device}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise BackendUnavailableError(
            f"attention backend 'flash_attn' (flash-attn 4) runs bfloat16/float16 only, not "
            f"{str(dtype).removeprefix('torch.')}; use --dtype bfloat16 or another backend")
    return AttentionKernels(
        "flash_attn",
        prefill=partial(_attend, flash_attn_varlen_func, PREFILL_SPLITS),
        decode=partial(_attend, flash_attn_varlen_func, DECODE_SPLITS),
    )
