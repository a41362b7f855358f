"""Continuous batching: which sequences run this step, with how many tokens, and who gives way."""

import bisect
from dataclasses import dataclass, field

from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.block_pool import BlockPool
from llmserve.engine_service.core.kv_cache_manager import KVCacheManager
from llmserve.engine_service.core.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `seq` starting at position `start` are computed this step; the
    last `len(draft)` of them are speculative, proposed past the sequence's end (its tokens
    do not hold them) for this step to verify."""

    seq: Sequence
    start: int
    num_tokens: int
    draft: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's end, so its last logits pick a token
        (with a draft, its last 1 + len(draft) logits each pick one)."""
        seq = self.seq  # num_tokens inlined: this runs for every chunk, several times a step
        return (self.start + self.num_tokens
                == len(seq.token_ids) + seq.num_pending_tokens + len(self.draft))

    @property
    def prompt_logprobs(self) -> int | None:
        """Alternatives per prompt token this chunk scores; None when it scores none."""
        seq = self.seq
        if seq.prompt_logprobs is None or self.start >= seq.num_prompt_tokens - 1:
            return None
        return seq.sampling.prompt_logprobs


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Planned beside a step in flight and stopped where it would have preempted.
    stalled: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Plans each step under a token budget and a sequence cap, most important work first.

    Sequences are considered in (priority class, arrival) order, running and waiting alike, so a
    more important arrival gets budget before less important decodes. Long prompts are chunked.
    When blocks or sequence slots run out, work later in that order gives way (see
    `_preempt_for`) and is recomputed later; the prefix cache usually keeps its blocks. The
    blocks themselves are the KV cache manager's business.
    """

    def __init__(self, config: EngineConfig, pool: BlockPool) -> None:
        """Plans steps under `config`'s per-step limits, in blocks of its block size."""
        self.config = config
        self.kv_cache = KVCacheManager(pool, config.block_size, config.block_hash_seed,
                                       config.prefix_caching)
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
        self.kv_cache.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self, step_in_flight: bool = False) -> SchedulerOutput:
        """Plans the next step. Beside a `step_in_flight` nothing is preempted: the plan stops
        at the first sequence that would need a preemption, and says so in `stalled`."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        admitting = True
        for seq in sorted(self.running + self.waiting, key=lambda s: s.order):
            if budget == 0:
                break
            if seq in out.preempted or seq.final_token_pending:
                continue
            if seq.status is SequenceStatus.RUNNING:
                chunk = self._schedule_running(seq, budget, out, step_in_flight)
            elif admitting:
                if self._awaits_prompt(seq):
                    continue
                chunk = self._admit(seq, budget, out, step_in_flight)
                admitting = chunk is not None
            else:
                continue
            if out.stalled:
                break
            if chunk is not None:
                out.chunks.append(chunk)
                budget -= chunk.num_tokens
        return out

    def _schedule_running(self, seq: Sequence, budget: int, out: SchedulerOutput,
                          step_in_flight: bool) -> ScheduledChunk | None:
        num_tokens = min(seq.num_uncomputed_tokens, budget)
        while not self.kv_cache.grow(seq, seq.num_computed_tokens + num_tokens):
            if not self._preempt_for(seq, out, step_in_flight):
                return None
            if seq.status is not SequenceStatus.RUNNING:
                return None  # it was the last in order: it gave way itself
        return ScheduledChunk(seq, seq.num_computed_tokens, num_tokens)

    def _admit(self, seq: Sequence, budget: int, out: SchedulerOutput,
               step_in_flight: bool) -> ScheduledChunk | None:
        source = self._prompt_source(seq)
        prefix = (self.kv_cache.cached_prefix(seq) if source is None
                  else self.kv_cache.shared_prompt(source))
        num_tokens = min(seq.num_tokens - prefix.num_tokens, budget)
        total = prefix.num_tokens + num_tokens
        while not (len(self.running) < self.config.max_num_seqs
                   and self.kv_cache.can_allocate(prefix, total)):
            if not self._preempt_for(seq, out, step_in_flight):
                return None
        self.kv_cache.allocate(seq, prefix, total)
        seq.num_computed_tokens = prefix.num_tokens
        if seq.num_preemptions == 0:
            seq.num_cached_prompt_tokens = min(prefix.num_tokens, seq.num_prompt_tokens)
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SequenceStatus.RUNNING
        return ScheduledChunk(seq, prefix.num_tokens, num_tokens)

    @staticmethod
    def _prompt_source(seq: Sequence) -> Sequence | None:
        """Another sample of `seq`'s request that holds the computed prompt's blocks, if any."""
        for other in seq.samples:
            if (other is not seq and other.status is SequenceStatus.RUNNING
                    and other.num_computed_tokens >= other.num_prompt_tokens):
                return other
        return None

    def _awaits_prompt(self, seq: Sequence) -> bool:
        """A later sample of a request is not admitted while the first computes the prompt it
        will share (unless another sample holds it already). Once the first has ended, it is
        admitted as any sequence."""
        first = seq.samples[0]
        return (first is not seq and first.status is not SequenceStatus.FINISHED
                and self._prompt_source(seq) is None)

    def _preempt_for(self, seq: Sequence, out: SchedulerOutput, step_in_flight: bool) -> bool:
        """The preemption rule: makes room for `seq` by preempting one running sequence, and
        says whether it did.

        The victim is the running sequence last in scheduling order, if that is after `seq`
        (or `seq` itself, which then gives way to the work before it): work only ever gives
        way to work before it, of a more important class or, within a class, arrived earlier.

        Beside a step in flight nothing is preempted, since that step's sequences must keep
        their blocks: where it would preempt, the plan is marked `stalled` instead, and the
        caller plans again once that step is done.
        """
        victim = max(self.running, key=lambda s: s.order, default=None)
        if victim is None or victim.order < seq.order:
            return False
        if step_in_flight:
            out.stalled = True
            return False
        self.running.remove(victim)
        self.kv_cache.free(victim)
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        victim.status = SequenceStatus.WAITING
        self.add(victim)
        self.num_preemptions += 1
        out.preempted.append(victim)
        return True

    def commit(self, chunk: ScheduledChunk) -> None:
        """Records that a chunk was computed and publishes the blocks it filled."""
        self.advance(chunk)
        self.kv_cache.publish(chunk.seq, chunk.start, chunk.start + chunk.num_tokens)

    @staticmethod
    def advance(chunk: ScheduledChunk) -> None:
        """Counts the chunk computed (when it is launched: the next step may follow it)."""
        chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens

    def finish(self, seq: Sequence) -> None:
        """Removes a finished sequence and releases its blocks (cached ones stay findable)."""
        self.running.remove(seq)
        self.kv_cache.free(seq)
        seq.status = SequenceStatus.FINISHED
