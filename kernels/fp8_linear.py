"""W8A8 FP8 matmuls: e4m3 weights with per-output-channel scales, activations quantized per token
on the fly (the compressed-tensors FP8_DYNAMIC scheme).

`fp8_linear` runs the GEMM in FP8 through cuBLASLt (`torch._scaled_mm`, row-wise scales: compute
capability 8.9+); `fp8_linear_torch` is its twin for the CPU: the same activation rounding, then
an ordinary matmul with the dequantized weight.
"""

import torch
import torch.nn.functional as F

from llmserve.kernels.e4m3 import FP8_DTYPE, FP8_MAX

# Zero rows (padding in CUDA graphs) get this scale instead of 0, so they quantize to 0, not NaN.
MIN_SCALE = torch.finfo(torch.float32).tiny


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scales [..., 1]) with each row's largest magnitude mapped to 448:
    the rounding llm-compressor applies to weights (per output channel) and activations (per
    token), so weights quantized here equal the ones it writes."""
    t = t.float()
    scale = (t.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (t / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (bf16) @ weight [N, K] (e4m3, scales [N, 1] float32) -> [..., N] in bf16."""
    rows = x.reshape(-1, x.shape[-1])
    x_q, x_scale = quantize_rows(rows)
    # weight.t() is the column-major [K, N] operand cuBLASLt wants; row-wise scales are [M, 1]
    # for the activations and [1, N] for the weight, and need a bf16 output.
    out = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale.t(),
                           out_dtype=torch.bfloat16)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear_torch(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """The twin of `fp8_linear`: `weight` is the dequantized weight in x's dtype; x is rounded
    per token to e4m3 exactly as `fp8_linear` rounds it."""
    x_q, x_scale = quantize_rows(x)
    return F.linear(dequantize_rows(x_q, x_scale, x.dtype), weight, bias)
