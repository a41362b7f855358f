"""The FP8 rounding and the CPU twin of the FP8 matmul, against e4m3's precision: with 3
mantissa bits, rounding to nearest moves a value by at most 2^-4 of itself (above the
subnormals: with the row's largest mapped to 448, values under 2^-6/448 of it). Then the Triton
kernels (fp8_gemm) against their twins, in Triton's interpreter; tests/gpu has them on CUDA."""

import math
import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from llmserve.kernels import fp8_gemm
from llmserve.kernels import fp8_linear as fp8_linear_module
from llmserve.kernels.fp8_linear import (
    FP8_DTYPE,
    FP8_MAX,
    UnscaledProduct,
    dequantize_rows,
    fp8_linear,
    fp8_linear_torch,
    fp8_linear_unscaled,
    quantize_rows,
)

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


# The Triton kernels (fp8_gemm), run by Triton's interpreter on the CPU.
ON_CPU = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the CPU cases run in Triton's interpreter (no CUDA here)",
)


def _weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 weight, its scales [n, 1], the dequantized weight in fp32)."""
    w8, scale = quantize_rows(torch.randn(n, k) * torch.logspace(-2, 1, n)[:, None])
    return w8, scale, w8.float() * scale


@ON_CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row_block", [None, 64])  # one pass, or two over a long row
def test_the_triton_quantizer_rounds_rows_as_torch_does(
        dtype: torch.dtype, row_block: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if row_block is not None:
        monkeypatch.setattr(fp8_gemm, "MAX_ROW_BLOCK", row_block)
    t = torch.randn(2, 3, 300) * torch.logspace(-30, 4, 6).view(2, 3, 1)
    t[0, 0] = 0  # a padding row
    t[0, 1, :4] = torch.tensor([1e-40, -3e-40, 2.0, -0.0])  # fp32 subnormals, a -0.0
    t = t.to(dtype)
    q, scale = fp8_gemm.quantize_rows_triton(t)
    q_ref, scale_ref = fp8_gemm.quantize_rows_torch(t)
    assert q.dtype == FP8_DTYPE and q.shape == t.shape and scale.shape == (2, 3, 1)
    # Bit for bit but the sign of zero: values compared, as the hand rounding makes -0.0 +0.0
    # (every other e4m3 value has one byte).
    assert torch.equal(q.float(), q_ref.float())
    assert torch.equal(scale, scale_ref)


@ON_CPU
@pytest.mark.parametrize("config", fp8_gemm.GEMV_CONFIGS, ids=str)
def test_the_weight_only_kernel_matches_a_matmul_with_the_dequantized_weight(
        config: fp8_gemm.GemvConfig) -> None:
    # N and K not multiples of the tiles: ragged tiles. x is not rounded.
    w8, scale, w = _weight(72, 1100)
    bias = torch.randn(72).bfloat16()
    for m in (1, 3):
        x = torch.randn(m, 1100).bfloat16()
        out = fp8_gemm.w8a16_gemv(x, w8, scale, bias, config, out_dtype=torch.float32)
        twin = F.linear(x.double(), w.double(), bias.double())
        # fp32 accumulation (in another order) and the fp32 product with the scale.
        bound = 1e-5 * F.linear(x.double().abs(), w.double().abs(), bias.double().abs())
        assert ((out.double() - twin).abs() <= bound).all(), (m, config)
    out16 = fp8_gemm.w8a16_gemv(x, w8, scale, None, config)
    assert out16.dtype == torch.bfloat16
    # Within a bf16 ulp: the interpreter narrows fp32 to bf16 by truncation, not to nearest.
    torch.testing.assert_close(out16.float(), F.linear(x.float(), w), rtol=2**-7, atol=1e-4)


@ON_CPU
@pytest.mark.parametrize("config", fp8_gemm.GEMM_CONFIGS, ids=str)
def test_the_w8a8_kernel_matches_the_twin(config: fp8_gemm.GemmConfig) -> None:
    # Few rows, rows over several tiles, and K not a multiple of BLOCK_K.
    w8, scale, w = _weight(200, 320)
    bias = torch.randn(200).bfloat16()
    for m in (3, 130):
        x = torch.randn(m, 320).bfloat16() * 4
        x_q, x_scale = fp8_gemm.quantize_rows_triton(x)
        out = fp8_gemm.w8a8_gemm(x_q, x_scale, w8, scale, bias, config, out_dtype=torch.float32)
        twin = fp8_linear_torch(x.double(), w.double(), bias.double())
        bound = 1e-5 * F.linear(x.double().abs(), w.double().abs(), bias.double().abs())
        assert ((out.double() - twin).abs() <= bound).all(), (m, config)


@ON_CPU
def test_split_parts_add_up_in_a_fixed_order_and_free_their_counters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """K split over three programs per tile (K = 320 is three blocks of 128, the last short):
    the same output as one program per tile within fp32 reordering, the same bits on a second
    run, and every tile's arrival counter back at zero for the next GEMM."""
    w8, scale, _ = _weight(200, 320)
    x_q, x_scale = fp8_gemm.quantize_rows_triton(torch.randn(130, 320).bfloat16())
    whole = fp8_gemm.GemmConfig(64, 64, num_warps=4, num_stages=4)
    split = fp8_gemm.GemmConfig(64, 64, num_warps=4, num_stages=4, split_k=3)
    monkeypatch.setattr(fp8_gemm, "_split_counters", {})
    one = fp8_gemm.w8a8_gemm(x_q, x_scale, w8, scale, None, whole, out_dtype=torch.float32)
    assert not fp8_gemm._split_counters  # counters are for split tiles only
    parts = fp8_gemm.w8a8_gemm(x_q, x_scale, w8, scale, None, split, out_dtype=torch.float32)
    torch.testing.assert_close(parts, one, rtol=1e-5, atol=1e-5)
    again = fp8_gemm.w8a8_gemm(x_q, x_scale, w8, scale, None, split, out_dtype=torch.float32)
    assert torch.equal(again, parts)
    assert not fp8_gemm._split_counters[x_q.device].any()


def test_tiles_split_k_while_the_programs_fit_the_multiprocessors() -> None:
    """On an H100's 132 multiprocessors: Qwen3-8B's down projection (N 4096, K 12288) is 64
    tiles of 64 columns, two parts each; its qkv (96 tiles) is not split; nor is a K of four
    blocks (at least 4 a part); Qwen3-0.6B's o projection (16 tiles, K 16 blocks) splits in
    4."""
    sms = 132
    assert fp8_gemm.gemm_config(64, 4096, 12288, sms) == fp8_gemm.GemmConfig(
        64, 64, num_warps=4, num_stages=4, split_k=2)
    assert fp8_gemm.gemm_config(8, 6144, 4096, sms).split_k == 1
    assert fp8_gemm.gemm_config(8, 1024, 512, sms).split_k == 1
    assert fp8_gemm.gemm_config(8, 1024, 2048, sms).split_k == 4


@ON_CPU
@pytest.mark.parametrize("shape", [(1, 256), (1, 1, 256), (2, 256), (7, 256), (2, 8, 256),
                                   (64, 256), (65, 256), (300, 256)], ids=str)
def test_fp8_linear_picks_by_rows(shape: tuple[int, ...],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One row: the weight-only kernel (x not rounded). More: x rounded per token, then the
    Triton GEMM up to TRITON_GEMM_MAX_M rows, torch._scaled_mm above."""
    ran: list[str] = []

    def spy(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def call(*args: object, **kwargs: object) -> torch.Tensor:
            ran.append(name)
            return fn(*args, **kwargs)
        return call

    for name in ("w8a16_gemv", "w8a8_gemm"):
        monkeypatch.setattr(fp8_linear_module, name, spy(name, getattr(fp8_linear_module, name)))
    monkeypatch.setattr(torch, "_scaled_mm", spy("_scaled_mm", torch._scaled_mm))
    w8, scale, w = _weight(48, 256)
    bias = torch.randn(48).bfloat16()
    x = torch.randn(shape).bfloat16()
    out = fp8_linear(x, w8, scale, bias)
    assert out.shape == (*shape[:-1], 48) and out.dtype == torch.bfloat16
    rows = math.prod(shape[:-1])
    most = fp8_linear_module.TRITON_GEMM_MAX_M
    assert ran == ["w8a16_gemv" if rows == 1 else "w8a8_gemm" if rows <= most else "_scaled_mm"]
    if rows == 1:
        twin = F.linear(x.float(), w, bias.float())
    else:
        twin = fp8_linear_torch(x.float(), w, bias.float())
    # bf16 roundings (two with torch._scaled_mm: its output, then the bias added), each within
    # 2^-8 of what the sums reach.
    magnitude = F.linear(x.float().abs(), w.abs(), bias.float().abs())
    assert ((out.float() - twin).abs() <= 2**-7 * magnitude + 1e-5).all()


SM90_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llmserve.kernels import fp8_gemm as g

TYPES = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "q_ptr": "*fp8e4nv", "a_ptr": "*fp8e4nv",
         "b_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "a_scale_ptr": "*fp32",
         "b_scale_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16", "c_ptr": "*bf16",
         "part_ptr": "*fp32", "count_ptr": "*i32"}


def compile_sm90(fn, constants, num_warps, num_stages=1, **types):
    constants = {**constants, "PDL": True}
    signature = {a: "constexpr" if a in constants else {**TYPES, **types}.get(a, "i32")
                 for a in fn.arg_names}
    # What the launcher knows at run time: aligned pointers, 16-divisible K and strides.
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
               if a not in constants and (a.endswith("_ptr") or a.startswith("stride")
                                          or a == "K")}
    triton.compile(ASTSource(fn, signature, constants, aligned),
                   target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps, "num_stages": num_stages})


for block, one in ((4096, True), (16384, True), (16384, False)):
    compile_sm90(g._quantize_rows_kernel, dict(BLOCK=block, ONE_BLOCK=one),
                 num_warps=min(max(block // 1024, 4), 16))
for c in g.GEMV_CONFIGS:
    compile_sm90(g._w8a16_kernel, dict(
        BLOCK_N=c.block_n, BLOCK_K=c.block_k, EVEN_K=True, HAS_BIAS=True), c.num_warps)
for c in g.GEMM_CONFIGS:
    compile_sm90(g._w8a8_kernel, dict(
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
        SPLIT_K=c.split_k, EVEN_K=True, HAS_BIAS=True), c.num_warps, c.num_stages)
print("compiled")
"""


def test_the_fp8_kernels_compile_for_sm90(compile_for_sm90: Callable[[str], None]) -> None:
    compile_for_sm90(SM90_SCRIPT)


@pytest.mark.parametrize(("rows", "min_rows"), [(1, 2), (2, 2), (65, 2), (66, 2), (2, 3)])
def test_the_unscaled_product_carries_the_scales_it_leaves_out(
        rows: int, min_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8_linear_unscaled (torch._scaled_mm runs on the CPU too): one row, fewer than
    `min_rows` or more than UNSCALED_MAX_M (65 here) is fp8_linear's tensor; the rows between
    are the per-tensor sums with the input's row scales and the weight's, which applied give
    the W8A8 twin within the sums' bf16 rounding."""
    monkeypatch.setattr(fp8_linear_module, "UNSCALED_MAX_M", 65)
    w8, scale, w = _weight(48, 256)
    x = torch.randn(rows, 256).bfloat16()
    out = fp8_linear_unscaled(x, w8, scale, min_rows)
    if rows < min_rows or rows in (1, 66):
        assert torch.equal(out, fp8_linear(x, w8, scale, None))
        return
    assert isinstance(out, UnscaledProduct)
    assert torch.equal(out.row_scale, quantize_rows(x)[1]) and out.col_scale is scale
    twin = fp8_linear_torch(x.float(), w, None)
    magnitude = F.linear(x.float().abs(), w.abs())
    assert ((out.scaled() - twin).abs() <= 2**-8 * magnitude + 1e-6).all()
