"""The FP8 KV quantization math (fp8_kv): round-trip error within e4m3's half ulp, bfloat16
scales rounded up, saturation,
zero rows, the layout checks, and the Triton store's e4m3 bytes and scales against the twin."""

import os

import pytest
import torch

from llmserve.kernels.fp8_kv import (
    FP8_DTYPE,
    FP8_MAX,
    check_kv_scales,
    dequantize_kv_torch,
    quantize_kv_torch,
)
from llmserve.kernels.qkv_rope_store import qkv_rope_store, qkv_rope_store_torch
from llmserve.kernels.rotary import rotary_cos_sin

ON_CPU = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the CPU cases run in Triton's interpreter (no CUDA here)",
)
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
# e4m3 keeps 3 mantissa bits: rounding to nearest is off by at most half an ulp, 2^-4 of the
# value, for values in the normal range (>= 2^-6 of the scale) and 2^-10 of the scale below it.
HALF_ULP = 2.0**-4
SUBNORMAL_STEP = 2.0**-10
BF16_STEP = 2.0**-7  # a scale rounded up to bfloat16 is within this of amax / 448


def test_round_trip_is_within_half_an_e4m3_ulp() -> None:
    # Rows of very different magnitudes: each gets its own scale.
    x = torch.randn(64, 4, 128) * torch.logspace(-4, 4, 64)[:, None, None]
    x8, scale = quantize_kv_torch(x)
    assert x8.dtype == FP8_DTYPE and scale.shape == (64, 4) and scale.dtype == torch.bfloat16
    exact = x.abs().amax(-1) / FP8_MAX
    assert torch.all((scale.float() >= exact) & (scale.float() <= exact * (1 + BF16_STEP)))
    back = dequantize_kv_torch(x8, scale)
    err = (back - x).abs()
    # (1 + 1e-5): the fp32 division and product around the rounding.
    bound = torch.maximum(HALF_ULP * x.abs(), SUBNORMAL_STEP * scale[..., None]) * (1 + 1e-5)
    assert torch.all(err <= bound)
    # Each row's largest magnitude lands within a bfloat16 step under 448, which rounds to
    # 448: it comes back within that step.
    top = x.abs().argmax(-1, keepdim=True)
    assert torch.all(x8.float().gather(-1, top).abs() == FP8_MAX)
    assert torch.allclose(back.gather(-1, top), x.gather(-1, top), rtol=BF16_STEP)


def test_saturation_and_zero_rows() -> None:
    x = torch.zeros(3, 1, 8)
    x[1, 0] = torch.tensor([1e6, -1e6, 3.0, 0.5, 1e-30, 0, 0, 0])
    x[2, 0] = torch.tensor([-3e-30, 1e-30, 0, 0, 0, 0, 0, 0])  # below MIN_AMAX: rounds to 0
    x8, scale = quantize_kv_torch(x)
    back = dequantize_kv_torch(x8, scale)
    assert torch.isfinite(x8.float()).all()  # never e4m3fn's NaN, also for 0/0 rows
    assert torch.all(back[0] == 0) and torch.all(back[2] == 0)
    # The extremes land on +-448, the largest e4m3 magnitude, and come back exactly.
    assert x8[1, 0, :2].float().tolist() == [FP8_MAX, -FP8_MAX]
    assert torch.allclose(back[1, 0, :2], torch.tensor([1e6, -1e6]), rtol=BF16_STEP)


def test_layout_checks_name_the_problem() -> None:
    k = torch.zeros(4, 16, 2, 8, dtype=FP8_DTYPE)
    scales = torch.zeros(2, 4, 2, 16, dtype=torch.bfloat16)
    check_kv_scales(k, k, (scales[0], scales[1]))
    with pytest.raises(ValueError, match="needs its kv_scales"):
        check_kv_scales(k, k, None)
    with pytest.raises(ValueError, match="shape"):
        check_kv_scales(k, k, (scales[0, :, :, :8], scales[1, :, :, :8]))
    with pytest.raises(ValueError, match="e4m3 caches"):
        check_kv_scales(k.float(), k.float(), (scales[0], scales[1]))
    with pytest.raises(ValueError, match="bfloat16"):
        check_kv_scales(k, k, (scales[0].float(), scales[1].float()))
    # The kernels read scales two slots to a 32-bit word.
    odd = torch.zeros(2 * 4 * 2 * 16 + 1, dtype=torch.bfloat16)[1:].view(2, 4, 2, 16)
    with pytest.raises(ValueError, match="32-bit words"):
        check_kv_scales(k, k, (odd[0], odd[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("device", "num_heads", "num_kv_heads", "head_dim"),
    [pytest.param("cpu", 4, 2, 32, marks=ON_CPU, id="cpu"),
     pytest.param("cuda", 16, 8, 128, marks=ON_GPU, id="cuda")],
)
def test_triton_store_writes_the_twins_e4m3_bytes_and_scales(
    device, num_heads, num_kv_heads, head_dim, dtype
) -> None:
    tokens, block_size, num_blocks = 9, 16, 6
    cos_sin = rotary_cos_sin(head_dim, 512, 1.0 / (1e6 ** (
        torch.arange(0, head_dim, 2, device=device) / head_dim))).to(device)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=device) * 3
    qkv[1, num_heads * head_dim:] *= 1e-4  # rows this small still use e4m3's normal range
    qkv[2, num_heads * head_dim:] = 0  # an all-zero K and V row
    qkv[3, -head_dim:] *= torch.logspace(-6, 0, head_dim, device=device)  # subnormals
    qkv = qkv.to(dtype)
    positions = torch.randint(0, 512, (tokens,), device=device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens].to(torch.int32)
    slots[4] = -1
    weights = [(1 + 0.1 * torch.randn(head_dim, device=device)).to(dtype) for _ in range(2)]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [torch.zeros(shape, dtype=FP8_DTYPE, device=device) for _ in range(4)]
    scales = [torch.zeros(num_blocks, num_kv_heads, block_size, dtype=torch.bfloat16,
                          device=device) for _ in range(4)]
    q = qkv_rope_store(qkv, positions, cos_sin, *weights, 1e-6, caches[0], caches[1], slots,
                       (scales[0], scales[1]))
    ref = qkv_rope_store_torch(qkv, positions, cos_sin, *weights, 1e-6, caches[2], caches[3],
                               slots, (scales[2], scales[3]))
    assert torch.allclose(q.float(), ref.float(), rtol=1e-4, atol=1e-4)
    # V is copied as it is: the same bytes, and scales up to the last bit. K went through norm
    # and rotary, whose fp32 sums may round differently in the last bit (on the GPU, in either
    # dtype: a bf16 element may then round the other way), and a last-bit change moves a value
    # across at most one e4m3 rounding boundary, rarely: K's codes may differ only rarely and
    # only to the adjacent code.
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))
    assert torch.equal(scales[1], scales[3])
    # A K row's amax a last bit apart may round up to the next bfloat16 (rarely).
    torch.testing.assert_close(scales[0], scales[2], rtol=2 * BF16_STEP, atol=0)
    ours, theirs = (c.view(torch.uint8).int() for c in (caches[0], caches[2]))
    steps = ((ours & 127) - (theirs & 127)).abs()
    adjacent = (steps == 0) | ((steps == 1) & ((ours >> 7) == (theirs >> 7)))
    zeros = ((ours & 127) + (theirs & 127)) <= 1  # +0, -0 and the smallest subnormals
    assert bool((adjacent | zeros).all())
    assert float((ours != theirs).float().mean()) < 0.02
