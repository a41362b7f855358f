"""Draft-model proposals: a small model of the same vocabulary guesses the next k tokens greedily.

The draft model keeps its KV in its own pool of as many blocks as the target's, under the same
block ids: a sequence's block table serves both models, so the draft needs no allocator of its
own, and the blocks a sequence frees or shares free or share both. What the draft has computed
of a sequence is tracked here. It catches up lazily: before proposing, one pass computes the
sequence's tokens it has not seen (its whole prompt the first time; the token the target picked
after a rejected draft, or the last draft token and the bonus after an accepted one), and its
logits give the first guess; k - 1 greedy decode passes follow in one graph replay
(`ModelRunner.decode_greedy`), each guess fed back on the device.
Its KV at a draft position stays valid only if the target kept that token, which the next
proposal checks against the sequence's tokens.

Blocks shared through the prefix cache hold the target's KV of their tokens, not necessarily
the draft's: a sequence admitted onto them has its draft compute them again (writing the same
values). That costs a draft prefill, never correctness, since the target verifies every guess.
"""

from dataclasses import dataclass, field

import torch

from llmserve.engine_service.core.sequence import Sequence
from llmserve.engine_service.core.speculator import Drafts
from llmserve.engine_service.runner.model_runner import ModelRunner
from llmserve.engine_service.runner.step_inputs import upload


@dataclass(eq=False)
class _DraftView:
    """A sequence as the draft's catch-up sees it (its guesses are made past it, on the
    device)."""

    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_pending_tokens: int = 0


@dataclass(eq=False)
class _DraftChunk:
    seq: _DraftView
    start: int
    num_tokens: int
    draft: list[int] = field(default_factory=list)
    prompt_logprobs: None = None

    @property
    def samples(self) -> bool:
        return self.start + self.num_tokens == len(self.seq.token_ids)


@dataclass
class _Proposed:
    """What the draft computed of a sequence after its last proposal."""

    num_computed: int  # positions with the draft's KV, if the target kept the guesses
    first: int  # where the guesses start in the sequence
    accepted: int = 0  # guesses the target kept (told by `verified`)


class DraftProposer:
    """Proposes with a draft model's runner (its KV pool allocated with the target's block
    count); greedy guesses, left on the device for the verifying step."""

    def __init__(self, runner: ModelRunner, guess_cost: float = 0.0) -> None:
        """`guess_cost`: one draft pass's cost relative to the target's step (0: drafts always
        as long as asked)."""
        self.runner, self.guess_cost = runner, guess_cost
        self.max_tokens = runner.inputs.max_tokens  # a pass's token budget
        self._proposed: dict[Sequence, _Proposed] = {}

    def forget(self, seq: Sequence) -> None:
        self._proposed.pop(seq, None)

    def verified(self, seq: Sequence, accepted: int) -> None:
        proposed = self._proposed.get(seq)
        if proposed is not None:
            proposed.accepted = accepted

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Drafts:
        lengths = [0] * len(seqs)
        views: list[_DraftView] = []
        rows: list[int] = []  # the sequence of each view (each view guesses)
        catch_up, budget = [], self.max_tokens
        for i, seq in enumerate(seqs):
            start = self._num_valid(seq)
            count = min(len(seq.token_ids) - start, budget)
            if count <= 0:
                continue
            budget -= count
            view = _DraftView(seq.token_ids, seq.num_prompt_tokens, seq.block_ids)
            chunk = _DraftChunk(view, start, count)
            catch_up.append(chunk)
            if chunk.samples:  # caught up: it can guess (its logits row is the next one)
                views.append(view)
                rows.append(i)
            else:
                self._proposed[seq] = _Proposed(start + count, len(seq.token_ids))
        if not catch_up:
            return Drafts(lengths, values=[[] for _ in seqs])
        # Run even when no sequence caught up enough to guess: `_proposed` counts it computed.
        logits, _ = self.runner.execute(catch_up)
        if not views:
            return Drafts(lengths, values=[[] for _ in seqs])
        wanted = [ks[i] for i in rows]
        guesses = self.runner.decode_greedy(logits.argmax(dim=-1), views, wanted)
        if len(rows) < len(seqs):
            tokens = torch.zeros(len(seqs), guesses.shape[1], dtype=guesses.dtype,
                                 device=guesses.device)
            # Pinned and non-blocking: a pageable copy would wait for the passes just launched.
            tokens[upload(rows, torch.int64, guesses.device)] = guesses
        else:
            tokens = guesses
        for i in rows:
            seq = seqs[i]
            lengths[i] = ks[i]
            # The catch-up computed up to the last known token, each later pass one guess.
            self._proposed[seq] = _Proposed(len(seq.token_ids) + ks[i] - 1, len(seq.token_ids))
        return Drafts(lengths, tokens=tokens)

    def _num_valid(self, seq: Sequence) -> int:
        """Positions of `seq` whose draft KV holds its tokens: up to what the draft computed,
        cut after the guesses the target kept."""
        proposed = self._proposed.get(seq)
        if proposed is None:
            return 0
        return min(proposed.num_computed, proposed.first + proposed.accepted,
                   len(seq.token_ids) - 1)
