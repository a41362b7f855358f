"""The step from the fused QKV projection to attention, in one kernel: per-head q/k RMSNorm
(Qwen3), rotary embedding, and the store of k and v into their paged-cache slots.

Unfused, that was up to six launches per layer (two copies, two norms, rotary, store); a decode
step at batch 1 is bound by launches, not bytes, so one kernel now does it all, its programs
split over a token's heads.
The fused projection's output may come from an FP8 GEMM before its scales (UnscaledProduct):
the kernel applies them as it loads each value, rounded to bf16 as the scaled GEMM rounds.
"""

import torch
import triton
import triton.language as tl

from llmserve.kernels.dependent_launch import await_previous_kernel, dependent_launch
from llmserve.kernels.e4m3 import UnscaledProduct
from llmserve.kernels.fp8_kv import check_kv_scales, fp8_kv_values, fp8_scale, round_by_hand
from llmserve.kernels.kv_store import store_kv_torch
from llmserve.kernels.rms_norm import rms_norm_torch
from llmserve.kernels.rotary import apply_rotary_torch

# Query heads per program: a token's heads spread over several programs, so that a decode
# step's few tokens still occupy many multiprocessors (one program per token was bound by its
# arithmetic: docs/benchmarks.md).
Q_PART_HEADS = 8


def qkv_rope_store_torch(
    qkv: torch.Tensor | UnscaledProduct,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hkv) * D] -> rotated q [T, Hq, D]; k and v go into the caches
    [num_blocks, block_size, Hkv, D] at `slot_mapping` (< 0: nowhere). q_weight/k_weight are
    the per-head RMSNorm scales, or None for models without q/k norm. With `kv_scales` the
    caches are e4m3 and each stored row's scale goes there (see fp8_kv). An unscaled product
    is scaled in fp32 and rounded to its values' dtype first."""
    if isinstance(qkv, UnscaledProduct):
        qkv = qkv.scaled().to(qkv.values.dtype)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    kv_size = num_kv_heads * head_dim
    q, k, v = qkv.split([qkv.shape[-1] - 2 * kv_size, kv_size, kv_size], dim=-1)
    q = q.view(q.shape[0], -1, head_dim)
    k = k.view(-1, num_kv_heads, head_dim)
    v = v.view(-1, num_kv_heads, head_dim)
    if q_weight is not None and k_weight is not None:
        q, k = rms_norm_torch(q, q_weight, eps), rms_norm_torch(k, k_weight, eps)
    q, k = apply_rotary_torch(positions, q, k, cos_sin)
    store_kv_torch(k, v, k_cache, v_cache, slot_mapping, kv_scales)
    return q


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 x rounded to `dtype`, to nearest even, and widened back (a no-op for fp32). bf16 is
    rounded by hand: Triton's interpreter truncates in that cast where torch rounds, and on the GPU
    the compiler narrows a plain cast pair into bf16 arithmetic and fuses a product with the sum
    after it into one FMA, skipping the product's rounding (the GPU's logits then missed
    transformers' bf16 ones by more than the tests allow)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _load_scaled(row_ptr, row_scale, col_scale_ptr, offsets, mask, SCALE_X: tl.constexpr):
    """Values at `offsets` of one token's row in fp32; an unscaled product's scaled and
    rounded to its dtype (the scaled GEMM's output)."""
    x = tl.load(row_ptr + offsets, mask=mask, other=0.0)
    if SCALE_X:
        col_scale = tl.load(col_scale_ptr + offsets, mask=mask, other=0.0)
        return _round_to(x.to(tl.float32) * row_scale * col_scale, x.dtype)
    return x.to(tl.float32)


@triton.jit
def _rotated_heads(row_ptr, row_scale, col_scale_ptr, first_head, weight_ptr, eps, cos, sin,
                   NUM_HEADS, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, NORM: tl.constexpr,
                   SCALE_X: tl.constexpr):
    """Both halves of NUM_HEADS heads of one token, normed (if NORM) and rotated: fp32 values
    rounded to the input dtype wherever the twin (and Hugging Face) rounds."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (cols < HALF)
    offsets = (first_head + heads) * HEAD_DIM + cols
    dtype = row_ptr.dtype.element_ty
    f1 = _load_scaled(row_ptr, row_scale, col_scale_ptr, offsets, mask, SCALE_X)
    f2 = _load_scaled(row_ptr, row_scale, col_scale_ptr, offsets + HALF, mask, SCALE_X)
    if NORM:
        rstd = tl.rsqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / HEAD_DIM + eps)[:, None]
        w1 = tl.load(weight_ptr + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(weight_ptr + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        # The normalized row, then the scaled one.
        f1 = _round_to(_round_to(f1 * rstd, dtype) * w1, dtype)
        f2 = _round_to(_round_to(f2 * rstd, dtype) * w2, dtype)
    # cos and sin, each product and the sums.
    cos = _round_to(cos, dtype)
    sin = _round_to(sin, dtype)
    r1 = _round_to(_round_to(f1 * cos, dtype) - _round_to(f2 * sin, dtype), dtype)
    r2 = _round_to(_round_to(f2 * cos, dtype) + _round_to(f1 * sin, dtype), dtype)
    return r1, r2, heads, cols, mask


@triton.jit
def _qkv_rope_store_kernel(
    qkv_ptr, positions_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr, eps,
    q_out_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, k_scales_ptr, v_scales_ptr,
    row_scale_ptr, col_scale_ptr, stride_t, stride_ot, stride_cs,
    stride_kcp, stride_kct, stride_kch, stride_vcp, stride_vct, stride_vch,
    stride_sp, stride_sh,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr, Q_PART_HEADS: tl.constexpr, BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    NORM: tl.constexpr, FP8: tl.constexpr, ROUND_BY_HAND: tl.constexpr, SCALE_X: tl.constexpr,
    PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    row = qkv_ptr + token * stride_t
    row_scale = tl.load(row_scale_ptr + token) if SCALE_X else 1.0
    pos = tl.load(positions_ptr + token).to(tl.int64)
    half_cols = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cs + half_cols, mask=half_cols < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + half_cols, mask=half_cols < HALF,
                  other=0.0)
    # Programs 0.. rotate Q_PART_HEADS query heads each; the token's last one its K and V.
    if part < tl.num_programs(1) - 1:
        first = part * Q_PART_HEADS
        q1, q2, heads, cols, mask = _rotated_heads(
            row, row_scale, col_scale_ptr, first, q_weight_ptr, eps, cos, sin,
            tl.minimum(Q_PART_HEADS, NUM_Q_HEADS - first), HEAD_DIM, HALF, Q_PART_HEADS,
            BLOCK_HALF, NORM, SCALE_X)
        dst = q_out_ptr + token * stride_ot + (first + heads) * HEAD_DIM + cols
        tl.store(dst, q1.to(q_out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, q2.to(q_out_ptr.dtype.element_ty), mask=mask)
        return

    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        page = slot // PAGE_SIZE
        offset = slot % PAGE_SIZE
        k1, k2, k_heads, k_cols, k_mask = _rotated_heads(
            row, row_scale, col_scale_ptr, NUM_Q_HEADS, k_weight_ptr, eps, cos, sin,
            NUM_KV_HEADS, HEAD_DIM, HALF, BLOCK_KH, BLOCK_HALF, NORM, SCALE_X)
        dims = tl.arange(0, BLOCK_D)[None, :]
        v_mask = (k_heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
        v = _load_scaled(row, row_scale, col_scale_ptr,
                         (NUM_Q_HEADS + NUM_KV_HEADS + k_heads) * HEAD_DIM + dims, v_mask,
                         SCALE_X)
        if FP8:
            # One scale per (token, KV head) row; masked lanes are 0 and leave the amax alone.
            scale_at = page * stride_sp + k_heads * stride_sh + offset
            heads_mask = k_heads < NUM_KV_HEADS
            k_amax = tl.maximum(tl.max(tl.abs(k1), 1, keep_dims=True),
                                tl.max(tl.abs(k2), 1, keep_dims=True))
            v_amax = tl.max(tl.abs(v), 1, keep_dims=True)
            k_scale = fp8_scale(k_amax)
            v_scale = fp8_scale(v_amax)
            k1 = fp8_kv_values(k1, k_scale, ROUND_BY_HAND)
            k2 = fp8_kv_values(k2, k_scale, ROUND_BY_HAND)
            v = fp8_kv_values(v, v_scale, ROUND_BY_HAND)
            tl.store(k_scales_ptr + scale_at, k_scale, mask=heads_mask)
            tl.store(v_scales_ptr + scale_at, v_scale, mask=heads_mask)
        k_dst = (k_cache_ptr + page * stride_kcp + offset * stride_kct + k_heads * stride_kch
                 + k_cols)
        tl.store(k_dst, k1.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
        tl.store(k_dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
        tl.store(v_cache_ptr + page * stride_vcp + offset * stride_vct + k_heads * stride_vch
                 + dims, v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def qkv_rope_store(
    qkv: torch.Tensor | UnscaledProduct,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Triton twin of qkv_rope_store_torch: per token, one program for each Q_PART_HEADS
    query heads and one for the K/V heads (their store).

    `cos_sin` is the fp32 [max_positions, D] table rotary_cos_sin builds; qkv needs unit stride
    within a row (the projection's output is contiguous).
    """
    product = qkv if isinstance(qkv, UnscaledProduct) else None
    if product is not None:
        qkv = product.values
    num_tokens, width = qkv.shape
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    num_q_heads = width // head_dim - 2 * num_kv_heads
    if cos_sin.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(
            f"cos_sin width {cos_sin.shape[-1]} must equal the even head_dim {head_dim}")
    if qkv.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("qkv and the caches need unit stride in their last dimension")
    check_kv_scales(k_cache, v_cache, kv_scales)
    q = torch.empty(num_tokens, num_q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    norm = q_weight is not None and k_weight is not None
    half = head_dim // 2
    pdl = dependent_launch(qkv.device)
    # Without an FP8 cache the scale arguments are never read (FP8 is a constexpr).
    k_scales, v_scales = kv_scales if kv_scales is not None else (k_cache, v_cache)
    _qkv_rope_store_kernel[(num_tokens, triton.cdiv(num_q_heads, Q_PART_HEADS) + 1)](
        qkv, positions, cos_sin, q_weight if norm else qkv, k_weight if norm else qkv, eps,
        q, k_cache, v_cache, slot_mapping, k_scales, v_scales,
        qkv if product is None else product.row_scale,
        qkv if product is None else product.col_scale,
        qkv.stride(0), q.stride(0), cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_scales.stride(0), k_scales.stride(1),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
        Q_PART_HEADS=Q_PART_HEADS,
        BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE_SIZE=k_cache.shape[1], NORM=norm, FP8=kv_scales is not None,
        ROUND_BY_HAND=kv_scales is not None and round_by_hand(), SCALE_X=product is not None,
        PDL=pdl, launch_pdl=pdl,
        num_warps=4,
    )
    return q
