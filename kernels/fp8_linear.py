"""FP8 matmuls: e4m3 weights with per-output-channel scales, activations quantized per token on
the fly (the compressed-tensors FP8_DYNAMIC scheme).

On CUDA `fp8_linear` picks by the number of rows M (tokens), as benchmarks/fp8_linear.py
measured on an H100 (see docs/benchmarks.md); the kernels are in fp8_gemm.py:

- M = 1 (decode): `w8a16_gemv`, weight-only. Reading the weight is all the time there is, so
  the e4m3 weight is dequantized in registers against x as given: no activation rounding, more
  accurate than W8A8; its twin is `F.linear(x, dequantized weight)`.
- M > 1: x quantized per token (`quantize_rows`, one Triton kernel), then the FP8 GEMM on the
  tensor cores: `w8a8_gemm` (Triton, the tile `gemm_config` picks: K split among several
  programs when the weight is narrow) up to TRITON_GEMM_MAX_M rows, `torch._scaled_mm`
  (cuBLASLt, row-wise scales: compute capability 8.9+) above.

`fp8_linear_unscaled` is for a linear whose consumer can apply the scales as it reads the sums
(the residual add after o and down on one GPU, RoPE-and-store after QKV, SiLU-and-mul after
gate/up): from the layer's smallest row count (2 at least) to UNSCALED_MAX_M rows, cuBLASLt
scaled per tensor by one, faster than row-wise at decode's row counts, and the scales handed
over beside the sums (UnscaledProduct); at other row counts the scaled product as
`fp8_linear` gives it.

Both GEMMs use fast accumulation, as vLLM's FP8 GEMMs do on Hopper: the tensor cores sum all of
K in their own accumulator (about 14 bits of mantissa) rather than handing a partial sum to an
fp32 register every 128 products: faster at prefill sizes, for an error well under the one
e4m3's rounding of the operands leaves (docs/benchmarks.md measures both).

`fp8_linear_torch` is the W8A8 twin for the CPU at every M (it matches transformers' fake
quantization of llm-compressor checkpoints): the same activation rounding, then an ordinary
matmul with the dequantized weight. At M = 1 the GPU differs from it by that rounding alone.
"""

import torch
import torch.nn.functional as F

from llmserve.kernels.e4m3 import FP8_DTYPE, FP8_MAX, QuantizedRows, UnscaledProduct
from llmserve.kernels.fp8_gemm import (
    MIN_SCALE,
    buffer_before_capture,
    gemm_config,
    quantize_rows_torch,
    quantize_rows_triton,
    w8a8_gemm,
    w8a16_gemv,
)
from llmserve.kernels.paged_common import sm_count

__all__ = ["FP8_DTYPE", "FP8_MAX", "MIN_SCALE", "QuantizedRows", "UnscaledProduct",
           "dequantize_rows", "fp8_linear", "fp8_linear_torch", "fp8_linear_unscaled",
           "quantize_rows", "rounds_input"]

TRITON_GEMM_MAX_M = 64  # rows up to which w8a8_gemm beats torch._scaled_mm (on an H100)
UNSCALED_MAX_M = 1024  # rows up to which cuBLASLt per tensor beats row-wise (on an H100)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scales [..., 1]), each row's largest magnitude mapped to 448 (see
    `quantize_rows_torch`): one Triton kernel on CUDA, the same values (-0.0 comes out +0.0)."""
    return quantize_rows_triton(t) if t.is_cuda else quantize_rows_torch(t)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def rounds_input(rows: int, device: torch.device) -> bool:
    """Whether `fp8_linear` (on CUDA) or `fp8_linear_torch` (on the CPU) rounds an input of
    `rows` tokens to e4m3: then the op before it can hand it over rounded (QuantizedRows)."""
    return rows > 1 or device.type != "cuda"


def fp8_linear(x: torch.Tensor | QuantizedRows, weight: torch.Tensor,
               weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (bf16) or x rounded where `rounds_input` ([M, K]) @ weight [N, K] (e4m3,
    scales [N, 1] float32) -> [..., N] in bf16."""
    if isinstance(x, QuantizedRows):
        return _w8a8(x.values, x.scale, weight, weight_scale, bias)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 1:
        out = w8a16_gemv(rows.contiguous(), weight, weight_scale, bias)
    else:
        out = _w8a8(*quantize_rows(rows), weight, weight_scale, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear_unscaled(x: torch.Tensor | QuantizedRows, weight: torch.Tensor,
                        weight_scale: torch.Tensor, min_rows: int = 2
                        ) -> torch.Tensor | UnscaledProduct:
    """`fp8_linear` without a bias for an op that can apply the scales itself: from `min_rows`
    (at least 2) to UNSCALED_MAX_M rows they are left to it (UnscaledProduct) and cuBLASLt
    runs the GEMM scaled per tensor (by one), faster at decode's row counts than its row-wise
    scaling; other row counts get `fp8_linear`'s scaled product."""
    rows = x.values.shape[0] if isinstance(x, QuantizedRows) else x.numel() // x.shape[-1]
    if rows < max(min_rows, 2) or rows > UNSCALED_MAX_M:
        return fp8_linear(x, weight, weight_scale, None)
    if not isinstance(x, QuantizedRows):
        x = QuantizedRows(*quantize_rows(x.reshape(-1, x.shape[-1])))
    device = x.values.device
    one = buffer_before_capture(_unit_scales, device, lambda: torch.ones((), device=device))
    values = torch._scaled_mm(x.values, weight.t(), scale_a=one, scale_b=one,
                              out_dtype=torch.bfloat16, use_fast_accum=True)
    return UnscaledProduct(values, x.scale, weight_scale)


_unit_scales: dict[torch.device, torch.Tensor] = {}


def _w8a8(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
          weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x_q.shape[0] <= TRITON_GEMM_MAX_M:
        # The interpreter (tests) tiles as for an H100's 132 multiprocessors.
        sms = sm_count(x_q.device) if x_q.is_cuda else 132
        config = gemm_config(x_q.shape[0], *weight.shape, sms)
        return w8a8_gemm(x_q, x_scale, weight, weight_scale, bias, config)
    # weight.t() is the column-major [K, N] operand cuBLASLt wants; row-wise scales are [M, 1]
    # for the activations and [1, N] for the weight, and need a bf16 output.
    out = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale.t(),
                           out_dtype=torch.bfloat16, use_fast_accum=True)
    return out if bias is None else out + bias


def fp8_linear_torch(x: torch.Tensor | QuantizedRows, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """The W8A8 twin of `fp8_linear`: `weight` is the dequantized weight in x's dtype; x is
    rounded per token to e4m3 exactly as `fp8_linear` rounds it above one row (or comes
    rounded)."""
    x_q, x_scale = (x.values, x.scale) if isinstance(x, QuantizedRows) else quantize_rows_torch(x)
    return F.linear(dequantize_rows(x_q, x_scale, weight.dtype), weight, bias)
