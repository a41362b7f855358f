"""Dev variant: the FP8 split decode kernel with K/V tiles loaded by TMA (host descriptors over the
whole e4m3 pool viewed as 128-byte rows)."""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import llmserve.kernels.paged_decode as pd
from llmserve.kernels.dependent_launch import await_previous_kernel, dependent_launch
from llmserve.kernels.paged_common import LOG2E, dot_modes, fp16_query, softmax_step


@triton.jit
def _decode_tma_kernel(
    q_ptr, kv_desc, ks_ptr, vs_ptr, seq_lens_ptr, tables_ptr, order_ptr, out_ptr,
    part_out_ptr, part_lse_ptr, qk_scale,
    stride_qb, stride_qh, k_row0, v_row0, rows_per_page, rows_per_head,
    stride_sp, stride_sh, stride_table, stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    MIN_SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ORDERED: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    if ORDERED:
        seq = tl.load(order_ptr + seq)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = pd._split_len(seq_len, NUM_SPLITS, BLOCK_N, MIN_SPLIT)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)
    if NUM_SPLITS > 1 and lo >= hi:
        return
    rows = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None], other=0.0)
    q = fp16_query(q, True)
    table_row = tables_ptr + seq * stride_table
    offs_n = tl.arange(0, BLOCK_N)
    head_rows = kv_head * rows_per_head
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        page = tl.load(table_row + start // PAGE_SIZE)
        slot0 = start % PAGE_SIZE
        base = page * rows_per_page + head_rows + slot0
        k = kv_desc.load([k_row0 + base, 0])
        v = kv_desc.load([v_row0 + base, 0])
        tok = start + offs_n
        tok_mask = tok < hi
        scale_at = page.to(tl.int64) * stride_sp + kv_head * stride_sh + slot0 + offs_n
        ks = tl.load(ks_ptr + scale_at, mask=tok_mask, other=0.0)
        vs = tl.load(vs_ptr + scale_at, mask=tok_mask, other=0.0)
        m_i, l_i, acc = softmax_step(q, k, v, ks, vs, tok[None, :] < hi, m_i, l_i, acc,
                                     qk_scale, True, PRECISION, UPCAST, True)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        part = (seq * tl.num_programs(0) * GROUP + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * BLOCK_D + offs_d[None, :], out,
                 mask=row_mask[:, None])
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=row_mask)


_DESC = {}


def _desc(k_cache, block_n):
    key = (k_cache.untyped_storage().data_ptr(), block_n)
    d = _DESC.get(key)
    if d is None:
        rows = k_cache.untyped_storage().nbytes() // 128
        flat = k_cache.as_strided((rows, 128), (128, 1), 0)
        d = _DESC[key] = TensorDescriptor.from_tensor(flat, [block_n, 128])
    return d


def paged_decode_tma(q, k_cache, v_cache, seq_lens, block_tables, scale, kv_scales, order=None,
                     num_splits=None, tiles=None):
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert head_dim == 128 and k_cache.stride(1) == 128 and k_cache.dtype.itemsize == 1
    group = num_heads // num_kv_heads
    num_splits, min_split, tiles = pd.resolve_launch(
        batch, num_kv_heads, block_tables.shape[1] * block_size, pd.sm_count(q.device), True,
        num_splits, tiles)
    out = torch.empty_like(q)
    precision, upcast = dot_modes(q.dtype)
    pdl = dependent_launch(q.device)
    if num_splits > 1:
        part_out = torch.empty(batch, num_heads, num_splits, 128, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out
    ks, vs = kv_scales
    _decode_tma_kernel[(num_kv_heads, batch, num_splits)](
        q, _desc(k_cache, tiles.block_n), ks, vs, seq_lens, block_tables,
        order if order is not None else seq_lens, out, part_out, part_lse, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.storage_offset() // 128, v_cache.storage_offset() // 128,
        k_cache.stride(0) // 128, k_cache.stride(2) // 128, ks.stride(0), ks.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=128, BLOCK_D=128,
        BLOCK_N=tiles.block_n, PAGE_SIZE=block_size, NUM_SPLITS=num_splits, MIN_SPLIT=min_split,
        PRECISION=precision, UPCAST=upcast, ORDERED=order is not None, PDL=pdl, launch_pdl=pdl,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, maxnreg=tiles.maxnreg)
    if num_splits > 1:
        pd._decode_reduce_kernel[(num_heads, batch)](
            part_out, part_lse, seq_lens, out, out.stride(0), out.stride(1),
            HEAD_DIM=128, BLOCK_D=128, BLOCK_N=tiles.block_n, NUM_SPLITS=num_splits,
            MIN_SPLIT=min_split, BLOCK_S=triton.next_power_of_2(num_splits), PDL=pdl,
            launch_pdl=pdl, num_warps=4)
    return out
