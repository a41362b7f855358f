"""Sealed groups: the seal kernel against its twin, and the decode and extend kernels reading a
cache whose full groups are sealed against the twin reading it unsealed."""

import os

import pytest
import torch

from llmserve.engine_service.attention import kv_cache
from llmserve.kernels.paged_attention import paged_attention_torch
from llmserve.kernels.paged_decode import FP8_SPLIT_TILES, paged_decode_attention
from llmserve.kernels.paged_extend import paged_extend_attention
from llmserve.kernels.sealed_groups import (
    GROUP,
    ROWS,
    grouped_view,
    seal_new_groups,
    seal_new_groups_torch,
    sealed_view,
)

ON_CPU = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the CPU cases run in Triton's interpreter (no CUDA here)",
)
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEVICES = [pytest.param("cpu", marks=ON_CPU), pytest.param("cuda", marks=ON_GPU)]
FP8_TOLERANCE = 2e-2  # as the FP8 decode and extend tests: a bf16 q's fp16 products


def random_pools(count: int, num_layers: int, num_blocks: int, page: int, heads: int, dim: int,
                 device: str) -> list[list[torch.Tensor]]:
    """The layers' V views of `count` engine e4m3 pools holding the same random bytes."""
    pools = []
    for _ in range(count):
        caches = kv_cache.allocate(num_layers, num_blocks, page, heads, dim, torch.bfloat16,
                                   "fp8_e4m3", torch.device(device))
        raw = torch.empty(0, dtype=torch.uint8, device=device).set_(
            caches[0].k.untyped_storage())
        if not pools:
            fill = torch.randint(0, 256, raw.shape, dtype=torch.uint8, device=device)
        raw.copy_(fill)
        pools.append([cache.v for cache in caches])
    return pools


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("device", DEVICES)
def test_seal_kernel_seals_the_groups_a_step_filled(device: str, page: int) -> None:
    """(q_len, seq_len) rows: decode tokens completing a group and one past it, a prompt of
    several pages and a bit, a chunk ending on a page boundary, padding rows, a chunk inside a
    group, a chunk across groups; more rows than one program takes."""
    rows = [(1, 16), (1, 17), (150, 150), (10, 128), (0, 0), (3, 45), (1, 0), (20, 70)]
    rows += [(1, 40 + i) for i in range(ROWS)] + [(1, 192)]
    pages = [-(-max(length, 1) // page) for _, length in rows]
    caches, twin, before = random_pools(3, 2, sum(pages) + 3, page, 2, 32, device)
    order = torch.randperm(sum(pages) + 3, device=device).to(torch.int32)
    tables = torch.full((len(rows), max(pages)), int(order[-1]), dtype=torch.int32,
                        device=device)
    used = 0
    for b, n in enumerate(pages):
        tables[b, :n] = order[used : used + n]
        used += n
    starts = torch.tensor([0, *torch.tensor([q for q, _ in rows]).cumsum(0).tolist()],
                          dtype=torch.int32, device=device)
    seq_lens = torch.tensor([n for _, n in rows], dtype=torch.int32, device=device)
    seal_new_groups(caches, starts, seq_lens, tables)
    seal_new_groups_torch(twin, starts, seq_lens, tables)
    # (row, groups it filled): by hand from the rule, (seq_len - q_len) // 16 .. seq_len // 16
    filled = {0: [0], 2: list(range(9)), 3: [7], 7: [3], len(rows) - 1: [11]}
    filled.update({8 + i: [2] for i in range(ROWS) if (40 + i) % GROUP == 0})
    sealed = {(int(tables[b, g * GROUP // page]), g % (page // GROUP))
              for b, groups in filled.items() for g in groups}
    for v, v_twin, old in zip(caches, twin, before, strict=True):
        assert torch.equal(v.view(torch.uint8), v_twin.view(torch.uint8))
        for block in range(v.shape[0]):
            for group in range(page // GROUP):
                now = grouped_view(v)[block, group]
                if (block, group) in sealed:
                    now = sealed_view(v)[block, group]
                assert torch.equal(now.view(torch.uint8),
                                   grouped_view(old)[block, group].view(torch.uint8))
        assert not torch.equal(v.view(torch.uint8), old.view(torch.uint8))


def fp8_pool(paged, lens: list[int], page: int, device: str):
    kv = paged.pool(lens, page, 2, 32, torch.float32, device)
    return kv, *paged.fp8(kv)


@pytest.mark.parametrize(("page", "num_splits", "tiles"), [
    (128, 1, None), (128, 2, None), (128, 3, None), (128, None, None), (128, 2, FP8_SPLIT_TILES),
    (16, 1, None), (16, 2, FP8_SPLIT_TILES), (32, 3, None)])
@pytest.mark.parametrize("device", DEVICES)
def test_decode_reads_sealed_groups(paged, device: str, page: int, num_splits, tiles) -> None:
    """Lengths either side of group, page and split boundaries, and a padding row."""
    lens = [1, 15, 16, 17, 127, 128, 129, 256, 300, 385, 0]
    kv, k8, v8, kv_scales = fp8_pool(paged, lens, page, device)
    q = torch.randn(len(lens), 4, 32, device=device).bfloat16()
    starts = torch.arange(len(lens) + 1, dtype=torch.int32, device=device)
    ref = paged_attention_torch(q, k8, v8, starts, kv.seq_lens, kv.block_tables, 0.2, kv_scales)
    paged.seal(v8, kv, [1] * len(lens))
    twin = paged_attention_torch(q, k8, v8, starts, kv.seq_lens, kv.block_tables, 0.2,
                                 kv_scales, sealed=True)
    assert torch.equal(twin, ref)
    out = paged_decode_attention(q, k8, v8, kv.seq_lens, kv.block_tables, 0.2,
                                 num_splits=num_splits, tiles=tiles, kv_scales=kv_scales,
                                 sealed=True)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    assert paged.rel_err(out, ref) < FP8_TOLERANCE


@pytest.mark.parametrize("page", [16, 128])
@pytest.mark.parametrize("device", DEVICES)
def test_extend_reads_sealed_groups(paged, device: str, page: int) -> None:
    """Chunks after sealed groups ending inside a key tile and on one, a whole prompt, decode
    rows, a chunk starting inside a group."""
    lens, q_lens = [300, 140, 256, 129, 270, 100, 200], [44, 140, 1, 1, 100, 4, 136]
    kv, k8, v8, kv_scales = fp8_pool(paged, lens, page, device)
    q = torch.randn(sum(q_lens), 4, 32, device=device).bfloat16()
    starts = paged.starts(q_lens, device)
    ref = paged_attention_torch(q, k8, v8, starts, kv.seq_lens, kv.block_tables, 0.2, kv_scales)
    paged.seal(v8, kv, q_lens)
    twin = paged_attention_torch(q, k8, v8, starts, kv.seq_lens, kv.block_tables, 0.2,
                                 kv_scales, sealed=True)
    assert torch.equal(twin, ref)
    out = paged_extend_attention(q, k8, v8, starts, kv.seq_lens, kv.block_tables, 0.2,
                                 kv_scales, sealed=True)
    assert paged.rel_err(out, ref) < FP8_TOLERANCE


def test_sealed_launches_that_cannot_hold_are_refused(paged) -> None:
    kv = paged.pool([40], 8, 2, 32, torch.float32, "cpu")
    k8, v8, kv_scales = paged.fp8(kv)
    q = torch.randn(1, 4, 32).bfloat16()
    with pytest.raises(ValueError, match="pages of a multiple of 16"):
        paged_decode_attention(q, k8, v8, kv.seq_lens, kv.block_tables, 0.2,
                               kv_scales=kv_scales, sealed=True)
    with pytest.raises(ValueError, match="only an e4m3 KV cache"):
        paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.seq_lens, kv.block_tables, 0.2,
                               sealed=True)
    kv = paged.pool([40], 16, 2, 32, torch.float32, "cpu")
    k8, v8, kv_scales = paged.fp8(kv)
    with pytest.raises(ValueError, match="one run of"):
        paged_extend_attention(q, k8, v8.contiguous(), paged.starts([1], "cpu"), kv.seq_lens,
                               kv.block_tables, 0.2, kv_scales, sealed=True)


def test_engine_seals_only_where_every_step_keeps_its_tokens() -> None:
    assert kv_cache.seals_groups("fp8_e4m3", 16, speculating=False)
    assert kv_cache.seals_groups("fp8_e4m3", 128, speculating=False)
    assert not kv_cache.seals_groups("fp8_e4m3", 8, speculating=False)
    assert not kv_cache.seals_groups("fp8_e4m3", 128, speculating=True)
    assert not kv_cache.seals_groups("auto", 128, speculating=False)
