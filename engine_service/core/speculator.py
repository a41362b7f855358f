"""Speculative decoding in the core: which sequences carry a draft into a step, and how much of
a verified draft they keep.

A proposer guesses up to k tokens past a sequence's end; the step computes them after the
sequence's last token, and its logits at each of those 1 + k positions pick the target's own
next token there with the sampler's usual keyed draw (greedy, or random keyed on the request's
seed and the position). The sequence keeps the draft's tokens while they equal those picks, then
the first pick that differs (or the pick after a wholly accepted draft). Every kept token is the
one the target alone would have drawn at its position, so the output is that of plain decoding,
token for token, greedy or seeded; for a draft that is a fixed guess, this is rejection sampling
with a one-point proposal: a guess is kept with the target's probability of it, and a rejected
position draws from the target's distribution without it.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from llmserve.engine_service.config import EngineConfig
from llmserve.engine_service.core.draft_length import best_length, keep_rate
from llmserve.engine_service.core.scheduler import ScheduledChunk, Scheduler
from llmserve.engine_service.core.sequence import Sequence
from llmserve.engine_service.runner.model_runner import DeviceDrafts


@dataclass
class Drafts:
    """A proposer's guesses, lengths[i] for the i-th sequence asked: known on the host
    (`values`), or still on the device (`tokens` [n, max length]: the verifying step reads them
    there, and the host reads them with its picks, so no sync comes between the two)."""

    lengths: list[int]
    values: list[list[int]] | None = None
    tokens: torch.Tensor | None = None


@dataclass
class _Ahead:
    """Drafts proposed before the step that verifies them was planned (`propose_ahead`), for
    these sequences at these lengths."""

    seqs: list[Sequence]
    ks: list[int]
    num_tokens: list[int]
    drafts: Drafts


class Proposer(Protocol):
    # One guess's cost relative to the verifying step (0: none worth counting); drafts are as
    # long as pays for each sequence (`draft_length`).
    guess_cost: float

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Drafts:
        """Up to ks[i] tokens to follow each sequence's tokens (all known: none pending)."""

    def verified(self, seq: Sequence, accepted: int) -> None:
        """The sequence kept the first `accepted` tokens of its last draft."""

    def forget(self, seq: Sequence) -> None:
        """The sequence lost its KV blocks (preempted) or ended."""


def num_accepted(draft: list[int], picks: list[int]) -> int:
    """How many of the draft's tokens lead the target's picks (len(picks) = len(draft) + 1)."""
    for i, token in enumerate(draft):
        if picks[i] != token:
            return i
    return len(draft)


class Speculator:
    """Gives eligible sampling chunks a draft, within the step's token budget and the KV pool."""

    def __init__(self, config: EngineConfig, proposer: Proposer) -> None:
        assert config.max_model_len is not None
        self.config, self.proposer = config, proposer
        self.max_model_len = config.max_model_len
        self._ahead: _Ahead | None = None

    def speculates(self, seq: Sequence) -> bool:
        """Whether the sequence takes drafts at all (unless it asks for none). With a grammar,
        its matcher checks the draft, runs ahead through it for the masks and rolls back (see
        sampling_rows); with penalties, each verifying row counts the draft tokens before it
        (see LogitsProcessing.rounds)."""
        return seq.sampling.speculative_tokens != 0

    def active(self, scheduler: Scheduler) -> bool:
        """Speculation pays in small batches only (`--speculative-disable-batch-size`)."""
        return len(scheduler.running) <= self.config.speculation_batch_limit

    def wants_sync(self, chunks: list[ScheduledChunk], scheduler: Scheduler) -> bool:
        """Whether the next step may give one of these chunks' sequences a draft, which needs
        every token read first (no step may stay in flight)."""
        return self.active(scheduler) and any(self.speculates(c.seq) for c in chunks)

    def forget(self, seq: Sequence) -> None:
        """The sequence ended or lost its KV blocks: its proposer state goes, and any drafts
        proposed ahead with it."""
        self.proposer.forget(seq)
        if self._ahead is not None and any(s is seq for s in self._ahead.seqs):
            self._ahead = None

    def propose_ahead(self, seqs: list[Sequence], scheduler: Scheduler) -> None:
        """After a step whose every token was read: proposes the next drafts of `seqs` now, each
        as if its next step were one decode token, so a draft model runs on the device while the
        host streams this step's outputs and plans the next. `attach_drafts` takes them if the
        next step is that step."""
        self._ahead = None
        if not seqs or not self.active(scheduler):
            return
        chunks = [ScheduledChunk(seq, seq.num_tokens - 1, 1) for seq in seqs]
        wanted = self._wanted(chunks, scheduler)
        if wanted:
            seqs = [chunks[r].seq for r, _ in wanted]
            ks = [k for _, k in wanted]
            self._ahead = _Ahead(seqs, ks, [s.num_tokens for s in seqs],
                                 self.proposer.propose(seqs, ks))

    def attach_drafts(self, chunks: list[ScheduledChunk], scheduler: Scheduler
                      ) -> DeviceDrafts | None:
        """Proposes for each eligible chunk and appends its draft to it: the chunk then computes
        the draft's tokens too. A draft never preempts anything: one the pool or the step's
        token budget has no room for is cut or left out. Guesses still on the device come back
        as the step's `DeviceDrafts` (their chunks hold stand-ins until `read_drafts`)."""
        ahead, self._ahead = self._ahead, None
        if not self.active(scheduler):
            return None
        wanted = self._wanted(chunks, scheduler)
        if not wanted:
            return None
        seqs, ks = [chunks[r].seq for r, _ in wanted], [k for _, k in wanted]
        # A Sequence has no __eq__: list equality compares them by identity.
        if (ahead is not None and ahead.ks == ks and ahead.seqs == seqs
                and ahead.num_tokens == [s.num_tokens for s in seqs]
                and all(chunks[r].num_tokens == 1 for r, _ in wanted)):
            drafts = ahead.drafts
        else:
            drafts = self.proposer.propose(seqs, ks)
        lengths = [min(n, k) for n, (_, k) in zip(drafts.lengths, wanted, strict=True)]
        values = drafts.values
        if values is None and any(chunks[r].seq.grammar is not None
                                  or chunks[r].seq.sampling.keeps_token_state for r, _ in wanted):
            assert drafts.tokens is not None
            # A grammar checks the guesses on the host, and penalties count them from there.
            values = drafts.tokens.tolist()
        for i, ((r, _), n) in enumerate(zip(wanted, lengths, strict=True)):
            chunk = chunks[r]
            draft = values[i][:n] if values is not None else [-1] * n
            if chunk.seq.grammar is not None:
                # Guesses past the first the constraint refuses could never be kept.
                lengths[i] = n = chunk.seq.grammar.validate_tokens(draft)
                draft = draft[:n]
            chunk.draft = draft
            chunk.num_tokens += n
        if drafts.tokens is None:
            return None
        return DeviceDrafts(drafts.tokens, [r for r, _ in wanted], lengths)

    def _wanted(self, chunks: list[ScheduledChunk], scheduler: Scheduler
                ) -> list[tuple[int, int]]:
        """(chunk index, most draft tokens) of the chunks that take a draft, with the KV slots
        for it grown (a draft model writes them while proposing)."""
        budget = self.config.max_num_batched_tokens - sum(c.num_tokens for c in chunks)
        wanted: list[tuple[int, int]] = []
        for r, chunk in enumerate(chunks):
            k = min(self._num_draft_tokens(chunk), budget)
            if k > 0 and scheduler.kv_cache.grow(chunk.seq, chunk.start + chunk.num_tokens + k):
                wanted.append((r, k))
                budget -= k
        return wanted

    @staticmethod
    def read_drafts(chunks: list[ScheduledChunk], drafts: DeviceDrafts) -> None:
        """Fills in the drafts' tokens from the device (after the step that verified them)."""
        for r, n, values in zip(drafts.rows, drafts.lengths, drafts.tokens.tolist(),
                                strict=True):
            chunks[r].draft[:] = values[:n]

    def _num_draft_tokens(self, chunk: ScheduledChunk) -> int:
        seq = chunk.seq
        if (seq.num_pending_tokens or not chunk.samples or chunk.prompt_logprobs is not None
                or not self.speculates(seq)):
            return 0
        k = self.config.num_speculative_tokens
        if seq.sampling.speculative_tokens is not None:
            k = min(k, seq.sampling.speculative_tokens)
        if self.proposer.guess_cost > 0:
            rate = keep_rate(seq.num_spec_accepted, seq.num_spec_missed)
            k = best_length(rate, k, self.proposer.guess_cost)
        # The step's last pick is a token too: a draft ends one short of the sequence's limit.
        room = min(seq.sampling.max_tokens - seq.num_output_tokens,
                   self.max_model_len - seq.num_tokens) - 1
        return max(0, min(k, room))
