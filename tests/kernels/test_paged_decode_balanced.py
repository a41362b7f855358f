"""paged_decode_balanced (Triton) against the twin paged_attention_torch: keys dealt out evenly
over a fixed number of programs, pairs cut into pieces and merged by the last to arrive."""

import os

import pytest
import torch

from llmserve.kernels import paged_decode_balanced
from llmserve.kernels.paged_attention import paged_attention_torch
from llmserve.kernels.paged_decode_balanced import paged_decode_balanced as balanced

ON_CPU = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the CPU cases run in Triton's interpreter (no CUDA here)",
)
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def twin(q, k, v, kv, scale, kv_scales=None):
    starts = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_attention_torch(q, k, v, starts, kv.seq_lens, kv.block_tables, scale,
                                 kv_scales)


@pytest.mark.parametrize(
    ("lens", "block_size", "heads", "kv_heads", "dtype", "fp8", "block_n", "programs_per_sm",
     "device"),
    [
        # Many programs a pair: every pair cut into one-tile pieces, merged.
        pytest.param([1, 15, 16, 17, 70, 200], 16, 4, 2, torch.float32, False, 16, 40, "cpu",
                     marks=ON_CPU, id="pieces-fp32"),
        # Few programs: each covers several whole pairs, and starts and ends inside others.
        pytest.param([1, 15, 16, 17, 70, 200], 16, 4, 2, torch.float32, True, 16, 1, "cpu",
                     marks=ON_CPU, id="whole-pairs-fp8-fp32"),
        pytest.param([33, 5, 130, 64], 64, 4, 1, torch.bfloat16, True, 32, 3, "cpu",
                     marks=ON_CPU, id="page64-mqa-fp8-bf16"),
        pytest.param([(37 * i) % 2100 + 1 for i in range(256)], 128, 16, 8, torch.bfloat16,
                     True, 64, 5, "cuda", marks=ON_GPU, id="qwen3-b256-fp8"),
        pytest.param([(97 * i) % 2000 + 1 for i in range(24)], 128, 32, 8, torch.bfloat16,
                     True, 64, 5, "cuda", marks=ON_GPU, id="qwen3-8b-b24-fp8"),
        pytest.param([4096, 1, 1000], 16, 16, 8, torch.float32, False, 64, 5, "cuda",
                     marks=ON_GPU, id="qwen3-b3-fp32"),
    ],
)
def test_balanced_matches_twin(paged, monkeypatch, lens, block_size, heads, kv_heads, dtype,
                               fp8, block_n, programs_per_sm, device) -> None:
    if device == "cpu":  # two SMs: the interpreter runs every program in turn
        monkeypatch.setattr(paged_decode_balanced, "sm_count", lambda device: 2)
    kv = paged.pool(lens, block_size, kv_heads, 32 if device == "cpu" else 128, torch.float32,
                    device)
    k, v, kv_scales = paged.fp8(kv) if fp8 else (kv.k_cache, kv.v_cache, None)
    q = torch.randn(len(lens), heads, k.shape[-1], device=device).to(dtype)
    scale = k.shape[-1] ** -0.5
    out = balanced(q, k, v, kv.seq_lens, kv.block_tables, scale, block_n=block_n,
                   num_warps=2, num_stages=3, programs_per_sm=programs_per_sm,
                   kv_scales=kv_scales)
    assert out.dtype == dtype and paged.rel_err(out, twin(q, k, v, kv, scale, kv_scales)) < (
        TOLERANCE[dtype])
    # Every arrival counter is back at zero for the next launch, and a second launch (other
    # arrival orders) gives the same bits: the pieces merge in a fixed order.
    assert not paged_decode_balanced._arrival_counters[torch.device(device)].any()
    again = balanced(q, k, v, kv.seq_lens, kv.block_tables, scale, block_n=block_n,
                     num_warps=2, num_stages=3, programs_per_sm=programs_per_sm,
                     kv_scales=kv_scales)
    assert torch.equal(out, again)


@pytest.mark.parametrize(
    "device", [pytest.param("cpu", marks=ON_CPU), pytest.param("cuda", marks=ON_GPU)]
)
def test_balanced_empty_sequences_give_zeros(paged, monkeypatch, device) -> None:
    """Padded batch slots (seq_len 0) read nothing and come out zero, more of them than
    programs included."""
    if device == "cpu":
        monkeypatch.setattr(paged_decode_balanced, "sm_count", lambda device: 1)
    kv = paged.pool([20, 1, 5, 9], 16, 2, 32, torch.float32, device)
    kv.seq_lens[1] = 0
    kv.seq_lens[3] = 0
    q = torch.randn(4, 4, 32, device=device)
    out = balanced(q, kv.k_cache, kv.v_cache, kv.seq_lens, kv.block_tables, 0.2, block_n=16,
                   programs_per_sm=1)
    assert torch.all(out[1] == 0) and torch.all(out[3] == 0)
    ref = twin(q, kv.k_cache, kv.v_cache, kv, 0.2)
    assert paged.rel_err(out[[0, 2]], ref[[0, 2]]) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_balanced_under_a_cuda_graph(paged) -> None:
    """Captured once and replayed with other lengths, as the engine's decode graphs are: the
    split of the keys follows the lengths on the device."""
    lens = [(53 * i) % 1500 + 1 for i in range(64)]
    kv = paged.pool(lens, 128, 8, 128, torch.float32, "cuda")
    k, v, kv_scales = paged.fp8(kv)
    q = torch.randn(64, 16, 128, device="cuda").bfloat16()

    def run() -> torch.Tensor:
        return balanced(q, k, v, kv.seq_lens, kv.block_tables, 0.088, kv_scales=kv_scales)

    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for shrink in (0, 700):
        kv.seq_lens.copy_((torch.tensor(lens, device="cuda") - shrink).clamp(min=0))
        graph.replay()
        ref = twin(q, k, v, kv, 0.088, kv_scales)
        assert paged.rel_err(out, ref) < TOLERANCE[torch.bfloat16]
