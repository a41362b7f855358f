"""Pieces shared by the Triton paged-attention kernels (decode and extend).

Both kernels stream K/V in tiles of BLOCK_N tokens that start at multiples of BLOCK_N, look each
tile's pages up in the sequence's block table, and fold the tile into a running (max, sum, acc)
online softmax in base 2 (scores are pre-multiplied by scale * log2(e), so exp2 replaces exp).
"""

import functools
import math
import os

import torch
import triton
import triton.language as tl

from llmserve.kernels.fp8_kv import check_kv_scales, kv_scale

LOG2E = math.log2(math.e)
_F16_MAX = tl.constexpr(65504.0)


def dot_modes(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast) for tl.dot on operands of `dtype`.

    fp32 must not drop silently to tf32 on the tensor cores (the 1e-4 bar would fail). Triton's
    interpreter multiplies bf16 blocks wrongly, so there bf16 operands are widened to fp32 first:
    exact, because the product of two bf16 values fits an fp32 mantissa.
    """
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return ("ieee" if dtype == torch.float32 else "tf32"), (
        interpreting and dtype == torch.bfloat16
    )


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; the interpreter's CPU counts as its cores."""
    if device.type != "cuda":
        return os.cpu_count() or 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def check_paged_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_tables: torch.Tensor,
                       kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """The layout both kernels rely on: unit stride in head_dim, int32 tables, GQA-divisible,
    scales beside an e4m3 cache."""
    check_kv_scales(k_cache, v_cache, kv_scales)
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need unit stride in head_dim")
    if k_cache.shape != v_cache.shape or q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    if q.shape[-2] % k_cache.shape[2]:
        raise ValueError(
            f"{q.shape[-2]} query heads do not divide over {k_cache.shape[2]} KV heads")
    block_size = k_cache.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(f"block size {block_size} is not a power of two")
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables needs unit stride in its last dimension")


@triton.jit
def mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation (see dot_modes for PRECISION and UPCAST)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def tile_pages(table_row, start, tok, tok_mask, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """(page, offset in page) of the tile's tokens `tok` = start + arange(BLOCK_N)."""
    if PAGE_SIZE >= BLOCK_N:
        # Tiles start at multiples of BLOCK_N, so the whole tile lies in one page: one lookup.
        page = tl.load(table_row + start // PAGE_SIZE).to(tl.int64)
    else:
        page = tl.load(table_row + tok // PAGE_SIZE, mask=tok_mask, other=0).to(tl.int64)
    return page, tok % PAGE_SIZE


@triton.jit
def load_kv_tile(k_ptr, v_ptr, ks_ptr, vs_ptr, table_row, start, kv_head, tok_end, offs_n,
                 offs_d, d_mask, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt,
                 stride_vh, stride_sp, stride_sh,
                 PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr):
    """K and V [BLOCK_N, BLOCK_D] for tokens start.. (zeros at and past tok_end), as stored,
    and with FP8 their tokens' scales [BLOCK_N] (zeros past tok_end; 1.0 without FP8, unused).
    """
    tok = start + offs_n
    tok_mask = tok < tok_end
    page, slot = tile_pages(table_row, start, tok, tok_mask, PAGE_SIZE, BLOCK_N)
    mask = tok_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + (page * stride_kp + slot * stride_kt + kv_head * stride_kh)[:, None]
                + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + (page * stride_vp + slot * stride_vt + kv_head * stride_vh)[:, None]
                + offs_d[None, :], mask=mask, other=0.0)
    if FP8:
        # 32-bit words of two bfloat16 scales each (fp8_kv.kv_scale_words).
        word_at = page * stride_sp + kv_head * stride_sh + slot // 2
        ks = kv_scale(tl.load(ks_ptr + word_at, mask=tok_mask, other=0), slot)
        vs = kv_scale(tl.load(vs_ptr + word_at, mask=tok_mask, other=0), slot)
    else:
        ks = 1.0
        vs = 1.0
    return k, v, ks, vs, tok


def fp16_products(q: torch.Tensor, kv_scales: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
    """Whether the kernels' tile products run in fp16: with an e4m3 cache and a bf16 q. e4m3
    keys and values widen to fp16 in one instruction per pair, to bf16 in three, which bounded
    the FP8 decode kernel (docs/benchmarks.md); a bf16 q within fp16's range is exact there."""
    return kv_scales is not None and q.dtype == torch.bfloat16


@triton.jit
def fp16_query(q, FP16: tl.constexpr):
    """q as the tile products take it (see fp16_products), saturated at fp16's largest value."""
    if FP16:
        q = tl.minimum(tl.maximum(q.to(tl.float32), -_F16_MAX), _F16_MAX).to(tl.float16)
    return q


@triton.jit
def softmax_step(q, k, v, ks, vs, visible, m_i, l_i, acc, qk_scale,
                 MASKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 FP8: tl.constexpr):
    """Folds one K/V tile ([BLOCK_N, BLOCK_D] each) into the rows' running softmax state.

    `visible` [rows, BLOCK_N] is read only when MASKED; every row must see at least one key of
    its first tile (true for all callers), so the running max is finite from then on. With FP8,
    k and v are e4m3 (exact in q's dtype) and their per-token scales ks/vs dequantize the
    scores and the probabilities: a multiply per score rather than per element. q comes through
    `fp16_query`, so both products run in its dtype.
    """
    if FP8:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s = mma(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
    if FP8:
        s = s * ks[None, :]
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    pv = p
    if FP8:
        pv = p * vs[None, :]
    acc = acc * alpha[:, None] + mma(pv.to(v.dtype), v, PRECISION, UPCAST)
    return m_new, l_i, acc
