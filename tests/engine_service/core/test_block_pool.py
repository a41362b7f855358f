"""BlockPool: reference counts, prefix-cache lookup, LRU eviction and KV events."""

from llmserve.engine_service.core.block_pool import BlockPool, KvEvent


def test_allocate_release_and_reuse_cached_blocks() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    assert a is not None and pool.num_free == 2
    pool.register(a[0], 111)
    pool.register(a[1], 222)
    assert pool.take_events() == [KvEvent(True, 111), KvEvent(True, 222)]
    pool.release(a)
    assert pool.num_free == 4
    # Released blocks stay findable until space is needed.
    assert pool.lookup([111, 222, 333]) == a
    pool.acquire(a[:1])
    assert pool.ref_counts[a[0]] == 1 and pool.num_free == 3
    assert pool.allocate(4) is None


def test_eviction_is_least_recently_released_and_tail_first() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    assert blocks is not None
    for block, block_hash in zip(blocks, (1, 2, 3), strict=True):
        pool.register(block, block_hash)
    pool.take_events()
    pool.release(blocks)  # the tail (hash 3) is released first, so it is evicted first
    fresh = pool.allocate(1)
    assert fresh == [blocks[2]]
    assert pool.take_events() == [KvEvent(False, 3)]
    assert pool.lookup([1, 2]) == blocks[:2]
    assert pool.lookup([3]) == []


def test_duplicate_content_keeps_first_block() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2) or []
    pool.register(a, 7)
    pool.register(b, 7)
    assert pool.cached == {7: a}
    assert pool.block_hash[b] is None
    assert pool.take_events() == [KvEvent(True, 7)]
