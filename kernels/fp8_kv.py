"""FP8 (e4m3) KV cache: each (token, KV head) row of K or V is stored as e4m3 with one fp32
scale, amax(|row|) / 448, kept beside the pages in [num_blocks, Hkv, block_size].

Why per row and dynamic: e4m3 keeps 3 mantissa bits over 2^-9..448, so a fixed per-tensor
scale (scale 1.0, or a checkpoint's calibrated k_scale/v_scale) saturates rows larger than the
scale expected and pushes small rows into the subnormals, while a row's own amax always lands
on 448 (docs/operations.md, "FP8 KV cache", has the measured errors). It costs 4 bytes per
head row (3 % at head_dim 128) and a multiply per score, not per element: scores are scaled
after q @ k^T and probabilities before p @ v.

The torch form here is the twin of the Triton store (`qkv_rope_store`) and the reference the
paged-attention kernels dequantize against; the Triton helpers are the kernels' shared math.
"""

import os

import torch
import triton
import triton.language as tl

from llmserve.kernels.e4m3 import FP8_DTYPE, FP8_MAX

MIN_AMAX = 1e-12  # an all-zero row gets a tiny scale, not 0 (0 / 0 would store NaN)
_MAX = tl.constexpr(FP8_MAX)  # the kernels' copies (Triton reads only constexpr globals)
_MIN_AMAX = tl.constexpr(MIN_AMAX)


def quantize_kv_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 [..., D], fp32 scale [...]) with x ~= e4m3 * scale.

    Each row is multiplied by 448 / amax rather than divided by its scale: one division a
    row instead of one a value in the store kernel, whose fp32 steps these are (tensor by
    tensor, so correctly rounded on any device)."""
    x = x.float()
    amax = x.abs().amax(-1).clamp_min(MIN_AMAX)
    inverse = torch.full_like(amax, FP8_MAX) / amax
    scale = amax / FP8_MAX
    return (x * inverse[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_kv_torch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 [..., D] and its scales [...] -> fp32 [..., D]."""
    return x.float() * scale[..., None]


def check_kv_scales(k_cache: torch.Tensor, v_cache: torch.Tensor,
                    kv_scales: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """The layout the kernels rely on: e4m3 caches exactly when scales are given, and K's and
    V's scales [num_blocks, Hkv, block_size] fp32 with the same strides, unit in the slot."""
    if kv_scales is None:
        if FP8_DTYPE in (k_cache.dtype, v_cache.dtype):
            raise ValueError("an e4m3 KV cache needs its kv_scales")
        return
    k_scales, v_scales = kv_scales
    expected = (k_cache.shape[0], k_cache.shape[2], k_cache.shape[1])
    if (k_cache.dtype, v_cache.dtype) != (FP8_DTYPE, FP8_DTYPE) or any(
            s.shape != expected or s.dtype != torch.float32 for s in kv_scales):
        raise ValueError(f"kv_scales need e4m3 caches and fp32 scales of shape {expected}")
    if k_scales.stride() != v_scales.stride() or k_scales.stride(-1) != 1:
        raise ValueError("K's and V's scales need the same strides, unit in the slot")


def round_by_hand() -> bool:
    """Triton's interpreter narrows fp32 to e4m3 wrongly (a mantissa that rounds up loses its
    carry, subnormals flush to zero), so there the store rounds first and the cast is exact."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _round_e4m3(x):
    """fp32 x (|x| <= 448) rounded to the nearest e4m3 value, ties to even."""
    bits = x.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    # Below 2^-6 e4m3 steps by 2^-9: adding 1.5 * 2^23 rounds |x| * 512 to an integer (on |x|,
    # so that what rounds to zero keeps its sign, as the GPU's and torch's conversions do).
    magnitude = tl.abs(x)
    subnormal = ((magnitude * 512.0 + 12582912.0) - 12582912.0) / 512.0
    return tl.where(magnitude < 0.015625, tl.where(x < 0, -subnormal, subnormal), normal)


# Compiled kernels narrow to e4m3 with the hardware's conversion, one instruction a value
# (Triton's own cast rounded otherwise on an H100; by hand it takes a dozen). The interpreter
# has no inline assembly.
HARDWARE_E4M3 = tl.constexpr(not round_by_hand())


@triton.jit
def to_e4m3(y):
    """fp32 y (|y| <= 448) as float8e4nv, rounded to nearest even (as torch's conversion)."""
    if HARDWARE_E4M3:
        # cvt.rn.satfinite.e4m3x2.f32 d, a, b rounds b into d's low byte (a, here 0, into the
        # high one).
        return tl.inline_asm_elementwise(
            "{ .reg .f32 zero;\nmov.f32 zero, 0f00000000;\n"
            "cvt.rn.satfinite.e4m3x2.f32 $0, zero, $1; }",
            "=h,f", [y], dtype=tl.uint16, is_pure=True, pack=1,
        ).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        return _round_e4m3(y).to(tl.float8e4nv)


@triton.jit
def fp8_scale(amax):
    """The dequantization scale of rows whose largest magnitude is `amax` (as the twin)."""
    return tl.div_rn(tl.maximum(amax, _MIN_AMAX), _MAX)


@triton.jit
def fp8_kv_values(x, amax, ROUND_BY_HAND: tl.constexpr):
    """fp32 rows x times 448 / their `amax`, saturated to +-448, to be cast to e4m3 on store:
    quantize_kv_torch's values."""
    inverse = tl.div_rn(_MAX + tl.zeros_like(amax), tl.maximum(amax, _MIN_AMAX))
    y = tl.minimum(tl.maximum(x * inverse, -_MAX), _MAX)
    if ROUND_BY_HAND:
        y = _round_e4m3(y)
    return y


@triton.jit
def fp8_values(x, scale, ROUND_BY_HAND: tl.constexpr):
    """fp32 x / scale, saturated to +-448, to be cast to e4m3 on store."""
    y = tl.minimum(tl.maximum(tl.div_rn(x, scale), -_MAX), _MAX)
    if ROUND_BY_HAND:
        y = _round_e4m3(y)
    return y
