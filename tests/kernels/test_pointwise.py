"""qkv_rope_store, rms_norm, add_rms_norm, silu_and_mul against their torch twins, their FP8
variants (fused with the per-token e4m3 rounding) against the unfused pair, and the CPU/CUDA
dispatch in ops."""

import os

import pytest
import torch

from llmserve.kernels import activation
from llmserve.kernels.activation import (
    SILU_FP8_BLOCK,
    silu_and_mul,
    silu_and_mul_fp8,
    silu_and_mul_fp8_torch,
    silu_and_mul_torch,
)
from llmserve.kernels.e4m3 import QuantizedRows, UnscaledProduct
from llmserve.kernels.fp8_gemm import quantize_rows_triton
from llmserve.kernels.ops import TORCH_OPS, TRITON_OPS, kernel_ops
from llmserve.kernels.qkv_rope_store import qkv_rope_store, qkv_rope_store_torch
from llmserve.kernels.rms_norm import (
    add_rms_norm,
    add_rms_norm_fp8,
    add_rms_norm_fp8_torch,
    add_rms_norm_torch,
    rms_norm,
    rms_norm_fp8,
    rms_norm_fp8_torch,
    rms_norm_torch,
)
from llmserve.kernels.rotary import rotary_cos_sin

ON_CPU = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the CPU cases run in Triton's interpreter (no CUDA here)",
)
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16]
# (device, scale): the GPU cases run at Qwen3-0.6B sizes.
DEVICES = [
    pytest.param("cpu", 1, id="cpu", marks=ON_CPU),
    pytest.param("cuda", 64, id="cuda", marks=ON_GPU),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "no_norm"])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 32), (3, 1, 16)])
@pytest.mark.parametrize(("device", "scale"), DEVICES)
def test_qkv_rope_store(device, scale, num_heads, num_kv_heads, head_dim, block_size, qk_norm,
                        dtype) -> None:
    if scale > 1:
        num_heads, num_kv_heads, head_dim = 16, 8, 128
    tokens, num_blocks, max_positions, eps = 7 * scale, 12 * scale, 4096, 1e-6
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, device=device) / head_dim))
    cos_sin = rotary_cos_sin(head_dim, max_positions, inv_freq).to(device)
    positions = torch.randint(0, max_positions, (tokens,), device=device)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=device) * 3
    qkv = qkv.to(dtype)
    weights = [(1 + 0.1 * torch.randn(head_dim, device=device)).to(dtype) for _ in range(2)]
    q_weight, k_weight = weights if qk_norm else (None, None)
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens].to(torch.int32)
    slots[::3] = -1  # padding rows store nothing
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=device).to(dtype)
              for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    q = qkv_rope_store(qkv, positions, cos_sin, q_weight, k_weight, eps, *caches, slots)
    ref_q = qkv_rope_store_torch(qkv, positions, cos_sin, q_weight, k_weight, eps, *ref_caches,
                                 slots)
    assert q.shape == (tokens, num_heads, head_dim)
    assert rel_err(q, ref_q) < TOLERANCE[dtype]
    assert rel_err(caches[0], ref_caches[0]) < TOLERANCE[dtype]
    assert torch.equal(caches[1], ref_caches[1])  # v is copied, untouched
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=device)
    untouched[slots[slots >= 0].long()] = False
    for cache, ref in zip(caches, ref_caches, strict=True):
        assert torch.equal(cache.view(-1, num_kv_heads, head_dim)[untouched],
                           ref.view(-1, num_kv_heads, head_dim)[untouched])


@pytest.mark.parametrize("fp8_cache", [False, True], ids=["bf16_cache", "fp8_cache"])
@pytest.mark.parametrize(("device", "scale"), DEVICES)
def test_qkv_rope_store_applies_an_unscaled_products_scales(device, scale, fp8_cache) -> None:
    """The fused QKV projection's FP8 sums before their scales: the kernel scales each value as
    it loads it and rounds it to bf16, which is the twin's input once scaled; q and the cache
    then as from that input (bit for bit where the scaled input's test is)."""
    num_heads, num_kv_heads, head_dim = (16, 8, 128) if scale > 1 else (4, 2, 32)
    tokens, num_blocks, block_size, eps = 7 * scale, 12 * scale, 16, 1e-6
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, device=device) / head_dim))
    cos_sin = rotary_cos_sin(head_dim, 4096, inv_freq).to(device)
    positions = torch.randint(0, 4096, (tokens,), device=device)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    product = UnscaledProduct((torch.randn(tokens, width, device=device) * 3000).bfloat16(),
                              torch.rand(tokens, 1, device=device) * 1e-3 + 1e-5,
                              torch.rand(width, 1, device=device) * 2e-3 + 1e-4)
    weights = [(1 + 0.1 * torch.randn(head_dim, device=device)).bfloat16() for _ in range(2)]
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens].to(torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)

    def caches() -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        if not fp8_cache:
            return (torch.zeros(shape, device=device).bfloat16(),
                    torch.zeros(shape, device=device).bfloat16(), None)
        scales = tuple(torch.zeros(num_blocks, num_kv_heads, block_size, dtype=torch.bfloat16,
                                   device=device) for _ in range(2))
        return (torch.zeros(shape, device=device).to(torch.float8_e4m3fn),
                torch.zeros(shape, device=device).to(torch.float8_e4m3fn), scales)

    fused, scaled = caches(), caches()
    q = qkv_rope_store(product, positions, cos_sin, *weights, eps, *fused[:2], slots, fused[2])
    ref = qkv_rope_store(product.scaled().bfloat16(), positions, cos_sin, *weights, eps,
                         *scaled[:2], slots, scaled[2])
    assert torch.equal(q, ref)
    for got, want in zip(fused[:2], scaled[:2], strict=True):
        assert torch.equal(got.float(), want.float())
    twin = qkv_rope_store_torch(product, positions, cos_sin, *weights, eps, *caches()[:2], slots,
                                caches()[2])
    assert rel_err(q, twin) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 64), (3, 4, 128), (2, 96)])
@pytest.mark.parametrize(("device", "scale"), DEVICES)
def test_rms_norm(device, scale, shape, dtype) -> None:
    shape = (shape[0] * scale, *shape[1:-1], shape[-1] * (8 if scale > 1 else 1))
    x = torch.randn(shape, device=device).to(dtype) * 3
    weight = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    assert rel_err(rms_norm(x, weight, 1e-6), rms_norm_torch(x, weight, 1e-6)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 64), (2, 96)])
@pytest.mark.parametrize(("device", "scale"), DEVICES)
def test_add_rms_norm(device, scale, shape, dtype) -> None:
    shape = (shape[0] * scale, shape[1] * (8 if scale > 1 else 1))
    x = torch.randn(shape, device=device).to(dtype)
    residual = torch.randn(shape, device=device).to(dtype) * 4
    weight = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    normed, summed = add_rms_norm(x, residual, weight, 1e-6)
    ref_normed, ref_summed = add_rms_norm_torch(x, residual, weight, 1e-6)
    # Bit-equal on the GPU; in bf16 Triton's interpreter truncates fp32 -> bf16 where torch rounds.
    if device == "cuda" or dtype == torch.float32:
        assert torch.equal(summed, ref_summed)
    assert rel_err(summed, ref_summed) < TOLERANCE[dtype]
    assert rel_err(normed, ref_normed) < TOLERANCE[dtype]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_out", "fp8_out"])
@pytest.mark.parametrize(("device", "scale"), DEVICES)
def test_add_rms_norm_applies_an_unscaled_products_scales(device, scale, fp8) -> None:
    """An FP8 linear's output before its scales (sums of e4m3 products, in bf16), added to the
    residual with its row and column scales applied on the way: the twin's sum within one bf16
    rounding (the interpreter truncates, and compiled code may fuse the multiply and add), and
    the exact sum within two."""
    rows, hidden = 5 * scale, 96 * (8 if scale > 1 else 1)
    values = (torch.randn(rows, hidden, device=device) * 3000).bfloat16()
    row_scale = torch.rand(rows, 1, device=device) * 1e-3
    col_scale = torch.rand(hidden, 1, device=device) * 1e-3
    product = UnscaledProduct(values, row_scale, col_scale)
    residual = torch.randn(rows, hidden, device=device).bfloat16()
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).bfloat16()
    fused = add_rms_norm_fp8 if fp8 else add_rms_norm
    twin = add_rms_norm_fp8_torch if fp8 else add_rms_norm_torch
    out, summed = fused(product, residual, weight, 1e-6)
    ref_out, ref_summed = twin(product, residual, weight, 1e-6)
    exact = values.double() * row_scale.double() * col_scale.double().T + residual.double()
    torch.testing.assert_close(summed.float(), ref_summed.float(), rtol=2**-7, atol=0)
    assert ((summed.double() - exact).abs() <= 2**-7 * exact.abs() + 1e-30).all()
    if fp8:
        out, ref_out = out.values.float() * out.scale, ref_out.values.float() * ref_out.scale
        assert rel_err(out, ref_out) < 2**-4
    else:
        assert rel_err(out, ref_out) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2 * 96), (2, 3, 2 * 64), (2, 2 * 1500)])
@pytest.mark.parametrize(("device", "scale"), DEVICES)
def test_silu_and_mul(device, scale, shape, dtype) -> None:
    shape = (shape[0] * scale, *shape[1:])
    x = torch.randn(shape, device=device).to(dtype) * 3
    assert rel_err(silu_and_mul(x), silu_and_mul_torch(x)) < TOLERANCE[dtype]


def _assert_rounding_of(fused: QuantizedRows, rows: torch.Tensor, twin: QuantizedRows,
                        exact: bool = True) -> None:
    """The fused kernel's e4m3 rows are the Triton quantizer's of the unfused kernel's output,
    value for value (-0.0 aside) and scale for scale; within an e4m3 step of the torch twin.
    Not `exact`: the scales within a few fp32 ulps, one value in 1000 an e4m3 step apart."""
    values, scale = quantize_rows_triton(rows)
    if exact:
        assert torch.equal(fused.values.float(), values.float())
        assert torch.equal(fused.scale, scale)
    else:
        torch.testing.assert_close(fused.scale, scale, rtol=2**-20, atol=0)
        assert (fused.values.float() != values.float()).float().mean() <= 1e-3
    assert rel_err(fused.values.float() * fused.scale, twin.values.float() * twin.scale) < 2**-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize(("device", "scale"), DEVICES)
def test_rms_norm_fp8_is_the_norm_then_the_rounding(device, scale, with_residual, dtype) -> None:
    shape = (5 * scale, 96 * (8 if scale > 1 else 1))
    x = torch.randn(shape, device=device).to(dtype) * 3
    x[0] = 0  # a padding row: scale at its floor, values 0
    weight = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    if with_residual:
        residual = torch.randn(shape, device=device).to(dtype) * 4
        residual[0] = 0
        fused, summed = add_rms_norm_fp8(x, residual, weight, 1e-6)
        normed, ref_summed = add_rms_norm(x, residual, weight, 1e-6)
        assert torch.equal(summed, ref_summed)
        twin = add_rms_norm_fp8_torch(x, residual, weight, 1e-6)[0]
    else:
        fused, normed = rms_norm_fp8(x, weight, 1e-6), rms_norm(x, weight, 1e-6)
        twin = rms_norm_fp8_torch(x, weight, 1e-6)
    # Compiled, the fused kernel may sum an fp32 row's squares in another order than the
    # unfused one: its norm an ulp apart, which bf16 rows round away (seen on an H100).
    _assert_rounding_of(fused, normed, twin, exact=device == "cpu" or dtype != torch.float32)
    assert not fused.values[0].float().any()


def _silu_fp8_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """'chunks': each row split over programs (the default for these few rows); 'rows': a row
    per program, as for long batches (in blocks of SILU_FP8_BLOCK columns)."""
    if path == "rows":
        monkeypatch.setattr(activation, "SILU_FP8_SPLIT_MAX_ROWS", 0)


SILU_FP8_PATHS = ["chunks", "rows"]


@pytest.mark.parametrize("dtype", DTYPES)
# the last in 3 blocks (two passes), and 9 chunks of SILU_FP8_CHUNK
@pytest.mark.parametrize("width", [96, 1500, 2 * SILU_FP8_BLOCK + 8])
@pytest.mark.parametrize("path", SILU_FP8_PATHS)
@pytest.mark.parametrize(("device", "scale"), DEVICES)
def test_silu_and_mul_fp8_is_the_activation_then_the_rounding(
        device, scale, path, width, dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    _silu_fp8_path(path, monkeypatch)
    x = torch.randn(3 * scale, 2 * width, device=device).to(dtype) * 3
    _assert_rounding_of(silu_and_mul_fp8(x), silu_and_mul(x), silu_and_mul_fp8_torch(x))


@pytest.mark.parametrize("width", [96, SILU_FP8_BLOCK + 8])
@pytest.mark.parametrize("path", SILU_FP8_PATHS)
@pytest.mark.parametrize(("device", "scale"), DEVICES)
def test_silu_and_mul_fp8_applies_an_unscaled_products_scales(
        device, scale, path, width, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gate/up's product before its scales (sums of e4m3 products in bf16, the input's row
    scales, each gate and up column's own). With scales that are powers of two, applying them
    is exact: the kernel's output is then its output on the scaled product, bit for bit. With
    any scales, within e4m3's precision of the twin and of the exact activation."""
    _silu_fp8_path(path, monkeypatch)
    rows = 3 * scale
    values = (torch.randn(rows, 2 * width, device=device) * 3000).bfloat16()
    values[0] = 0  # a padding row
    powers = UnscaledProduct(values, 2.0 ** -torch.randint(4, 12, (rows, 1), device=device),
                             2.0 ** -torch.randint(4, 12, (2 * width, 1), device=device))
    fused, scaled = silu_and_mul_fp8(powers), silu_and_mul_fp8(powers.scaled().bfloat16())
    assert torch.equal(fused.values.float(), scaled.values.float())
    assert torch.equal(fused.scale, scaled.scale)
    assert not fused.values[0].float().any()

    product = UnscaledProduct(values, torch.rand(rows, 1, device=device) * 1e-3 + 1e-5,
                              torch.rand(2 * width, 1, device=device) * 2e-3 + 1e-4)
    fused, twin = silu_and_mul_fp8(product), silu_and_mul_fp8_torch(product)
    got = fused.values.float() * fused.scale
    assert rel_err(got, twin.values.float() * twin.scale) < 2**-4
    gate, up = product.scaled().double().chunk(2, dim=-1)
    assert rel_err(got, torch.nn.functional.silu(gate) * up) < 2**-5


def test_kernel_ops_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMSERVE_TRITON_ON_CPU", raising=False)
    assert kernel_ops("cpu") is TORCH_OPS
    assert kernel_ops("cuda") is TRITON_OPS
    monkeypatch.setenv("LLMSERVE_TRITON_ON_CPU", "1")
    assert kernel_ops(torch.device("cpu")) is TRITON_OPS

