"""KV-cache sizing without a GPU: the budget arithmetic and the profiling pass's batch shape."""

from types import SimpleNamespace

import pytest
import torch

from llmserve.engine_service.core.kv_sizing import MemorySnapshot, dummy_chunks, num_kv_blocks
from llmserve.engine_service.runner.model_runner import ModelRunner

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


def test_an_fp8_cache_fits_about_twice_the_blocks() -> None:
    memory = MemorySnapshot(total=80 * GIB, free=75 * GIB, peak_allocated=4 * GIB,
                            allocated=2 * GIB, non_torch=0)
    spec = SimpleNamespace(num_layers=28, num_kv_heads=8, head_dim=128)  # Qwen3-0.6B's
    blocks = {kv: num_kv_blocks(memory, 0.9, ModelRunner.kv_bytes_per_block(
        spec, torch.bfloat16, 16, 1, kv)) for kv in ("auto", "fp8_e4m3")}
    # 2 bytes per element against 1 plus a 2-byte scale per 128-element row.
    assert blocks["fp8_e4m3"] == pytest.approx(blocks["auto"] * 256 / 130, rel=1e-4)
