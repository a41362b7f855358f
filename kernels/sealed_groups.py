"""Sealed groups: an e4m3 cache keeps V transposed in each full group of 16 tokens.

P @ V sums over a tile's tokens. Over an e4m3 cache the kernels widen V to fp16 on the way to
the tensor cores, and that is fastest when each of V's dimensions comes as a run of 16 tokens
(one 16-byte load). Stored that way from the start, every new token's V row would become
head_dim one-byte stores. So V fills row by row, like K, and each group of 16 tokens of a page
is transposed in place, "sealed", once it is full: the group's 16 x head_dim bytes become
head_dim runs of 16 tokens, in the same place.

The rule the kernels and the twin rely on: when a step starts, sequence b's tokens below
(seq_len - q_len) // 16 * 16 (the groups full before its first new token) are sealed, and the
rest are not. `seal_new_groups` keeps it: after the last layer's attention it seals, in every
layer, the groups the step filled. It only holds where no step ever takes tokens back, so the
engine seals without speculative decoding only; prefix caching shares full pages only and
recomputes a sequence's last page, so no step writes into a sealed group.
"""

import torch
import triton
import triton.language as tl

from llmserve.kernels.dependent_launch import await_previous_kernel, dependent_launch

GROUP = 16  # tokens per sealed group: one 16-byte load of e4m3 per dimension
ROWS = 16  # sequences per program of the seal kernel: most have nothing to seal in a step
_GROUP = tl.constexpr(GROUP)


def sealed_view(v_cache: torch.Tensor) -> torch.Tensor:
    """An e4m3 V cache [num_blocks, block_size, Hkv, D] (the engine's layout: each (page, KV
    head) one run of block_size x D bytes) as its sealed groups hold it, [num_blocks,
    block_size // GROUP, GROUP, Hkv, D]: the same memory, each group dimension-major."""
    check_sealable(v_cache)
    num_blocks, block_size, heads, dim = v_cache.shape
    return v_cache.as_strided((num_blocks, block_size // GROUP, GROUP, heads, dim),
                              (v_cache.stride(0), GROUP * dim, 1, v_cache.stride(2), GROUP),
                              v_cache.storage_offset())


def grouped_view(v_cache: torch.Tensor) -> torch.Tensor:
    """The same cache as [num_blocks, block_size // GROUP, GROUP, Hkv, D], rows as written."""
    num_blocks, block_size, heads, dim = v_cache.shape
    return v_cache.as_strided((num_blocks, block_size // GROUP, GROUP, heads, dim),
                              (v_cache.stride(0), GROUP * dim, dim, v_cache.stride(2), 1),
                              v_cache.storage_offset())


def check_sealable(v_cache: torch.Tensor) -> None:
    """The layout sealing needs: each (page, KV head) of V one contiguous run of rows, pages
    of whole groups."""
    _, block_size, heads, dim = v_cache.shape
    if block_size % GROUP or v_cache.stride(1) != dim or v_cache.stride(3) != 1 or (
            heads > 1 and v_cache.stride(2) < block_size * dim):
        raise ValueError(f"sealed groups need pages of a multiple of {GROUP} tokens, each "
                         "(page, KV head) of V stored as one run of block_size x head_dim "
                         f"values; shape {tuple(v_cache.shape)}, strides {v_cache.stride()}")


def check_sealed_launch(v_cache: torch.Tensor, fp8: bool) -> None:
    """What a kernel reading sealed groups needs: an e4m3 cache in the sealable layout."""
    if not fp8:
        raise ValueError("only an e4m3 KV cache has sealed groups")
    check_sealable(v_cache)


def sealed_tokens(seq_len: int, q_len: int) -> int:
    """Tokens of a sequence sealed when a step of q_len tokens ending at seq_len starts."""
    return max(seq_len - q_len, 0) // GROUP * GROUP


def seal_new_groups_torch(v_caches: list[torch.Tensor], query_start_loc: torch.Tensor,
                          seq_lens: torch.Tensor, block_tables: torch.Tensor) -> None:
    """Twin of seal_new_groups (reads the step's lengths on the host)."""
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    block_size = v_caches[0].shape[1]
    per_page = block_size // GROUP
    pages, groups = [], []
    for b, seq_len in enumerate(lens):
        q_len = starts[b + 1] - starts[b]
        if q_len <= 0:
            continue
        for group in range(sealed_tokens(seq_len, q_len) // GROUP, seq_len // GROUP):
            pages.append(int(block_tables[b, group // per_page]))
            groups.append(group % per_page)
    if not pages:
        return
    device = v_caches[0].device
    page_index, group_index = torch.tensor(pages, device=device), torch.tensor(groups,
                                                                               device=device)
    for v in v_caches:
        rows = grouped_view(v)[page_index, group_index].clone()
        sealed_view(v)[page_index, group_index] = rows


@triton.jit
def _seal_kernel(
    v_ptr, starts_ptr, seq_lens_ptr, tables_ptr, num_rows, layer_stride,
    stride_vp, stride_vt, stride_vh, stride_table,
    NUM_KV_HEADS: tl.constexpr, ROWS: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    await_previous_kernel(PDL)
    layer = tl.program_id(0) // NUM_KV_HEADS
    kv_head = tl.program_id(0) % NUM_KV_HEADS
    first_row = tl.program_id(1) * ROWS
    offs_r = tl.arange(0, ROWS)
    live = first_row + offs_r < num_rows
    q_start = tl.load(starts_ptr + first_row + offs_r, mask=live, other=0)
    q_len = tl.load(starts_ptr + first_row + offs_r + 1, mask=live, other=0) - q_start
    seq_len = tl.load(seq_lens_ptr + first_row + offs_r, mask=live, other=0)
    # Tokens [lo, hi) of each row: the groups this step filled.
    lo = tl.maximum(seq_len - q_len, 0) // _GROUP * _GROUP
    hi = tl.where(q_len > 0, seq_len // _GROUP * _GROUP, lo)
    if tl.max(hi - lo, 0) <= 0:
        return
    offs_t = tl.arange(0, PAGE_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = (offs_d < HEAD_DIM)[None, :]
    # Where each row of a page lands once its group is sealed: the group's dimension-major runs.
    sealed_at = (offs_t // _GROUP * _GROUP * stride_vt + offs_t % _GROUP)[:, None] \
        + offs_d[None, :] * _GROUP
    base = v_ptr + layer.to(tl.int64) * layer_stride + kv_head * stride_vh
    for r in range(ROWS):
        here = offs_r == r
        row_lo = tl.sum(tl.where(here, lo, 0), 0)
        row_hi = tl.sum(tl.where(here, hi, 0), 0)
        for index in range(row_lo // PAGE_SIZE, tl.cdiv(row_hi, PAGE_SIZE)):
            page = tl.load(tables_ptr + (first_row + r) * stride_table + index).to(tl.int64)
            at = base + page * stride_vp
            tok = index * PAGE_SIZE + offs_t
            mask = ((tok >= row_lo) & (tok < row_hi))[:, None] & d_mask
            rows = tl.load(at + offs_t[:, None] * stride_vt + offs_d[None, :], mask=mask)
            # Every thread's loads done before any store overwrites the groups in place.
            tl.debug_barrier()
            tl.store(at + sealed_at, rows, mask=mask)
            tl.debug_barrier()


def seal_new_groups(v_caches: list[torch.Tensor], query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor) -> None:
    """Seals, in every layer's V (`v_caches`, one pool's equally spaced views), the groups
    this step filled: sequence b's tokens from (seq_len - q_len) // GROUP * GROUP up to
    seq_len // GROUP * GROUP. Reads no tensor on the host (CUDA-graph safe); a row of q_len 0
    or seq_len 0 (padding) seals nothing."""
    v = v_caches[0]
    check_sealable(v)
    num_rows = seq_lens.shape[0]
    if num_rows == 0:
        return
    _, block_size, num_kv_heads, head_dim = v.shape
    layer_stride = v_caches[1].data_ptr() - v.data_ptr() if len(v_caches) > 1 else 0
    if any(c.data_ptr() - v.data_ptr() != i * layer_stride for i, c in enumerate(v_caches)):
        raise ValueError("seal_new_groups needs the layers' V views equally spaced in one pool")
    pdl = dependent_launch(v.device)
    grid = (len(v_caches) * num_kv_heads, triton.cdiv(num_rows, ROWS))
    _seal_kernel[grid](
        v.view(torch.uint8), query_start_loc, seq_lens, block_tables, num_rows, layer_stride,
        v.stride(0), v.stride(1), v.stride(2), block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, ROWS=ROWS, PAGE_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), PDL=pdl, launch_pdl=pdl, num_warps=4,
    )
