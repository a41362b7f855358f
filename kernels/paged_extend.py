"""Triton paged extend attention: varlen causal attention of new tokens over a paged KV cache.

The twin is `paged_attention_torch`. The cache already holds every key of this step (a cached
prefix, earlier chunks and this step's tokens); sequence b's queries are its last q_len positions
and the query at position p sees keys j <= p. Pure prefill, chunked prefill over a prefix and
decode rows (q_len 1) all take the same path.

A program owns BLOCK_Q query tokens of one sequence and one KV head; its BLOCK_M rows are those
tokens times the GROUP query heads of that KV head, so each K/V tile is loaded once for the group.
The grid is sized without reading query lengths on the host: sequence b's query blocks are
numbered from query_start_loc[b] // BLOCK_Q + b, which leaves room for its ceil(q_len / BLOCK_Q)
blocks, and a program finds its sequence by binary search over those starts.
"""

import torch
import triton
import triton.language as tl

from llmserve.kernels.dependent_launch import await_previous_kernel, dependent_launch
from llmserve.kernels.fp8_kv import kv_scale_words
from llmserve.kernels.paged_common import (
    LOG2E,
    check_paged_inputs,
    dot_modes,
    fp16_products,
    fp16_query,
    load_kv_tile,
    softmax_step,
)

BLOCK_M = 64  # query rows (tokens x group heads) per program
BLOCK_N = 64  # keys per tile
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit(do_not_specialize=["num_seqs"])
def _extend_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, out_ptr, starts_ptr, seq_lens_ptr, tables_ptr,
    qk_scale, num_seqs,
    stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    stride_sp, stride_sh, stride_table, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr, FP16: tl.constexpr,
    PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    kv_head = tl.program_id(0)  # fastest over the grid: neighbouring heads share DRAM pages
    block = tl.program_id(1)
    # The last sequence whose first query block is at or before ours.
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        owns = tl.load(starts_ptr + mid) // BLOCK_Q + mid <= block
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid - 1)
    seq = lo
    q_start = tl.load(starts_ptr + seq)
    q_len = tl.load(starts_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    first = (block - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first query of ours in the sequence
    if first >= q_len:
        return

    rows = tl.arange(0, BLOCK_M)
    q_idx = first + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = (rows // GROUP < BLOCK_Q) & (q_idx < q_len)
    pos = seq_len - q_len + q_idx  # each row's position in its sequence
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    io_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + (q_start + q_idx)[:, None] * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :], mask=io_mask, other=0.0)
    q = fp16_query(q, FP16)

    table_row = tables_ptr + seq * stride_table
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first_pos = seq_len - q_len + first
    last_pos = seq_len - q_len + tl.minimum(first + BLOCK_Q, q_len) - 1
    # Keys below first_pos + 1 are visible to every row: those whole tiles need no mask.
    open_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    for start in range(0, open_end, BLOCK_N):
        k, v, ks, vs, _ = load_kv_tile(
            k_ptr, v_ptr, ks_ptr, vs_ptr, table_row, start, kv_head, open_end, offs_n, offs_d,
            d_mask, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
            stride_sp, stride_sh, PAGE_SIZE, BLOCK_N, FP8)
        m_i, l_i, acc = softmax_step(q, k, v, ks, vs, None, m_i, l_i, acc, qk_scale,
                                     False, PRECISION, UPCAST, FP8)
    for start in range(open_end, last_pos + 1, BLOCK_N):
        k, v, ks, vs, tok = load_kv_tile(
            k_ptr, v_ptr, ks_ptr, vs_ptr, table_row, start, kv_head, last_pos + 1, offs_n,
            offs_d, d_mask, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
            stride_sp, stride_sh, PAGE_SIZE, BLOCK_N, FP8)
        # Rows past our queries (padding) also see the zero keys past last_pos: never stored.
        visible = tok[None, :] <= pos[:, None]
        m_i, l_i, acc = softmax_step(q, k, v, ks, vs, visible, m_i, l_i, acc, qk_scale,
                                     True, PRECISION, UPCAST, FP8)

    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + q_idx)[:, None] * stride_ot + heads[:, None] * stride_oh
             + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal varlen attention over a paged KV cache: q [T, Hq, D] -> [T, Hq, D] in q's dtype.

    query_start_loc [B+1] and seq_lens [B] int32: sequence b's queries are rows
    query_start_loc[b]:query_start_loc[b+1] of q, at its last positions before seq_lens[b]; its
    keys (prefix and this step's alike) must already be in the cache. Each sequence needs
    q_len <= seq_len. Reads no tensor on the host, so it never syncs. `kv_scales`
    ([num_blocks, Hkv, block_size] bfloat16, K's and V's) come with an e4m3 cache (see fp8_kv).
    """
    check_paged_inputs(q, k_cache, v_cache, block_tables, kv_scales)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    block_m = max(BLOCK_M, triton.next_power_of_2(group))
    block_q = block_m // group
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    precision, upcast = dot_modes(q.dtype)
    grid = (num_kv_heads, num_tokens // block_q + num_seqs)
    pdl = dependent_launch(q.device)
    k_scales, v_scales = kv_scale_words(k_cache, v_cache, kv_scales)
    _extend_kernel[grid](
        q, k_cache, v_cache, k_scales, v_scales, out, query_start_loc, seq_lens, block_tables,
        scale * LOG2E, num_seqs,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k_scales.stride(0),
        k_scales.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=BLOCK_N, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), PAGE_SIZE=block_size,
        PRECISION=precision, UPCAST=upcast, FP8=kv_scales is not None,
        FP16=fp16_products(q, kv_scales), PDL=pdl, launch_pdl=pdl,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out
