"""The GPU's decode attention over an e4m3 KV cache, written in Gluon (Triton's explicit-layout
language): paged_decode's split kernel with the layouts and the pipeline spelled out.

Why not the Triton kernel: P @ V takes V with consecutive tokens side by side in each register,
but a page stores each token's row of head_dim bytes. Triton lets the tensor cores' operand
layout reach back to the shared-memory load of the 8-bit tile, which then gathers V one byte
per load (128 loads a tile per thread, whatever the kernel's source asks). Here V's tile is
read as 16-bit pairs (a token's even and odd dim side by side) and transposed by `ldmatrix`, so
that each register holds one pair for two consecutive tokens; a byte permute sorts them into
the even dims' and the odd dims' operands, each widened to fp16 in one instruction, and P @ V
runs as two products over half the dims each (docs/benchmarks.md has the H100 measurements).

Everything else follows the split kernel: one program per (KV head, sequence, split), K/V tiles
of BLOCK_N tokens streamed through STAGES shared-memory buffers by cp.async (rows past the
split's end zero-filled, never read), scores scaled by K's per-row scales and probabilities by
V's (bfloat16, loaded as 32-bit words of two), fp16 tile products with fp32 accumulation, and
the same partial outputs for paged_decode's reduce kernel. The interpreter has no Gluon: on
the CPU the Triton kernel runs.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

# Gluon is experimental and renamed these between Triton 3.6 (torch 2.11's) and 3.9.
_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
_async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared
_OLD_REINTERPRET = gl.constexpr(not hasattr(gl.shared_memory_descriptor, "reinterpret"))

HEAD_DIMS = (32, 64, 128, 256)  # rows of 16-byte vectors that a warp's lanes tile evenly
_F16_MAX = gl.constexpr(65504.0)


def supports(q: torch.Tensor, head_dim: int) -> bool:
    """Whether the Gluon kernel takes this decode: a CUDA bf16 q (fp16 tile products, as
    paged_common.fp16_products) and a head_dim it tiles."""
    return q.is_cuda and q.dtype == torch.bfloat16 and head_dim in HEAD_DIMS


@gluon.jit
def _await_previous_kernel(PDL: gl.constexpr):
    """dependent_launch.await_previous_kernel, in Gluon."""
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _tile_page(table_row, lo, tile, num_tiles, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr):
    """The page of the program's tile `tile` (clamped to a real tile, so that the lookups
    ahead of the last one stay inside the table row)."""
    tile = gl.maximum(gl.minimum(tile, num_tiles - 1), 0)
    return gl.load(table_row + (lo + tile * BLOCK_N) // PAGE_SIZE)


@gluon.jit
def _load_tile(k_ptr, v_ptr, ks_ptr, vs_ptr, k_smem, v_smem, ks_smem, vs_smem, stage, page,
               table_row, start, hi, kv_head, rows, offs_d, scale_rows, stride_kp, stride_kt,
               stride_kh, stride_vp, stride_vt, stride_vh, stride_sp, stride_sh,
               PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr):
    """Starts the copies of tile `start`.. (K, V and their scales) into buffer `stage`. A tile
    inside one page takes `page`; pages shorter than a tile are looked up row by row."""
    ok = (start + rows) < hi
    scale_ok = (start + scale_rows) < hi
    if PAGE_SIZE >= BLOCK_N:
        page = page.to(gl.int64)
        slot = start % PAGE_SIZE + rows
        scale_page = page
        scale_slot = start % PAGE_SIZE + scale_rows
    else:
        page = gl.load(table_row + (start + rows) // PAGE_SIZE, mask=ok, other=0).to(gl.int64)
        slot = (start + rows) % PAGE_SIZE
        scale_page = gl.load(table_row + (start + scale_rows) // PAGE_SIZE, mask=scale_ok,
                             other=0).to(gl.int64)
        scale_slot = (start + scale_rows) % PAGE_SIZE
    k_at = page * stride_kp + slot * stride_kt + kv_head * stride_kh
    v_at = page * stride_vp + slot * stride_vt + kv_head * stride_vh
    _async_load(k_smem.index(stage), k_ptr + k_at[:, None] + offs_d[None, :], mask=ok[:, None])
    _async_load(v_smem.index(stage), v_ptr + v_at[:, None] + offs_d[None, :], mask=ok[:, None])
    # Each slot's 32-bit word of two bfloat16 scales (fp8_kv.kv_scale_words).
    word_at = scale_page * stride_sp + kv_head * stride_sh + scale_slot // 2
    _async_load(ks_smem.index(stage), ks_ptr + word_at, mask=scale_ok)
    _async_load(vs_smem.index(stage), vs_ptr + word_at, mask=scale_ok)


@gluon.jit
def _pairs_view(tile, PAIRS_LAYOUT: gl.constexpr):
    """An e4m3 [tokens, head_dim] tile seen as [tokens, head_dim / 2] 16-bit pairs."""
    shape: gl.constexpr = [tile.shape[0], tile.shape[1] // 2]
    if _OLD_REINTERPRET:
        return tile._reinterpret(gl.int16, shape, PAIRS_LAYOUT)
    else:
        return tile.reinterpret(gl.int16, shape, PAIRS_LAYOUT)


@gluon.jit
def _widen_pairs(pairs):
    """Each 16-bit pair of e4m3 values (even dim low, odd dim high) as two fp16 tensors. The
    operand layout holds a column's consecutive tokens side by side, so one byte permute per two
    tokens gathers the even dims' bytes, another the odd dims', and each widens in one cvt."""
    return gl.inline_asm_elementwise(
        """{
        .reg .b32 e, o;
        .reg .b16 e16, o16, x;
        prmt.b32 e, $2, 0, 0x5520;
        prmt.b32 o, $2, 0, 0x5531;
        mov.b32 {e16, x}, e;
        mov.b32 {o16, x}, o;
        cvt.rn.f16x2.e4m3x2 $0, e16;
        cvt.rn.f16x2.e4m3x2 $1, o16;
        }""",
        "=r,=r,r", [pairs], dtype=(gl.float16, gl.float16), is_pure=True, pack=2)


@gluon.jit
def _scales(words, cols):
    """fp8_kv.kv_scale in Gluon: a tile's fp32 scales from the words holding them (a tile
    starts at an even slot, so a column's parity is its slot's)."""
    bits = gl.where(cols % 2 == 0, words << 16, words & -0x10000)
    return bits.to(gl.float32, bitcast=True)


@gluon.jit
def decode_fp8_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, seq_lens_ptr, tables_ptr, order_ptr, out_ptr,
    part_out_ptr, part_lse_ptr, qk_scale,
    stride_qb, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    stride_sp, stride_sh, stride_table, stride_ob, stride_oh,
    GROUP: gl.constexpr, BLOCK_H: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
    PAGE_SIZE: gl.constexpr, NUM_SPLITS: gl.constexpr, MIN_SPLIT: gl.constexpr,
    STAGES: gl.constexpr, ORDERED: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr,
):
    # e4m3 rows as 16-byte vectors; q's bf16 rows as 8 values a lane.
    LANES_D: gl.constexpr = HEAD_DIM // 16
    Q_LANES_D: gl.constexpr = HEAD_DIM // 8
    rows_layout: gl.constexpr = gl.BlockedLayout([1, 16], [32 // LANES_D, LANES_D],
                                                 [num_warps, 1], [1, 0])
    q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // Q_LANES_D, Q_LANES_D],
                                              [num_warps, 1], [1, 0])
    scale_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, num_warps],
                                                  instr_shape=[16, 8])
    # e4m3 operands widen to fp16 in pairs: four values per 32 bits (q matches K's order).
    q_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    k_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    v_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    tile_smem: gl.constexpr = gl.SwizzledSharedLayout(vec=16, per_phase=1, max_phase=8,
                                                      order=[1, 0])
    # The same bytes as tile_smem, in 16-bit units.
    pairs_smem: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8,
                                                       order=[1, 0])
    scale_smem: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                       order=[0])

    _await_previous_kernel(PDL)
    kv_head = gl.program_id(0)
    seq = gl.program_id(1)
    if ORDERED:
        seq = gl.load(order_ptr + seq)
    split = gl.program_id(2)
    seq_len = gl.load(seq_lens_ptr + seq)
    # paged_decode._split_len: whole tiles, at least MIN_SPLIT keys.
    split_len = gl.maximum(gl.cdiv(gl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N, MIN_SPLIT)
    lo = split * split_len
    hi = gl.minimum(lo + split_len, seq_len)
    if NUM_SPLITS > 1 and lo >= hi:
        return  # the reduction counts only the non-empty splits

    k_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, HEAD_DIM], tile_smem)
    v_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, HEAD_DIM], tile_smem)
    ks_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N], scale_smem)
    vs_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N], scale_smem)

    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, rows_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, rows_layout))
    scale_rows = gl.arange(0, BLOCK_N, layout=scale_layout)
    table_row = tables_ptr + seq * stride_table
    num_tiles = gl.cdiv(hi - lo, BLOCK_N)

    # Every iteration commits one copy group (empty past the last tile), so that waiting for
    # all but STAGES - 2 groups always means this tile's.
    for first in gl.static_range(STAGES - 1):
        if first < num_tiles:
            _load_tile(k_ptr, v_ptr, ks_ptr, vs_ptr, k_bufs, v_bufs, ks_bufs, vs_bufs, first,
                       _tile_page(table_row, lo, first, num_tiles, PAGE_SIZE, BLOCK_N),
                       table_row, lo + first * BLOCK_N, hi, kv_head, rows, offs_d, scale_rows,
                       stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                       stride_sp, stride_sh, PAGE_SIZE, BLOCK_N)
        cp.commit_group()
    # The page of the next tile to copy, looked up a tile ahead of its copy.
    next_page = _tile_page(table_row, lo, STAGES - 1, num_tiles, PAGE_SIZE, BLOCK_N)

    q_rows = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, q_layout))
    q_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, q_layout))
    q = gl.load(q_ptr + seq * stride_qb + (kv_head * GROUP + q_rows)[:, None] * stride_qh
                + q_cols[None, :], mask=(q_rows < GROUP)[:, None], other=0.0)
    q = gl.minimum(gl.maximum(q.to(gl.float32), -_F16_MAX), _F16_MAX).to(gl.float16)
    q = gl.convert_layout(q, q_op)

    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, gl.SliceLayout(1, mma))
    l_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(1, mma))
    # P @ V in two halves: the even dims' columns and the odd dims'.
    acc_even = gl.zeros([BLOCK_H, HEAD_DIM // 2], gl.float32, mma)
    acc_odd = gl.zeros([BLOCK_H, HEAD_DIM // 2], gl.float32, mma)
    for tile in range(num_tiles):
        stage = tile % STAGES
        cp.wait_group(STAGES - 2)
        # Every thread's copies of this tile have landed, and every thread is done with the
        # buffer refilled next (the previous tile's).
        _barrier()
        ahead = tile + STAGES - 1
        if ahead < num_tiles:
            _load_tile(k_ptr, v_ptr, ks_ptr, vs_ptr, k_bufs, v_bufs, ks_bufs, vs_bufs,
                       ahead % STAGES, next_page, table_row, lo + ahead * BLOCK_N, hi, kv_head,
                       rows, offs_d, scale_rows, stride_kp, stride_kt, stride_kh, stride_vp,
                       stride_vt, stride_vh, stride_sp, stride_sh, PAGE_SIZE, BLOCK_N)
        cp.commit_group()
        next_page = _tile_page(table_row, lo, ahead + 1, num_tiles, PAGE_SIZE, BLOCK_N)

        k = k_bufs.index(stage).permute((1, 0)).load(k_op).to(gl.float16)
        s = mma_v2(q, k, gl.zeros([BLOCK_H, BLOCK_N], gl.float32, mma))
        ks = _scales(ks_bufs.index(stage).load(gl.SliceLayout(0, mma)), cols)
        vs = _scales(vs_bufs.index(stage).load(gl.SliceLayout(0, mma)), cols)
        s = s * qk_scale * ks[None, :]
        s = gl.where((lo + tile * BLOCK_N + cols < hi)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        p = gl.convert_layout((p * vs[None, :]).to(gl.float16), p_op)
        v_even, v_odd = _widen_pairs(_pairs_view(v_bufs.index(stage), pairs_smem).load(v_op))
        acc_even = mma_v2(p, v_even, acc_even * alpha[:, None])
        acc_odd = mma_v2(p, v_odd, acc_odd * alpha[:, None])
    cp.wait_group(0)

    # An empty sequence (a padded batch slot) gets zeros rather than 0/0.
    l_safe = gl.where(l_i > 0, l_i, 1.0)[:, None]
    out_rows = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, mma))
    even_dims = 2 * gl.arange(0, HEAD_DIM // 2, layout=gl.SliceLayout(0, mma))
    heads = kv_head * GROUP + out_rows
    row_mask = (out_rows < GROUP)[:, None]
    if NUM_SPLITS == 1:
        at = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + even_dims[None, :]
        dtype: gl.constexpr = out_ptr.dtype.element_ty
        gl.store(at, (acc_even / l_safe).to(dtype), mask=row_mask)
        gl.store(at + 1, (acc_odd / l_safe).to(dtype), mask=row_mask)
    else:
        # Partials are [B, Hq, NUM_SPLITS, HEAD_DIM] fp32 and [B, Hq, NUM_SPLITS].
        part = (seq * gl.num_programs(0) * GROUP + heads) * NUM_SPLITS + split
        at = part_out_ptr + part[:, None] * HEAD_DIM + even_dims[None, :]
        gl.store(at, acc_even / l_safe, mask=row_mask)
        gl.store(at + 1, acc_odd / l_safe, mask=row_mask)
        gl.store(part_lse_ptr + part, m_i + gl.log2(l_i), mask=out_rows < GROUP)
