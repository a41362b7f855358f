"""Triton paged decode attention: one query token per sequence, split-KV (flash-decoding).

The twin is `paged_attention_torch` with one query per sequence. A program owns one
(sequence, KV head, split): it loads each K/V tile once for all query heads of that KV head
(GQA), padded to at least 16 rows so the tile products run on tl.dot. With several splits each
program writes a normalized partial output and its log-sum-exp, and a second kernel merges them.
Over an e4m3 cache the GPU runs the same scheme written in Gluon (paged_decode_fp8).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmserve.kernels import paged_decode_fp8
from llmserve.kernels.dependent_launch import await_previous_kernel, dependent_launch
from llmserve.kernels.fp8_kv import kv_scale_words
from llmserve.kernels.paged_common import (
    LOG2E,
    check_paged_inputs,
    dot_modes,
    fp16_products,
    fp16_query,
    load_kv_tile,
    sm_count,
    softmax_step,
)

MIN_SPLIT_TOKENS = 256  # a full batch's splits: below this their fixed cost stops paying
SPLIT_TOKENS = 512  # the longest share of one sequence that one program should stream
MAX_SPLITS = 64


@dataclass(frozen=True)
class DecodeTiles:
    """Launch shape of the split kernel: keys per tile, warps, software-pipelining depth, and
    a cap on registers per thread (None: the compiler's choice), which sets how many programs
    an SM holds at once."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: int | None = None


# Batches large enough not to split stream long runs of keys per program; wider, deeper tiles
# read K1's step faster. Split batches keep the default, which their split lengths were
# measured with.
UNSPLIT_TILES = DecodeTiles(block_n=128, num_warps=4, num_stages=3)


@dataclass(frozen=True)
class Fp8Band:
    """Batches over an e4m3 cache with at least `min_pairs_per_sm` (sequence, KV head) pairs
    per SM, and how they launch: `num_splits` (0: choose_num_splits's count) and `tiles`,
    whose num_stages counts the Gluon kernel's K/V buffers."""

    min_pairs_per_sm: float
    num_splits: int
    tiles: DecodeTiles


# The Gluon kernel's launch by batch, the fastest per band in a sweep of split counts and tiles
# at 12 of W1's decode states on an H100, two calls (docs/benchmarks.md). Where the pairs fill a
# few waves, which tiles end in the fewest partial waves decides; below one pair per SM, splits
# fill the SMs as for bf16.
FP8_BANDS = (
    Fp8Band(8.5, 1, DecodeTiles(block_n=128, num_warps=4, num_stages=2)),
    Fp8Band(6.0, 1, DecodeTiles(block_n=64, num_warps=4, num_stages=2)),
    Fp8Band(4.0, 1, DecodeTiles(block_n=128, num_warps=4, num_stages=2)),
    Fp8Band(3.0, 2, DecodeTiles(block_n=64, num_warps=4, num_stages=2)),
    Fp8Band(2.0, 2, DecodeTiles(block_n=128, num_warps=4, num_stages=2)),
    Fp8Band(1.0, 2, DecodeTiles(block_n=64, num_warps=4, num_stages=2)),
    Fp8Band(0.0, 0, DecodeTiles(block_n=64, num_warps=2, num_stages=2)),
)


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, sms: int,
                      block_n: int = 64) -> tuple[int, int]:
    """(splits per sequence, fewest keys per split) when the caller gives no split count;
    `max_context` bounds every seq_len.

    Two reasons to split: too few (sequence, KV head) programs to fill every SM a few times
    over, and long contexts, whose programs would otherwise run on alone in the last wave
    (SPLIT_TOKENS caps one program's share). A batch with four programs per SM or more does
    not split at all: on K1 (batch 256, W1's contexts) no split reads faster than three. The
    fewest keys per split grow with the batch: one tile of `block_n` keys for up to 32
    (sequence, KV head) pairs, whose step is bound by latency, up to MIN_SPLIT_TOKENS for a
    batch that fills the SMs on its own (at batch 1 splits of one tile are fastest, at batch 32
    splits of 64 keys are slower than none).
    """
    fill = triton.cdiv(4 * sms, batch * num_kv_heads)
    pairs = triton.next_power_of_2(triton.cdiv(batch * num_kv_heads, 32))
    min_split = min(block_n * pairs, triton.cdiv(MIN_SPLIT_TOKENS, block_n) * block_n)
    if fill == 1:
        return 1, min_split
    balance = triton.cdiv(max_context, SPLIT_TOKENS)
    splits = max(1, min(max(fill, balance), max_context // min_split, MAX_SPLITS))
    return splits, min_split


def fp8_band(batch: int, num_kv_heads: int, sms: int) -> Fp8Band:
    """The FP8_BANDS row a batch over an e4m3 cache launches by."""
    pairs = batch * num_kv_heads
    return next(b for b in FP8_BANDS if pairs >= b.min_pairs_per_sm * sms)


def resolve_launch(batch: int, num_kv_heads: int, max_context: int, sms: int, fp8: bool,
                   num_splits: int | None = None, tiles: DecodeTiles | None = None
                   ) -> tuple[int, int, DecodeTiles]:
    """(splits per sequence, fewest keys per split, tiles) of a decode launch, as
    paged_decode_attention picks them from what the caller left open (None)."""
    if fp8 and num_splits is None and tiles is None:
        band = fp8_band(batch, num_kv_heads, sms)
        num_splits, tiles = band.num_splits or None, band.tiles
    chosen = num_splits is None
    if chosen:
        num_splits, min_split = choose_num_splits(
            batch, num_kv_heads, max_context, sms, (tiles or DecodeTiles()).block_n)
    if tiles is None:
        tiles = UNSPLIT_TILES if chosen and num_splits == 1 else DecodeTiles()
    if not chosen or num_splits == 1:
        min_split = tiles.block_n
    return num_splits, min_split, tiles


@triton.jit
def _split_len(seq_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
               MIN_SPLIT: tl.constexpr):
    """Keys per split: seq_len over NUM_SPLITS, rounded up to whole tiles (so tiles stay
    page-aligned) and to at least MIN_SPLIT (a multiple of BLOCK_N); a short sequence then uses
    fewer than NUM_SPLITS splits and the rest of its programs exit at once."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N, MIN_SPLIT)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, seq_lens_ptr, tables_ptr, order_ptr, out_ptr,
    part_out_ptr, part_lse_ptr, qk_scale,
    stride_qb, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    stride_sp, stride_sh, stride_table, stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    MIN_SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr,
    FP16: tl.constexpr, ORDERED: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    # KV heads vary fastest over the grid: the programs reading the neighbouring heads of the
    # same tokens (adjacent rows of the same pages) run side by side, which keeps the DRAM
    # access pattern close to a sequential read of each page.
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    if ORDERED:
        seq = tl.load(order_ptr + seq)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = _split_len(seq_len, NUM_SPLITS, BLOCK_N, MIN_SPLIT)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)
    if NUM_SPLITS > 1 and lo >= hi:
        return  # the reduction counts only the non-empty splits

    rows = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    q = fp16_query(q, FP16)

    table_row = tables_ptr + seq * stride_table
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        k, v, ks, vs, tok = load_kv_tile(
            k_ptr, v_ptr, ks_ptr, vs_ptr, table_row, start, kv_head, hi, offs_n, offs_d, d_mask,
            stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_sp,
            stride_sh, PAGE_SIZE, BLOCK_N, FP8)
        m_i, l_i, acc = softmax_step(q, k, v, ks, vs, tok[None, :] < hi, m_i, l_i, acc,
                                     qk_scale, True, PRECISION, UPCAST, FP8)

    # An empty sequence (a padded batch slot) gets zeros rather than 0/0.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    else:
        # Partials are [B, Hq, NUM_SPLITS, BLOCK_D] fp32 and [B, Hq, NUM_SPLITS].
        part = (seq * tl.num_programs(0) * GROUP + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * BLOCK_D + offs_d[None, :], out,
                 mask=row_mask[:, None])
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=row_mask)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, seq_lens_ptr, out_ptr,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    head = tl.program_id(0)
    seq = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    used = tl.cdiv(seq_len, _split_len(seq_len, NUM_SPLITS, BLOCK_N, MIN_SPLIT))
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < used
    offs_d = tl.arange(0, BLOCK_D)
    part = (seq * tl.num_programs(0) + head) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))
    top = tl.where(used > 0, tl.max(lse, 0), 0.0)  # no splits at all: avoid -inf - -inf
    weight = tl.where(s_mask, tl.exp2(lse - top), 0.0)
    parts = tl.load(part_out_ptr + part[:, None] * BLOCK_D + offs_d[None, :],
                    mask=s_mask[:, None], other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    tiles: DecodeTiles | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over a paged KV cache: q [B, Hq, D] -> [B, Hq, D] in q's dtype.

    k_cache/v_cache [num_blocks, block_size, Hkv, D] (block_size a power of two), seq_lens [B]
    int32 (keys per sequence, this step's included; 0 gives zeros), block_tables [B, max_pages]
    int32. A given num_splits divides every sequence's keys into that many parts of whole tiles;
    None picks a count with choose_num_splits from the batch, the KV heads, the SM count and the
    longest context the block table can hold (no device sync, so CUDA-graph capture is safe).
    With both the split count and the tiles left to it, a batch that does not split runs
    UNSPLIT_TILES. `kv_scales` ([num_blocks, Hkv, block_size] bfloat16, K's and V's) come with an
    e4m3 cache (see fp8_kv): on the GPU with a bf16 q the Gluon kernel (paged_decode_fp8) reads
    it, launched by FP8_BANDS when neither split count nor tiles is given. `order` ([B] int32,
    a permutation of the rows) is the order their programs start in: longest first keeps a long
    row from starting in the last wave and running on alone.
    """
    check_paged_inputs(q, k_cache, v_cache, block_tables, kv_scales)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    num_splits, min_split, tiles = resolve_launch(
        batch, num_kv_heads, block_tables.shape[1] * block_size, sm_count(q.device),
        kv_scales is not None, num_splits, tiles)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    precision, upcast = dot_modes(q.dtype)
    pdl = dependent_launch(q.device)
    if num_splits > 1:
        part_out = torch.empty(batch, num_heads, num_splits, block_d, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # never touched with one split
    k_scales, v_scales = kv_scale_words(k_cache, v_cache, kv_scales)
    args = (
        q, k_cache, v_cache, k_scales, v_scales, seq_lens, block_tables,
        order if order is not None else seq_lens, out, part_out, part_lse, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k_scales.stride(0),
        k_scales.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
    )
    shape = dict(GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                 BLOCK_N=tiles.block_n, PAGE_SIZE=block_size, NUM_SPLITS=num_splits,
                 MIN_SPLIT=min_split, ORDERED=order is not None, PDL=pdl, launch_pdl=pdl,
                 num_warps=tiles.num_warps, maxnreg=tiles.maxnreg)
    grid = (num_kv_heads, batch, num_splits)
    if kv_scales is not None and paged_decode_fp8.supports(q, head_dim):
        paged_decode_fp8.decode_fp8_kernel[grid](*args, **shape, STAGES=tiles.num_stages)
    else:
        _decode_split_kernel[grid](
            *args, **shape, BLOCK_D=block_d, PRECISION=precision, UPCAST=upcast,
            FP8=kv_scales is not None, FP16=fp16_products(q, kv_scales),
            num_stages=tiles.num_stages)
    if num_splits > 1:
        _decode_reduce_kernel[(num_heads, batch)](
            part_out, part_lse, seq_lens, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=tiles.block_n, NUM_SPLITS=num_splits,
            MIN_SPLIT=min_split, BLOCK_S=triton.next_power_of_2(num_splits), PDL=pdl,
            launch_pdl=pdl, num_warps=4,
        )
    return out
