"""KVCacheManager: prefix hits, block growth, freeing, publication of full blocks, eviction."""

from llmserve.common.block_hash import hash_full_blocks
from llmserve.engine_service.core.block_pool import BlockPool, KvEvent
from llmserve.engine_service.core.kv_cache_manager import KVCacheManager
from llmserve.engine_service.core.sequence import Sequence
from llmserve.engine_service.seam import EngineRequest

BS = 4


def seq(tokens: list[int], name: str = "s") -> Sequence:
    return Sequence(EngineRequest(name, tokens), 0, seed=0)


def computed(manager: KVCacheManager, tokens: list[int], name: str = "s") -> Sequence:
    """A sequence given its blocks (reusing its cached prefix), computed and published."""
    s = seq(tokens, name)
    prefix = manager.cached_prefix(s)
    assert manager.can_allocate(prefix, s.num_tokens)
    manager.allocate(s, prefix, s.num_tokens)
    manager.publish(s, prefix.num_tokens, s.num_tokens)
    return s


def test_a_shared_prefix_is_found_short_of_the_last_token() -> None:
    manager = KVCacheManager(BlockPool(16), BS)
    first = computed(manager, list(range(12)))  # 3 full blocks
    same = seq(list(range(12)), "same")
    # Its last token must still be computed (its logits pick the next token): 2 blocks, not 3.
    assert manager.cached_prefix(same).block_ids == first.block_ids[:2]
    longer = manager.cached_prefix(seq([*range(12), 99], "longer"))
    assert longer.block_ids == first.block_ids and longer.num_tokens == 12
    assert manager.cached_prefix(seq([0, 1, 2, 7, 4], "diverges")).num_tokens == 0


def test_shared_blocks_are_counted_through_preemption_and_abort() -> None:
    pool = BlockPool(8)
    manager = KVCacheManager(pool, BS)
    a = computed(manager, list(range(10)), "a")
    b = computed(manager, [*range(8), 50, 51, 52], "b")
    shared, own = a.block_ids[:2], b.block_ids[2:]
    assert b.block_ids[:2] == shared
    assert [pool.ref_counts[x] for x in shared] == [2, 2] and pool.num_free == 8 - 4
    manager.free(a)  # preempted: lets go, recomputed later
    assert a.block_ids == [] and [pool.ref_counts[x] for x in shared] == [1, 1]
    again = manager.cached_prefix(a)
    manager.allocate(a, again, a.num_tokens)
    assert a.block_ids[:2] == shared and [pool.ref_counts[x] for x in shared] == [2, 2]
    manager.free(b)  # aborted
    assert [pool.ref_counts[x] for x in own] == [0]
    manager.free(a)
    assert all(count == 0 for count in pool.ref_counts) and pool.num_free == 8
    assert manager.cached_prefix(seq([*range(8), 9], "later")).block_ids == shared


def test_idle_cached_hits_count_against_the_free_blocks() -> None:
    manager = KVCacheManager(BlockPool(4), BS)
    manager.free(computed(manager, list(range(8))))  # 2 cached blocks, idle: all 4 free
    prefix = manager.cached_prefix(seq([*range(8), 8]))
    assert len(prefix.block_ids) == 2
    # Taking the 2 hits un-frees them, so only 2 new blocks remain: 16 tokens fit, 17 do not.
    assert manager.can_allocate(prefix, 16)
    assert not manager.can_allocate(prefix, 17)


def test_a_sequence_grows_by_a_block_only_at_a_block_boundary() -> None:
    manager = KVCacheManager(BlockPool(3), BS)
    s = computed(manager, [1, 2, 3, 4])
    blocks = s.block_ids
    assert manager.grow(s, 4) and len(s.block_ids) == 1
    assert manager.grow(s, 5) and len(s.block_ids) == 2
    assert manager.grow(s, 8) and len(s.block_ids) == 2
    assert manager.grow(s, 12) and len(s.block_ids) == 3
    assert not manager.grow(s, 13) and len(s.block_ids) == 3  # the pool is empty
    assert s.block_ids is blocks  # grown in place, as the block-table mirror expects


def test_only_full_blocks_are_published() -> None:
    pool = BlockPool(8)
    manager = KVCacheManager(pool, BS, hash_seed=5)
    tokens = list(range(100, 110))
    s = seq(tokens)
    manager.allocate(s, manager.cached_prefix(s), len(tokens))
    expected = hash_full_blocks(tokens, BS, seed=5)
    manager.publish(s, 0, 6)  # one block full, the second half computed
    assert pool.take_events() == [KvEvent(True, expected[0])]
    manager.publish(s, 6, 10)  # the second block full, the third partial
    assert pool.take_events() == [KvEvent(True, expected[1])]
    assert pool.cached == {expected[0]: s.block_ids[0], expected[1]: s.block_ids[1]}


def test_idle_cached_blocks_are_evicted_least_recently_freed_first() -> None:
    pool = BlockPool(4)
    manager = KVCacheManager(pool, BS)
    a = computed(manager, list(range(8)), "a")
    b = computed(manager, list(range(50, 58)), "b")
    hashes_a, b_blocks = a.block_hashes, b.block_ids
    manager.free(a)
    manager.free(b)
    pool.take_events()
    # Three new blocks: a's go first, its tail before its head, then b's tail.
    c = seq(list(range(200, 212)), "c")
    manager.allocate(c, manager.cached_prefix(c), 12)
    assert pool.take_events() == [KvEvent(False, hashes_a[1]), KvEvent(False, hashes_a[0]),
                                  KvEvent(False, b.block_hashes[1])]
    assert manager.cached_prefix(seq([*range(50, 58), 0], "b2")).block_ids == b_blocks[:1]
    assert manager.cached_prefix(seq([*range(8), 0], "a2")).num_tokens == 0


def test_samples_share_the_computed_prompt_blocks_by_reference_count() -> None:
    pool = BlockPool(8)
    manager = KVCacheManager(pool, BS, caching=False)  # sharing needs no prefix cache
    first = computed(manager, list(range(10)), "first")  # 2 full blocks, then a partial one
    assert manager.cached_prefix(seq(list(range(10)), "stranger")).num_tokens == 0
    others = []
    for name in ("second", "third"):
        sample = seq(list(range(10)), name)
        prefix = manager.shared_prompt(first)
        assert prefix.block_ids == first.block_ids[:2] and prefix.num_tokens == 8
        assert manager.can_allocate(prefix, sample.num_tokens)
        manager.allocate(sample, prefix, sample.num_tokens)
        others.append(sample)
    shared = first.block_ids[:2]
    assert [pool.ref_counts[b] for b in shared] == [3, 3]
    # Each sample has its own last block, for the tokens it computes and draws itself.
    tails = {s.block_ids[2] for s in [first, *others]}
    assert len(tails) == 3 and pool.num_free == 8 - 5
    manager.free(first)  # the first sample preempted or done: the others keep the prompt
    assert [pool.ref_counts[b] for b in shared] == [2, 2]
    for sample in others:
        manager.free(sample)
    assert all(count == 0 for count in pool.ref_counts) and pool.num_free == 8


def test_a_prompt_within_one_block_shares_nothing() -> None:
    manager = KVCacheManager(BlockPool(4), BS)
    first = computed(manager, [1, 2, 3, 4])  # one full block, but its last token is computed
    assert manager.shared_prompt(first).block_ids == []
