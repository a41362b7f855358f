"""paged_extend_attention (Triton) against its twin paged_attention_torch, varlen causal."""

import os

import pytest
import torch

from llmserve.kernels.paged_attention import paged_attention_torch
from llmserve.kernels.paged_extend import paged_extend_attention

ON_CPU = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the CPU cases run in Triton's interpreter (no CUDA here)",
)
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# With an e4m3 cache both round the probabilities times V's scales to q's dtype, each against
# its own running maximum: two independent bf16 roundings (2^-9) rather than one.
FP8_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def cpu(*args, name: str):
    """A case for the interpreter on CPU tensors."""
    return pytest.param(*args, "cpu", id=name, marks=ON_CPU)


def gpu(*args, name: str):
    """A case for the CUDA device (larger, Qwen3-0.6B-shaped)."""
    return pytest.param(*args, "cuda", id=name, marks=ON_GPU)


@pytest.mark.parametrize(
    ("lens", "q_lens", "block_size", "num_heads", "num_kv_heads", "head_dim", "dtype", "device"),
    [
        # Pure prefill: every key is this step's; lengths around page and query-block boundaries.
        cpu([5, 16, 17, 65], [5, 16, 17, 65], 16, 4, 2, 32, torch.float32, name="prefill-gqa2"),
        cpu([15, 33, 64], [15, 33, 64], 16, 4, 4, 32, torch.float32, name="prefill-mha"),
        # Chunked prefill: a cached prefix plus this step's chunk.
        cpu([40, 81, 64], [8, 33, 16], 16, 8, 2, 32, torch.float32, name="prefix-gqa4"),
        cpu([63, 64, 130], [63, 1, 70], 64, 4, 2, 32, torch.float32, name="prefix-page64"),
        cpu([9, 20, 12], [9, 4, 1], 1, 4, 1, 32, torch.float32, name="prefix-page1-mqa"),
        # Decode rows (q_len 1) mixed with prefill and prefix chunks, and an empty sequence.
        cpu([40, 33, 7, 20, 65], [8, 33, 1, 1, 40], 16, 4, 2, 32, torch.float32, name="mixed"),
        cpu([17, 30, 5], [3, 0, 5], 16, 6, 2, 32, torch.float32, name="empty-seq-group3"),
        cpu(
            [40, 33, 7, 20, 65], [8, 33, 1, 1, 40], 16, 4, 2, 32, torch.bfloat16, name="mixed-bf16"
        ),
        cpu([50, 16], [50, 2], 32, 4, 2, 48, torch.float16, name="fp16-head-dim-48"),
        gpu(
            [2048, 1000, 4096, 17],
            [2048, 1000, 4096, 17],
            16,
            16,
            8,
            128,
            torch.bfloat16,
            name="qwen3-prefill",
        ),
        gpu(
            [3000, 1537, 4096, 600],
            [512, 512, 1024, 600],
            64,
            16,
            8,
            128,
            torch.bfloat16,
            name="qwen3-chunked",
        ),
        gpu(
            [*range(100, 4000, 61), 2000, 1000],
            [1] * 64 + [1024, 1000],
            256,
            16,
            8,
            128,
            torch.bfloat16,
            name="qwen3-decode-rows-mixed-page256",
        ),
        gpu([1500, 800, 33], [700, 800, 1], 16, 16, 8, 128, torch.float32, name="qwen3-fp32"),
    ],
)
def test_extend_matches_twin(
    paged, lens, q_lens, block_size, num_heads, num_kv_heads, head_dim, dtype, device
) -> None:
    kv = paged.pool(lens, block_size, num_kv_heads, head_dim, dtype, device)
    starts = paged.starts(q_lens, device)
    q = torch.randn(sum(q_lens), num_heads, head_dim, device=device).to(dtype)
    scale = head_dim**-0.5
    out = paged_extend_attention(
        q, kv.k_cache, kv.v_cache, starts, kv.seq_lens, kv.block_tables, scale
    )
    ref = paged_attention_torch(
        q, kv.k_cache, kv.v_cache, starts, kv.seq_lens, kv.block_tables, scale
    )
    assert out.dtype == dtype and out.shape == q.shape
    assert paged.rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    ("lens", "q_lens", "block_size", "num_heads", "num_kv_heads", "head_dim", "dtype", "device"),
    [
        cpu([40, 33, 7, 65], [8, 33, 1, 40], 16, 4, 2, 32, torch.float32, name="fp8-mixed-fp32"),
        cpu([50, 16], [20, 2], 32, 6, 2, 32, torch.bfloat16, name="fp8-prefix-group3-bf16"),
        gpu([3000, 1537, 4096, 600], [512, 512, 1024, 600], 16, 16, 8, 128, torch.bfloat16,
            name="fp8-qwen3-chunked"),
        gpu([*range(100, 4000, 61), 2000], [1] * 64 + [1024], 64, 16, 8, 128, torch.bfloat16,
            name="fp8-qwen3-decode-rows-mixed"),
        gpu([1500, 33], [700, 1], 16, 16, 8, 128, torch.float32, name="fp8-qwen3-fp32"),
    ],
)
def test_extend_fp8_cache_matches_twin(
    paged, lens, q_lens, block_size, num_heads, num_kv_heads, head_dim, dtype, device
) -> None:
    """An e4m3 cache with per-row scales: the kernel dequantizes as the twin does."""
    kv = paged.pool(lens, block_size, num_kv_heads, head_dim, torch.float32, device)
    k8, v8, kv_scales = paged.fp8(kv)
    starts = paged.starts(q_lens, device)
    q = torch.randn(sum(q_lens), num_heads, head_dim, device=device).to(dtype)
    scale = head_dim**-0.5
    out = paged_extend_attention(q, k8, v8, starts, kv.seq_lens, kv.block_tables, scale,
                                 kv_scales)
    ref = paged_attention_torch(q, k8, v8, starts, kv.seq_lens, kv.block_tables, scale,
                                kv_scales)
    assert out.dtype == dtype and paged.rel_err(out, ref) < FP8_TOLERANCE[dtype]


@pytest.mark.parametrize(
    "device", [pytest.param("cpu", marks=ON_CPU), pytest.param("cuda", marks=ON_GPU)]
)
def test_extend_strided_query(paged, device) -> None:
    """q as a slice of a fused qkv tensor, as the model runner hands it over."""
    lens, q_lens = [30, 9], [12, 9]
    kv = paged.pool(lens, 16, 2, 32, torch.float32, device)
    starts = paged.starts(q_lens, device)
    q = torch.randn(sum(q_lens), 8, 32, device=device)[:, :4]
    out = paged_extend_attention(
        q, kv.k_cache, kv.v_cache, starts, kv.seq_lens, kv.block_tables, 0.125
    )
    ref = paged_attention_torch(
        q, kv.k_cache, kv.v_cache, starts, kv.seq_lens, kv.block_tables, 0.125
    )
    assert paged.rel_err(out, ref) < 1e-4
