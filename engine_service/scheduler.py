"""Continuous batching: which sequences run this step, with how many tokens, in which KV blocks."""

import bisect
from dataclasses import dataclass, field

from llmserve.common.block_hash import hash_full_blocks
from llmserve.engine_service.block_pool import BlockPool
from llmserve.engine_service.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits and the KV-block geometry."""

    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    max_model_len: int
    block_hash_seed: int = 0


@dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `seq` starting at position `start` are computed this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's end, so its last logits pick a token."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Planned without preemption and stopped where it would have preempted.
    stalled: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Plans each step under a token budget and a sequence cap, most important work first.

    Sequences are considered in (priority class, arrival) order, running and waiting alike, so a
    more important arrival gets budget before less important decodes. Long prompts are chunked.
    When blocks or sequence slots run out, the least important, latest-arrived running sequence is
    preempted (its blocks released; the prefix cache usually keeps them) and recomputed later.
    """

    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.order)

    def abort(self, seq: Sequence) -> None:
        """Drops a sequence wherever it is and frees its blocks at once."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self, preempt: bool = True) -> SchedulerOutput:
        """Plans the next step. With `preempt` off (a step beside one still in flight, whose
        sequences must keep their blocks) the plan stops at the first sequence that would
        need a preemption, and says so in `stalled`."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        admitting = True
        for seq in sorted(self.running + self.waiting, key=lambda s: s.order):
            if budget == 0:
                break
            if seq in out.preempted or seq.last_token_pending:
                continue
            if seq.status is SequenceStatus.RUNNING:
                chunk = self._schedule_running(seq, budget, out, preempt)
            elif admitting:
                chunk = self._admit(seq, budget, out, preempt)
                admitting = chunk is not None
            else:
                continue
            if out.stalled:
                break
            if chunk is not None:
                out.chunks.append(chunk)
                budget -= chunk.num_tokens
        return out

    def _schedule_running(
        self, seq: Sequence, budget: int, out: SchedulerOutput, preempt: bool
    ) -> ScheduledChunk | None:
        num_tokens = min(seq.num_uncomputed_tokens, budget)
        while not self._grow(seq, seq.num_computed_tokens + num_tokens):
            if not preempt:
                out.stalled = True
                return None
            victim = max(self.running, key=lambda s: s.order)
            self._preempt(victim, out)
            if victim is seq:
                return None
        return ScheduledChunk(seq, seq.num_computed_tokens, num_tokens)

    def _admit(self, seq: Sequence, budget: int, out: SchedulerOutput,
               preempt: bool) -> ScheduledChunk | None:
        bs = self.config.block_size
        seq.block_hashes = hash_full_blocks(
            seq.token_ids, bs, self.config.block_hash_seed, seq.block_hashes
        )
        # At least one token is always computed: its logits choose the next token.
        hits = self.pool.lookup(seq.block_hashes[: (seq.num_tokens - 1) // bs])
        num_cached = len(hits) * bs
        num_tokens = min(seq.num_tokens - num_cached, budget)
        num_new_blocks = -(-(num_cached + num_tokens) // bs) - len(hits)
        while True:
            idle_hits = sum(1 for b in hits if self.pool.ref_counts[b] == 0)
            fits = num_new_blocks <= self.pool.num_free - idle_hits
            if fits and len(self.running) < self.config.max_num_seqs:
                break
            victims = [s for s in self.running if s.priority > seq.priority]
            if not victims:
                return None
            if not preempt:
                out.stalled = True
                return None
            self._preempt(max(victims, key=lambda s: s.order), out)
        self.pool.acquire(hits)
        new_blocks = self.pool.allocate(num_new_blocks)
        assert new_blocks is not None
        seq.block_ids = hits + new_blocks
        seq.num_computed_tokens = num_cached
        if seq.num_preemptions == 0:
            seq.num_cached_prompt_tokens = min(num_cached, seq.num_prompt_tokens)
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SequenceStatus.RUNNING
        return ScheduledChunk(seq, num_cached, num_tokens)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Gives `seq` enough blocks to hold `num_tokens` tokens; False if the pool is short."""
        missing = -(-num_tokens // self.config.block_size) - len(seq.block_ids)
        if missing <= 0:
            return True
        blocks = self.pool.allocate(missing)
        if blocks is None:
            return False
        seq.block_ids.extend(blocks)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.add(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.block_ids)
        seq.block_ids = []

    def commit(self, chunk: ScheduledChunk) -> None:
        """Records that a chunk was computed and publishes the blocks it filled."""
        self.advance(chunk)
        self.register(chunk)

    @staticmethod
    def advance(chunk: ScheduledChunk) -> None:
        """Counts the chunk computed (when it is launched: the next step may follow it)."""
        chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens

    def register(self, chunk: ScheduledChunk) -> None:
        """Publishes the blocks the chunk filled (once its tokens' values are all known)."""
        seq = chunk.seq
        bs = self.config.block_size
        num_full = (chunk.start + chunk.num_tokens) // bs
        if num_full > len(seq.block_hashes):
            seq.block_hashes = hash_full_blocks(
                seq.token_ids[: num_full * bs], bs, self.config.block_hash_seed, seq.block_hashes
            )
        for index in range(chunk.start // bs, num_full):
            self.pool.register(seq.block_ids[index], seq.block_hashes[index])

    def finish(self, seq: Sequence) -> None:
        """Removes a finished sequence and releases its blocks (cached ones stay findable)."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
