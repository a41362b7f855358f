"""The FP8 rounding and the CPU twin of the FP8 matmul, against e4m3's precision: with 3
mantissa bits, rounding to nearest moves a value by at most 2^-4 of itself (above the
subnormals: with the row's largest mapped to 448, values under 2^-6/448 of it)."""

import torch
import torch.nn.functional as F

from llmserve.kernels.fp8_linear import FP8_MAX, dequantize_rows, fp8_linear_torch, quantize_rows

U = 2.0**-4


def test_rows_round_within_half_an_e4m3_step_and_keep_their_largest_value() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(8, 256, generator=gen) * torch.logspace(-3, 3, 8)[:, None]
    q, scale = quantize_rows(t)
    back = dequantize_rows(q, scale, torch.float32)
    assert torch.equal(q.float().abs().amax(dim=-1), torch.full((8,), FP8_MAX))
    normal = t.abs() >= t.abs().amax(dim=-1, keepdim=True) * 2.0**-6 / FP8_MAX
    assert ((back - t).abs() <= U * t.abs())[normal].all()
    # Reached, nearly: the bound is the format's, not a loose one.
    assert ((back - t).abs() / t.abs())[normal].max() > 0.9 * U


def test_zero_rows_quantize_to_zero() -> None:
    q, scale = quantize_rows(torch.zeros(2, 16))
    assert torch.equal(dequantize_rows(q, scale, torch.float32), torch.zeros(2, 16))


def test_the_twin_rounds_each_token_once() -> None:
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 64, generator=gen), torch.randn(32, 64, generator=gen)
    out = fp8_linear_torch(x, w, None)
    # Only x is rounded here: each output moves by at most U of sum_j |w_ij x_j|.
    assert ((out - F.linear(x, w)).abs() <= U * F.linear(x.abs(), w.abs()) + 1e-5).all()
    assert not torch.allclose(out, F.linear(x, w), atol=1e-4)
