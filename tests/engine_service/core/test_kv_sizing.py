"""KV-cache sizing without a GPU: the budget arithmetic and the profiling pass's batch shape."""

import pytest

from llmserve.engine_service.core.kv_sizing import MemorySnapshot, dummy_chunks, num_kv_blocks

GIB = 1 << 30


def test_kv_budget_arithmetic() -> None:
    memory = MemorySnapshot(total=80 * GIB, free=75 * GIB, peak_allocated=4 * GIB,
                            allocated=2 * GIB, non_torch=GIB // 2)
    blocks = num_kv_blocks(memory, 0.9, block_bytes=GIB // 64)
    assert blocks == int((0.9 * 80 - 4 - 0.5) * 64)
    # Another process holds most of the device: the free memory caps the budget.
    crowded = MemorySnapshot(total=80 * GIB, free=10 * GIB, peak_allocated=4 * GIB,
                             allocated=2 * GIB, non_torch=0)
    assert num_kv_blocks(crowded, 0.9, GIB // 64) < 8 * 64
    with pytest.raises(ValueError, match="gpu-memory-utilization"):
        num_kv_blocks(memory, 0.05, GIB // 64)


def test_profile_batch_shape() -> None:
    chunks = dummy_chunks(num_tokens=1000, num_seqs=256, block_size=16)
    assert len(chunks) == 256 and sum(c.num_tokens for c in chunks) == 1000
    assert all(c.samples and set(c.seq.block_ids) == {0} for c in chunks)
    assert all(len(c.seq.block_ids) * 16 >= c.num_tokens for c in chunks)
