"""The FP8 format both FP8 paths store, the KV cache and the W8A8 linears: e4m3."""

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# e4m3 conversions in hardware and FP8 GEMMs (cuBLASLt row-wise scaling): Ada (8.9) and Hopper on.
FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class QuantizedRows:
    """Activations rounded to e4m3 per token: values [M, K] and float32 scales [M, 1], each
    row's largest magnitude mapped to FP8_MAX. What a norm or activation fused with the
    rounding hands the FP8 linear after it."""

    values: torch.Tensor
    scale: torch.Tensor


@dataclass(frozen=True)
class UnscaledProduct:
    """An FP8 linear's output before its scales: values [M, N] (the sums of the e4m3 operands,
    rounded to bf16), float32 row scales [M, 1] (the input's) and column scales [N, 1] (the
    weight's). The product is values * row_scale * col_scale^T; the op after the linear (the
    residual add, RoPE-and-store, SiLU-and-mul) applies the scales as it reads the values."""

    values: torch.Tensor
    row_scale: torch.Tensor
    col_scale: torch.Tensor

    def scaled(self) -> torch.Tensor:
        """The product in float32, the scales applied in the kernel's order."""
        return self.values.float() * self.row_scale * self.col_scale.T
