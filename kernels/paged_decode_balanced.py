"""Triton paged decode attention with the keys dealt out evenly: a fixed number of programs,
each streaming the same number of K/V tiles.

The split kernel (paged_decode.py) gives every (sequence, KV head) pair its own programs, so a
batch whose pairs fill the GPU only a wave and a half ends with most SMs idle while the long
rows finish. Here the pairs' tiles are laid end to end (sequence by sequence, its KV heads
side by side) and cut into one equal range per program: every program finishes at about the
same time whatever the mix of lengths. A range may start or end inside a pair; each such
piece leaves a normalized partial output and its log-sum-exp, and the last piece of a pair to
finish (an arrival counter per pair) merges them in a fixed order, so the result does not
depend on which came last. Pairs a program covers whole are written directly.

The grid depends only on the GPU (programs per SM x SMs), never on the data: CUDA-graph safe.
"""

import torch
import triton
import triton.language as tl

from llmserve.kernels.dependent_launch import await_previous_kernel, dependent_launch
from llmserve.kernels.graph_buffers import buffer_before_capture
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

# Programs a launch can hold arrival counters for (programs per SM x SMs stays far below).
MAX_PROGRAMS = 8192


@triton.jit
def _merge_pieces(part_out_ptr, part_lse_ptr, owner, pieces, rows, row_mask, offs_d,
                  GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """A pair's output from its pieces: the owner's last piece (slot 1), then the first piece
    (slot 0) of each program after it. Loads bypass L1: other SMs wrote them."""
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for j in range(pieces):
        slot = (owner + j) * 2 + tl.where(j == 0, 1, 0)
        at = slot * GROUP + rows
        lse = tl.load(part_lse_ptr + at, mask=row_mask, other=0.0, cache_modifier=".cg")
        part = tl.load(part_out_ptr + at[:, None] * BLOCK_D + offs_d[None, :],
                       mask=row_mask[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        weight = tl.exp2(lse - m_new)
        total = total * alpha + weight
        acc = acc * alpha[:, None] + part * weight[:, None]
        m = m_new
    return acc / total[:, None]


@triton.jit
def _decode_balanced_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, seq_lens_ptr, tables_ptr, out_ptr,
    part_out_ptr, part_lse_ptr, count_ptr, qk_scale, batch,
    stride_qb, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    stride_sp, stride_sh, stride_table, stride_ob, stride_oh,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_B: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, FP8: tl.constexpr, FP16: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    prog = tl.program_id(0)
    programs = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_H)
    row_mask = rows < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)

    offs_b = tl.arange(0, BLOCK_B)
    lens = tl.load(seq_lens_ptr + offs_b, mask=offs_b < batch, other=0)
    total = tl.sum(tl.cdiv(lens, BLOCK_N) * NUM_KV_HEADS, 0)
    share = tl.cdiv(total, programs)
    pos = prog * share
    stop = tl.minimum(pos + share, total)

    # A sequence with no keys (a padded batch slot) has no tiles: its rows are zeroed here.
    for seq in range(prog, batch, programs):
        if tl.load(seq_lens_ptr + seq) == 0:
            for kv_head in range(NUM_KV_HEADS):
                heads = kv_head * GROUP + rows
                tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh
                         + offs_d[None, :], tl.zeros([BLOCK_H, BLOCK_D], tl.float32).to(
                             out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])

    while pos < stop:
        # Tiles per sequence (each of its KV heads has that many), and where each sequence's
        # pairs end in the tiles laid end to end: reloaded (from L1) for each piece rather than
        # kept, which would hold registers through the tile loop.
        lens = tl.load(seq_lens_ptr + offs_b, mask=offs_b < batch, other=0)
        seq_tiles = tl.cdiv(lens, BLOCK_N)
        ends = tl.cumsum(seq_tiles * NUM_KV_HEADS, 0)
        seq = tl.sum((ends <= pos).to(tl.int32), 0)
        tiles = tl.sum(tl.where(offs_b == seq, seq_tiles, 0), 0)
        seq_len = tl.sum(tl.where(offs_b == seq, lens, 0), 0)
        first = tl.sum(tl.where(offs_b == seq, ends, 0), 0) - tiles * NUM_KV_HEADS
        kv_head = (pos - first) // tiles
        pair_start = first + kv_head * tiles
        t0 = pos - pair_start
        t1 = tl.minimum(tiles, t0 + stop - pos)
        lo = t0 * BLOCK_N
        hi = tl.minimum(t1 * BLOCK_N, seq_len)

        heads = kv_head * GROUP + rows
        q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        q = fp16_query(q, FP16)
        table_row = tables_ptr + seq * stride_table
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            k, v, ks, vs, tok = load_kv_tile(
                k_ptr, v_ptr, ks_ptr, vs_ptr, table_row, start, kv_head, hi, offs_n, offs_d,
                d_mask, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                stride_sp, stride_sh, PAGE_SIZE, BLOCK_N, FP8)
            m_i, l_i, acc = softmax_step(q, k, v, ks, vs, tok[None, :] < hi, m_i, l_i, acc,
                                         qk_scale, True, PRECISION, UPCAST, FP8)
        out = acc / l_i[:, None]
        out_at = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        out_mask = row_mask[:, None] & d_mask[None, :]
        owner = pair_start // share
        pieces = (pair_start + tiles - 1) // share - owner + 1
        if pieces == 1:
            tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            # This program's piece starting the pair goes to its slot 1, a piece continuing it
            # to slot 0 (a program starts at most one pair late and ends at most one early).
            slot = prog * 2 + tl.where(t0 == 0, 1, 0)
            at = slot * GROUP + rows
            tl.store(part_out_ptr + at[:, None] * BLOCK_D + offs_d[None, :], out,
                     mask=row_mask[:, None])
            tl.store(part_lse_ptr + at, m_i + tl.log2(l_i), mask=row_mask)
            # The barrier puts every thread's stores before the (releasing) arrival.
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + owner, 1, sem="acq_rel", scope="gpu")
            tl.debug_barrier()
            if arrived == pieces - 1:
                merged = _merge_pieces(part_out_ptr, part_lse_ptr, owner, pieces, rows,
                                       row_mask, offs_d, GROUP, BLOCK_H, BLOCK_D)
                tl.store(count_ptr + owner, 0)  # ready for the next launch
                tl.store(out_at, merged.to(out_ptr.dtype.element_ty), mask=out_mask)
        pos += t1 - t0


# Per device: zeroed once; each pair's counter is returned to zero by the piece that merges it.
_arrival_counters: dict[torch.device, torch.Tensor] = {}


def balanced_programs(device: torch.device, programs_per_sm: int) -> int:
    """The launch's program count: `programs_per_sm` for every SM of `device`."""
    return min(programs_per_sm * sm_count(device), MAX_PROGRAMS)


def paged_decode_balanced(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    block_n: int = 64,
    num_warps: int = 2,
    num_stages: int = 5,
    programs_per_sm: int = 5,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    maxnreg: int | None = None,
) -> torch.Tensor:
    """Decode attention as paged_decode_attention computes it (same arguments and result), its
    keys dealt out evenly over programs_per_sm x SMs programs of `block_n`-key tiles (`maxnreg`
    caps the registers a thread, None leaves them to the compiler)."""
    check_paged_inputs(q, k_cache, v_cache, block_tables, kv_scales)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    programs = balanced_programs(q.device, programs_per_sm)
    block_d = triton.next_power_of_2(head_dim)
    counters = buffer_before_capture(_arrival_counters, q.device, lambda: torch.zeros(
        MAX_PROGRAMS, dtype=torch.int32, device=q.device))
    part_out = torch.empty(programs * 2 * group, block_d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(programs * 2 * group, dtype=torch.float32, device=q.device)
    precision, upcast = dot_modes(q.dtype)
    pdl = dependent_launch(q.device)
    k_scales, v_scales = kv_scales if kv_scales is not None else (k_cache, v_cache)  # unread
    _decode_balanced_kernel[(programs,)](
        q, k_cache, v_cache, k_scales, v_scales, seq_lens, block_tables, out, part_out,
        part_lse, counters, scale * LOG2E, batch,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k_scales.stride(0),
        k_scales.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, PAGE_SIZE=block_size,
        BLOCK_B=max(256, triton.next_power_of_2(batch)), PRECISION=precision, UPCAST=upcast,
        FP8=kv_scales is not None, FP16=fp16_products(q, kv_scales), PDL=pdl, launch_pdl=pdl,
        num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg,
    )
    return out
