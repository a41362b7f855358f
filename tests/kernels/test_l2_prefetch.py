"""The L2 prefetch: bounded by its setting, a no-op where it cannot run, harmless where it does
(its inline assembly's compile for sm_90 is in test_compile_hopper.py)."""

import pytest
import torch

from llmserve.kernels import l2_prefetch
from llmserve.kernels.e4m3 import FP8_DTYPE


@pytest.fixture
def prefetch_mb(monkeypatch: pytest.MonkeyPatch):
    def set_mb(value: str) -> None:
        monkeypatch.setenv("LLMSERVE_L2_PREFETCH_MB", value)
        l2_prefetch.prefetch_bytes.cache_clear()

    yield set_mb
    l2_prefetch.prefetch_bytes.cache_clear()


def test_prefetch_bytes_follows_the_setting(prefetch_mb) -> None:
    prefetch_mb("0")
    assert l2_prefetch.prefetch_bytes() == 0
    prefetch_mb("8")
    assert l2_prefetch.prefetch_bytes() == 8 * 2**20


@pytest.mark.parametrize("value", ["-1", "1025"])
def test_prefetch_bytes_out_of_range_names_the_variable(prefetch_mb, value: str) -> None:
    prefetch_mb(value)
    with pytest.raises(ValueError, match=r"LLMSERVE_L2_PREFETCH_MB must be within \[0, 1024\]"):
        l2_prefetch.prefetch_bytes()


def test_prefetch_is_a_no_op_on_the_cpu() -> None:
    weight = torch.randn(256, 512).to(FP8_DTYPE)
    before = weight.view(torch.uint8).clone()
    l2_prefetch.prefetch_l2(weight)
    assert torch.equal(weight.view(torch.uint8), before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [FP8_DTYPE, torch.bfloat16])
def test_prefetch_under_a_cuda_graph_leaves_the_weight_and_the_matmul_alone(dtype) -> None:
    # Odd sizes: the last lanes repeat the last chunk, never read past the end.
    weight = torch.randn(3000, 1040, device="cuda").to(dtype)
    x = torch.randn(7, 1040, device="cuda", dtype=torch.bfloat16)
    before = weight.view(torch.uint8).clone()
    expected = x @ weight.to(torch.bfloat16).t()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        l2_prefetch.prefetch_l2(weight)
        out = x @ weight.to(torch.bfloat16).t()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(weight.view(torch.uint8), before)
    assert torch.equal(out, expected)
