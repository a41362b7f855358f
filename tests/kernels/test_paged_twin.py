"""The torch twin paged_attention_torch against plain dense causal attention on unpaged K/V."""

import pytest
import torch

from llmserve.kernels.fp8_kv import dequantize_kv_torch
from llmserve.kernels.paged_attention import paged_attention_torch

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Q, Hq, D] at the last Q positions of k/v [L, Hkv, D]; fp64, heads repeated for GQA."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    length, num_q = k.shape[0], q.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    positions = torch.arange(length - num_q, length, device=q.device)
    visible = torch.arange(length, device=q.device)[None, :] <= positions[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


CASES = [
    # (seq_lens, q_lens, block_size, num_heads, num_kv_heads, head_dim, device)
    pytest.param([5, 16, 17, 1], [1, 1, 1, 1], 16, 4, 4, 16, "cpu", id="decode-mha"),
    pytest.param([33, 2, 47], [1, 1, 1], 1, 8, 2, 16, "cpu", id="decode-gqa4-page1"),
    pytest.param([9, 31], [9, 31], 16, 4, 2, 16, "cpu", id="prefill-gqa2"),
    pytest.param([40, 7, 65, 12], [8, 1, 33, 1], 16, 6, 2, 16, "cpu", id="mixed-prefix-gqa3"),
    pytest.param([64, 20], [3, 20], 64, 8, 1, 16, "cpu", id="prefix-mqa-page64"),
    pytest.param(
        [4096, 1000, 1, 2049], [1, 1, 1, 1], 64, 16, 8, 128, "cuda", id="decode-qwen3", marks=GPU
    ),
    pytest.param(
        [3000, 511, 777], [512, 511, 1], 16, 16, 8, 128, "cuda", id="mixed-qwen3", marks=GPU
    ),
]


@pytest.mark.parametrize(
    ("lens", "q_lens", "block_size", "num_heads", "num_kv_heads", "head_dim", "device"), CASES
)
def test_twin_matches_dense_attention(
    paged, lens, q_lens, block_size, num_heads, num_kv_heads, head_dim, device
) -> None:
    kv = paged.pool(lens, block_size, num_kv_heads, head_dim, torch.float32, device)
    q = torch.randn(sum(q_lens), num_heads, head_dim, device=device)
    starts = paged.starts(q_lens, device)
    scale = head_dim**-0.5
    out = paged_attention_torch(
        q, kv.k_cache, kv.v_cache, starts, kv.seq_lens, kv.block_tables, scale
    )
    ref = torch.cat(
        [
            dense_causal(q[starts[b] : starts[b + 1]], kv.dense_k[b], kv.dense_v[b], scale)
            for b in range(len(lens))
        ]
    )
    assert paged.rel_err(out, ref) < 1e-5


@pytest.mark.parametrize(
    ("lens", "q_lens"), [([5, 16, 17, 1], [1, 1, 1, 1]), ([40, 7, 65, 12], [8, 1, 33, 1])]
)
def test_twin_on_fp8_cache_is_attention_over_the_dequantized_cache(paged, lens, q_lens) -> None:
    """Scaling the scores and the probabilities is dequantizing K and V, rearranged."""
    kv = paged.pool(lens, 16, 2, 16, torch.float32, "cpu")
    k8, v8, kv_scales = paged.fp8(kv)
    q = torch.randn(sum(q_lens), 6, 16)
    starts = paged.starts(q_lens, "cpu")
    out = paged_attention_torch(q, k8, v8, starts, kv.seq_lens, kv.block_tables, 0.25,
                                kv_scales)
    k, v = (dequantize_kv_torch(c, s.transpose(1, 2)) for c, s in zip((k8, v8), kv_scales,
                                                                         strict=True))
    ref = paged_attention_torch(q, k, v, starts, kv.seq_lens, kv.block_tables, 0.25)
    assert paged.rel_err(out, ref) < 1e-5
