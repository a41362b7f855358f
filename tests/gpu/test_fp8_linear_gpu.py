"""FP8 weights on CUDA (compute capability 8.9+): `fp8_linear` against its twins (weight-only
for one token; W8A8 above: the same rounding, then a matmul with the dequantized weight), each
Triton kernel of fp8_gemm against its twin at Qwen3-8B's shapes, and the engine with
`--quantization fp8` in bf16 with CUDA graphs against the same model unquantized."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmserve.kernels import fp8_linear as fp8_linear_module
from llmserve.kernels.fp8_gemm import (
    GEMM_CONFIGS,
    GEMV_CONFIGS,
    GemmConfig,
    GemvConfig,
    gemm_config,
    quantize_rows_torch,
    quantize_rows_triton,
    w8a8_gemm,
    w8a16_gemv,
)
from llmserve.kernels.fp8_linear import (
    UnscaledProduct,
    fp8_linear,
    fp8_linear_torch,
    fp8_linear_unscaled,
    quantize_rows,
)

HAVE_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_FP8, reason="needs an FP8 GPU")]


@pytest.mark.parametrize("tokens", [1, 2, 7, 16, 64, 65, 300])
def test_fp8_linear_matches_its_twins(tokens: int) -> None:
    """One token weight-only (x as given), more W8A8 (x rounded per token): by the Triton GEMM
    up to TRITON_GEMM_MAX_M tokens, by torch._scaled_mm above."""
    assert fp8_linear_module.TRITON_GEMM_MAX_M == 64  # both GEMMs among the tokens
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, 256, device="cuda", generator=gen).bfloat16()
    x[0] = 0  # a padding row (CUDA graphs) must come out as the bias alone, not NaN
    weight = torch.randn(512, 256, device="cuda", generator=gen) * 0.05
    bias = torch.randn(512, device="cuda", generator=gen).bfloat16()
    q, scale = quantize_rows(weight)
    ours = fp8_linear(x, q, scale, bias)
    assert ours.dtype == torch.bfloat16 and ours.shape == (tokens, 512)
    if tokens == 1:
        twin = F.linear(x.float(), q.float() * scale, bias.float())
    else:
        twin = fp8_linear_torch(x.float(), q.float() * scale, bias.float())
    # Same rounded operands: only accumulation order and the bf16 output (2^-8) differ.
    torch.testing.assert_close(ours.float(), twin, rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(ours[0], bias)


# Qwen3-8B's linears (qkv, o, gate_up, down): (N, K).
SHAPES_8B = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]


def _fp8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 weight, scales [n, 1], the dequantized weight in fp64), as a checkpoint's."""
    w8, scale = quantize_rows(torch.randn(n, k, device="cuda") * 0.02)
    return w8, scale, w8.double() * scale.double()


def _abs_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.double().abs(), w.abs())


@pytest.mark.parametrize("rows", [1, 37, 2048])
@pytest.mark.parametrize("k", [4096, 12288, 3000])
def test_the_triton_quantizer_equals_torch_bit_for_bit_but_the_sign_of_zero(
        rows: int, k: int) -> None:
    x = torch.randn(rows, k, device="cuda") * torch.logspace(-20, 3, rows, device="cuda")[:, None]
    x[0] = 0
    for t in (x, x.bfloat16(), -x.bfloat16()):  # with -0.0 rows
        q, scale = quantize_rows_triton(t)
        q_ref, scale_ref = quantize_rows_torch(t)
        # Values compared, not bytes: the hand rounding makes -0.0 +0.0 (every other e4m3
        # value has one byte).
        assert torch.equal(q.float(), q_ref.float())
        assert torch.equal(scale, scale_ref)


@pytest.mark.parametrize("shape", SHAPES_8B, ids=str)
@pytest.mark.parametrize("config", GEMV_CONFIGS, ids=str)
def test_the_weight_only_kernel_matches_its_twin_at_8b_shapes(
        shape: tuple[int, int], config: GemvConfig) -> None:
    n, k = shape
    w8, scale, w = _fp8_weight(n, k)
    bias = torch.randn(n, device="cuda").bfloat16()
    x = torch.randn(1, k, device="cuda").bfloat16()
    out = w8a16_gemv(x, w8, scale, bias, config, out_dtype=torch.float32)
    twin = F.linear(x.double(), w, bias.double())
    # fp32 sums in another order.
    assert ((out.double() - twin).abs() <= 1e-4 * _abs_bound(x, w) + 1e-5).all()
    out16 = w8a16_gemv(x, w8, scale, bias, config)
    torch.testing.assert_close(out16.double(), twin, rtol=2**-8, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES_8B, ids=str)
@pytest.mark.parametrize("config", GEMM_CONFIGS, ids=str)
def test_the_w8a8_kernel_matches_its_twin_and_scaled_mm_at_8b_shapes(
        shape: tuple[int, int], config: GemmConfig) -> None:
    n, k = shape
    w8, scale, w = _fp8_weight(n, k)
    for m in (2, 16, 64):
        x = torch.randn(m, k, device="cuda").bfloat16()
        x_q, x_scale = quantize_rows_triton(x)
        out = w8a8_gemm(x_q, x_scale, w8, scale, None, config, out_dtype=torch.float32)
        twin = fp8_linear_torch(x.double(), w, None)
        # Fast accumulation: the tensor cores keep the whole sum in about 14 bits of mantissa,
        # and each of the K / 32 MMA steps may lose 2^-13 of the running sum, itself at most
        # the sum of the magnitudes: that is the worst case; the typical error is its RMS.
        bound = k / 32 * 2**-13 * _abs_bound(x, w)
        assert ((out.double() - twin).abs() <= bound).all()
        assert (out.double() - twin).norm() <= 2**-8 * twin.norm()
        cublas = torch._scaled_mm(x_q, w8.t(), scale_a=x_scale, scale_b=scale.t(),
                                  out_dtype=torch.bfloat16, use_fast_accum=True).double()
        ours = w8a8_gemm(x_q, x_scale, w8, scale, None, config).double()
        # Both within that bound of the exact sum, each rounded to bf16 once.
        assert ((ours - cublas).abs() <= 2 * bound + 2**-8 * cublas.abs()).all()


@pytest.mark.parametrize("shape", SHAPES_8B, ids=str)
@pytest.mark.parametrize("rows", [2, 8, 33, 64])
def test_the_tiles_fp8_linear_picks_match_the_twin_and_repeat_exactly(
        shape: tuple[int, int], rows: int) -> None:
    """The tile and K split `gemm_config` gives at decode's row counts: within the fast
    accumulation bounds, and bit for bit the same output on every run (the split parts are
    added in a fixed order, whichever program finishes last)."""
    n, k = shape
    w8, scale, w = _fp8_weight(n, k)
    x = torch.randn(rows, k, device="cuda").bfloat16()
    x_q, x_scale = quantize_rows_triton(x)
    config = gemm_config(rows, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
    out = w8a8_gemm(x_q, x_scale, w8, scale, None, config, out_dtype=torch.float32)
    twin = fp8_linear_torch(x.double(), w, None)
    assert ((out.double() - twin).abs() <= k / 32 * 2**-13 * _abs_bound(x, w)).all(), config
    assert (out.double() - twin).norm() <= 2**-8 * twin.norm()
    for _ in range(20):
        assert torch.equal(w8a8_gemm(x_q, x_scale, w8, scale, None, config,
                                     out_dtype=torch.float32), out), config


@pytest.mark.parametrize("shape", SHAPES_8B, ids=str)
def test_cublas_fast_accumulation_stays_within_the_bound_at_8b_shapes(
        shape: tuple[int, int]) -> None:
    """Above TRITON_GEMM_MAX_M rows fp8_linear is torch._scaled_mm with fast accumulation: the
    worst-case bound of the Triton kernel's test, and an RMS error within 2^-8 once the bf16
    output's own rounding (2^-9) is added."""
    n, k = shape
    w8, scale, w = _fp8_weight(n, k)
    x = torch.randn(300, k, device="cuda").bfloat16()
    out = fp8_linear(x, w8, scale, None).double()
    twin = fp8_linear_torch(x.double(), w, None)
    bound = k / 32 * 2**-13 * _abs_bound(x, w) + 2**-8 * twin.abs()
    assert ((out - twin).abs() <= bound).all()
    assert (out - twin).norm() <= (2**-8 + 2**-9) * twin.norm()


@pytest.mark.parametrize("shape", SHAPES_8B[1::3], ids=str)  # o and down
@pytest.mark.parametrize("rows", [1, 2, 33, 128, 256, 300])
def test_the_unscaled_product_is_the_scaled_one_before_its_scales(
        shape: tuple[int, int], rows: int) -> None:
    """What the o and down projections hand the residual add on one GPU: above one row the
    per-tensor GEMM's sums with the row and column scales beside them, within the bound of
    fp8_linear's own test once the scales are applied (one bf16 rounding, of the sums)."""
    n, k = shape
    w8, scale, w = _fp8_weight(n, k)
    x = torch.randn(rows, k, device="cuda").bfloat16()
    out = fp8_linear_unscaled(x, w8, scale)
    if rows == 1:
        assert torch.equal(out, fp8_linear(x, w8, scale, None))
        return
    assert isinstance(out, UnscaledProduct) and out.values.dtype == torch.bfloat16
    assert torch.equal(out.row_scale, quantize_rows(x)[1]) and out.col_scale is scale
    got = out.scaled().double()
    twin = fp8_linear_torch(x.double(), w, None)
    bound = k / 32 * 2**-13 * _abs_bound(x, w) + 2**-8 * twin.abs()
    assert ((got - twin).abs() <= bound).all()
    assert (got - twin).norm() <= (2**-8 + 2**-9) * twin.norm()


@pytest.mark.parametrize("tokens", [1, 8, 256])
def test_fp8_linear_replays_in_a_cuda_graph(tokens: int) -> None:
    """No host syncs: captured once, replayed on new inputs."""
    w8, scale, _ = _fp8_weight(1024, 2048)
    x = torch.zeros(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    fp8_linear(x, w8, scale, None)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_linear(x, w8, scale, None)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, fp8_linear(x, w8, scale, None), rtol=0, atol=0)


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
