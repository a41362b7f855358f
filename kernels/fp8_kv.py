"""FP8 (e4m3) KV cache: each (token, KV head) row of K or V is stored as e4m3 with one scale,
amax(|row|) / 448 rounded up to bfloat16, kept beside the pages in [num_blocks, Hkv,
block_size].

Why per row and dynamic: e4m3 keeps 3 mantissa bits over 2^-9..448, so a fixed per-tensor
scale (scale 1.0, or a checkpoint's calibrated k_scale/v_scale) saturates rows larger than the
scale expected and pushes small rows into the subnormals, while a row's own amax always lands
on 448 (docs/operations.md, "FP8 KV cache", has the measured errors). It costs 2 bytes per
head row (1.6 % at head_dim 128) and a multiply per score, not per element: scores are scaled
after q @ k^T and probabilities before p @ v. bfloat16 rather than fp32 halves what decode
reads for scales; rounded up, so that the largest value lands within 2^-7 of 448 and never
past it. The kernels read the scales as 32-bit words, two slots each (`kv_scale`): cp.async
moves no less than 4 bytes, and 2-byte loads would leave their software pipelines.

The torch form here is the twin of the Triton store (`qkv_rope_store`) and the reference the
paged-attention kernels dequantize against; the Triton helpers are the kernels' shared math.
"""

import os

import torch
import triton
import triton.language as tl

from llmserve.kernels.e4m3 import FP8_DTYPE, FP8_MAX

KV_SCALE_DTYPE = torch.bfloat16
MIN_AMAX = 1e-12  # an all-zero row gets a tiny scale, not 0 (0 / 0 would store NaN)
_MAX = tl.constexpr(FP8_MAX)  # the kernels' copies (Triton reads only constexpr globals)
_MIN_AMAX = tl.constexpr(MIN_AMAX)


def quantize_kv_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 [..., D], bfloat16 scale [...]) with x ~= e4m3 * scale.

    The store kernel's fp32 steps (tensor by tensor, so correctly rounded on any device): the
    scale amax / 448 rounded up to bfloat16, then each row multiplied by its reciprocal (one
    division a row rather than one a value)."""
    x = x.float()
    amax = x.abs().amax(-1).clamp_min(MIN_AMAX)
    bits = (amax / torch.full_like(amax, FP8_MAX)).view(torch.int32)
    scale = ((bits + 0xFFFF) & -0x10000).view(torch.float32)
    inverse = torch.ones_like(scale) / scale
    values = (x * inverse[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return values, scale.to(KV_SCALE_DTYPE)


def dequantize_kv_torch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 [..., D] and its scales [...] -> fp32 [..., D]."""
    return x.float() * scale[..., None]


def check_kv_scales(k_cache: torch.Tensor, v_cache: torch.Tensor,
                    kv_scales: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """The layout the kernels rely on: e4m3 caches exactly when scales are given, and K's and
    V's scales [num_blocks, Hkv, block_size] bfloat16 with the same strides, unit in the slot,
    in whole 32-bit words (see kv_scale_words)."""
    if kv_scales is None:
        if FP8_DTYPE in (k_cache.dtype, v_cache.dtype):
            raise ValueError("an e4m3 KV cache needs its kv_scales")
        return
    k_scales, v_scales = kv_scales
    expected = (k_cache.shape[0], k_cache.shape[2], k_cache.shape[1])
    if (k_cache.dtype, v_cache.dtype) != (FP8_DTYPE, FP8_DTYPE) or any(
            s.shape != expected or s.dtype != KV_SCALE_DTYPE for s in kv_scales):
        raise ValueError(
            f"kv_scales need e4m3 caches and bfloat16 scales of shape {expected}")
    if k_scales.stride() != v_scales.stride() or k_scales.stride(-1) != 1:
        raise ValueError("K's and V's scales need the same strides, unit in the slot")
    if expected[2] % 2 or any(st % 2 for st in k_scales.stride()[:2]) or any(
            s.storage_offset() % 2 for s in kv_scales):
        raise ValueError("an e4m3 cache's scales must pair up into 32-bit words: even block "
                         "size, strides and offsets")


def kv_scale_words(k_cache: torch.Tensor, v_cache: torch.Tensor,
                   kv_scales: tuple[torch.Tensor, torch.Tensor] | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale arguments of an attention kernel: an e4m3 cache's bfloat16 scales [num_blocks,
    Hkv, block_size] viewed as the 32-bit words the kernels load, [num_blocks, Hkv,
    block_size / 2] (slot s in word s // 2, its low half when s is even); without scales the
    caches themselves, never read (the kernels' FP8 is a constexpr)."""
    if kv_scales is None:
        return k_cache, v_cache
    return kv_scales[0].view(torch.int32), kv_scales[1].view(torch.int32)


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
    """The dequantization scale of rows whose largest magnitude is `amax` (as the twin): fp32,
    amax / 448 rounded up to the nearest bfloat16, which it therefore stores exactly."""
    bits = tl.div_rn(tl.maximum(amax, _MIN_AMAX), _MAX).to(tl.uint32, bitcast=True)
    return ((bits + 0xFFFF) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def fp8_kv_values(x, scale, ROUND_BY_HAND: tl.constexpr):
    """fp32 rows x times the reciprocal of their `scale`, saturated to +-448, to be cast to
    e4m3 on store: quantize_kv_torch's values."""
    inverse = tl.div_rn(1.0 + tl.zeros_like(scale), scale)
    return _saturated(x * inverse, ROUND_BY_HAND)


@triton.jit
def kv_scale(word, slot):
    """The fp32 value of the bfloat16 scale of `slot`, from the 32-bit word holding it."""
    bits = tl.where(slot % 2 == 0, word << 16, word & -0x10000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def fp8_values(x, scale, ROUND_BY_HAND: tl.constexpr):
    """fp32 x / scale, saturated to +-448, to be cast to e4m3 on store."""
    return _saturated(tl.div_rn(x, scale), ROUND_BY_HAND)


@triton.jit
def _saturated(y, ROUND_BY_HAND: tl.constexpr):
    """fp32 y clamped to +-448 (and rounded to e4m3's values by hand where the cast cannot)."""
    y = tl.minimum(tl.maximum(y, -_MAX), _MAX)
    if ROUND_BY_HAND:
        y = _round_e4m3(y)
    return y
