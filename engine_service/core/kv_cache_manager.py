"""The KV cache as the scheduler asks for it: blocks for a sequence, found, grown, freed, published.

The scheduler decides who runs and who gives way; this decides nothing but does all the block
work: hashing a sequence's full blocks, finding its cached prefix, counting and taking blocks,
and registering computed full blocks so later sequences find them (nano-vllm's BlockManager,
vLLM v1's KVCacheManager).
"""

from dataclasses import dataclass

from llmserve.common.block_hash import hash_full_blocks
from llmserve.engine_service.core.block_pool import BlockPool
from llmserve.engine_service.core.sequence import Sequence


@dataclass(frozen=True)
class CachedPrefix:
    """Cached blocks that already hold a sequence's first `num_tokens` tokens."""

    block_ids: list[int]
    num_tokens: int


class KVCacheManager:
    """Gives sequences blocks of `block_size` tokens from `pool`, sharing cached full blocks.

    A sequence's `block_ids` only grow in place or are replaced by a new list (what the
    runner's block-table mirror relies on).
    """

    def __init__(self, pool: BlockPool, block_size: int, hash_seed: int = 0,
                 caching: bool = True) -> None:
        """`caching=False`: no prefix cache; blocks are shared only between the samples of a
        request (`shared_prompt`)."""
        self.pool = pool
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.caching = caching

    def cached_prefix(self, seq: Sequence) -> CachedPrefix:
        """The longest run of `seq`'s leading full blocks in the cache, short of its last token:
        at least one token is always computed, as its logits choose the next token. Empty for a
        sequence that still wants its prompt logprobs: they need every position computed."""
        if seq.prompt_logprobs is not None or not self.caching:
            return CachedPrefix([], 0)
        bs = self.block_size
        seq.block_hashes = hash_full_blocks(seq.token_ids, bs, self.hash_seed, seq.block_hashes)
        hits = self.pool.lookup(seq.block_hashes[: (seq.num_tokens - 1) // bs])
        return CachedPrefix(hits, len(hits) * bs)

    def shared_prompt(self, source: Sequence) -> CachedPrefix:
        """The blocks of `source`'s computed prompt that another sample of the same prompt
        shares (`allocate` takes a reference on each): its full blocks short of the last token,
        so the sample still computes one token or more, whose logits draw its first token."""
        num_blocks = (source.num_prompt_tokens - 1) // self.block_size
        return CachedPrefix(source.block_ids[:num_blocks], num_blocks * self.block_size)

    def can_allocate(self, prefix: CachedPrefix, num_tokens: int) -> bool:
        """Whether a sequence reusing `prefix` can hold `num_tokens` tokens (the prefix's
        included). Idle cached hits count against the free blocks: taking them un-frees them."""
        idle_hits = sum(1 for b in prefix.block_ids if self.pool.ref_counts[b] == 0)
        num_new = -(-num_tokens // self.block_size) - len(prefix.block_ids)
        return num_new <= self.pool.num_free - idle_hits

    def allocate(self, seq: Sequence, prefix: CachedPrefix, num_tokens: int) -> None:
        """Gives `seq`, which holds no blocks, the prefix's blocks and new ones up to
        `num_tokens` tokens (check `can_allocate` first)."""
        self.pool.acquire(prefix.block_ids)
        num_new = -(-num_tokens // self.block_size) - len(prefix.block_ids)
        new_blocks = self.pool.allocate(num_new)
        assert new_blocks is not None, "allocate without can_allocate"
        seq.block_ids = prefix.block_ids + new_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Gives `seq` enough blocks to hold `num_tokens` tokens; False if the pool is short."""
        missing = -(-num_tokens // self.block_size) - len(seq.block_ids)
        if missing <= 0:
            return True
        blocks = self.pool.allocate(missing)
        if blocks is None:
            return False
        seq.block_ids.extend(blocks)
        return True

    def free(self, seq: Sequence) -> None:
        """Lets go of `seq`'s blocks; published ones stay findable until evicted."""
        self.pool.release(seq.block_ids)
        seq.block_ids = []

    def publish(self, seq: Sequence, start: int, end: int) -> None:
        """Registers the full blocks that computing tokens [start, end) of `seq` completed (call
        once those tokens' values are all known): later sequences with the same prefix reuse
        them, and the pool reports them as KV events."""
        if not self.caching:
            return
        bs = self.block_size
        num_full = end // bs
        if num_full > len(seq.block_hashes):
            seq.block_hashes = hash_full_blocks(
                seq.token_ids[: num_full * bs], bs, self.hash_seed, seq.block_hashes
            )
        for index in range(start // bs, num_full):
            self.pool.register(seq.block_ids[index], seq.block_hashes[index])
