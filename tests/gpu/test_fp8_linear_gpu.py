"""FP8 weights on CUDA (compute capability 8.9+): the `torch._scaled_mm` GEMM against its CPU
twin (the same rounding, then a matmul with the dequantized weight), and the engine with
`--quantization fp8` in bf16 with CUDA graphs against the same model unquantized."""

import math

import pytest
import torch

from llmserve.kernels.fp8_linear import fp8_linear, fp8_linear_torch, quantize_rows

HAVE_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_FP8, reason="needs an FP8 GPU")]


@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_scaled_mm_matches_the_dequantized_twin(tokens: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, 256, device="cuda", generator=gen).bfloat16()
    x[0] = 0  # a padding row (CUDA graphs) must come out as the bias alone, not NaN
    weight = torch.randn(512, 256, device="cuda", generator=gen) * 0.05
    bias = torch.randn(512, device="cuda", generator=gen).bfloat16()
    q, scale = quantize_rows(weight)
    ours = fp8_linear(x, q, scale, bias)
    assert ours.dtype == torch.bfloat16 and ours.shape == (tokens, 512)
    twin = fp8_linear_torch(x.float(), q.float() * scale, bias.float())
    # Same rounded operands: only accumulation order and the bf16 output (2^-8) differ.
    torch.testing.assert_close(ours.float(), twin, rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(ours[0], bias)


def test_engine_with_fp8_weights_stays_within_the_e4m3_bound(
    qwen3_hd128, make_core, teacher_forced,
) -> None:
    """bf16 with CUDA graphs: FP8 logits against the same model's bf16 logits within the bound
    of tests/engine_service/models/test_quantization.py (relative RMS r sqrt(5 L), L = 2), at
    twice it per position."""
    prompts, forced = [[5, 17, 99, 230, 7]], [list(range(40, 72))]
    fp8 = make_core(qwen3_hd128, quantization="fp8")
    assert fp8.runner.graphs is not None
    (ours,) = teacher_forced(fp8, prompts, forced)
    (reference,) = teacher_forced(make_core(qwen3_hd128), prompts, forced)
    centred = reference - reference.mean(dim=-1, keepdim=True)
    relative = (ours - reference).norm(dim=-1) / centred.norm(dim=-1)
    bound = math.sqrt(2 / 3) * 2.0**-4 * math.sqrt(5 * 2)
    assert relative.max() <= 2 * bound
    assert relative.max() > 1e-3  # the weights really are FP8
