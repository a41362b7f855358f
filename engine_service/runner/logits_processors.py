"""min_tokens, logit_bias and the three penalties: what changes a row's logits before it is drawn.

Applied in vLLM's order, to the rows that ask and before temperature and the top-k/top-p/min-p
filters: min_tokens sets the end-of-sequence tokens (unless ignore_eos) and the stop token ids
to -inf while the output is shorter than min_tokens; logit_bias is added; then the repetition
penalty (over prompt and output: a positive logit is divided by it, a negative one multiplied),
the frequency penalty (times the count in the output) and the presence penalty (once if the
output holds the token) in one fused pass (kernels/penalties.py). The sampler draws from an fp32
copy: the logits it was given (and the log-probabilities read from them) stay the model's own.

Where the counts live: a request with a penalty or a logit bias holds a slot of `TokenState` on
the device while it runs: a row of a packed int32 count table [slots, vocab] (output count, and
a bit for "in the prompt"), its three penalties, and its bias as (id, value) rows. The slot is
filled once from the sequence's tokens when it is first sampled (after a preemption too, since
its recompute rebuilds the same counts from the same tokens; a failed-over request's resumed
output counts as output), then each step's drawn tokens are
added by one scatter on the device: a token still pending under async scheduling counts before
the host has read it. So a step costs the host a list of slots, not the sequences' tokens, and
the device one pass over the penalized rows. Slots are given back when the request finishes, is
aborted or preempted; the table grows by doubling as more requests hold one at a time (at most
max_num_seqs rows: 256 x 151,936 x 4 bytes = 155 MB, which the KV cache sizing reserves).

Speculative decoding's verifying rows: the row after j draft tokens is processed as if they were
output already (each round of rows adds the drafts' next token to their slots, and the step takes
them out again), and a draft's rows are left out of the step's record: its kept tokens are
counted once the host has read which they are (`record_kept`).

A batch where no row asks builds nothing here: `SamplingOptions.processes_logits` tells.
"""

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from llmserve.engine_service.runner.step_inputs import upload
from llmserve.engine_service.seam import SamplingOptions
from llmserve.kernels.penalties import PROMPT_BIT, apply_penalties, apply_penalties_torch

MIN_SLOTS = 8


class TokenSequence(Hashable, Protocol):
    """What the processors read of a running sequence (core's `Sequence`)."""

    sampling: SamplingOptions
    token_ids: list[int]  # prompt + the output tokens the host has read
    num_prompt_tokens: int
    num_resumed_output_tokens: int  # the prompt's last ones, output before a failover
    num_pending_tokens: int

    @property
    def num_tokens(self) -> int: ...


class TokenState:
    """The device-side slots of the requests that keep token counts and a logit bias."""

    def __init__(self, vocab_size: int, device: torch.device, max_slots: int | None = None
                 ) -> None:
        """`max_slots`: the most sequences that hold a slot at once (max_num_seqs; None =
        unbounded), where the table stops doubling."""
        self.vocab_size, self.device, self.max_slots = vocab_size, device, max_slots
        self.capacity = 0
        self.bias_width = 0
        # Allocated on first use: [capacity, vocab] packed counts (kernels/penalties.py),
        # [capacity, 3] (presence, frequency, repetition), [capacity, bias_width] bias rows
        # (unused entries add 0.0 to token 0).
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self.params = torch.zeros(0, 3, dtype=torch.float32, device=device)
        self.bias_ids = torch.zeros(0, 0, dtype=torch.int64, device=device)
        self.bias_values = torch.zeros(0, 0, dtype=torch.float32, device=device)
        self._slots: dict[Hashable, int] = {}
        self._free: list[int] = []

    @property
    def num_held(self) -> int:
        return len(self._slots)

    def reserve(self, capacity: int, bias_width: int = 0) -> None:
        """Grows the tables to at least `capacity` slots and `bias_width` bias entries."""
        capacity = max(capacity, self.capacity)
        bias_width = max(bias_width, self.bias_width)
        if capacity == self.capacity and bias_width == self.bias_width:
            return

        def grown(old: torch.Tensor, cols: int) -> torch.Tensor:
            new = torch.zeros(capacity, cols, dtype=old.dtype, device=self.device)
            new[: old.shape[0], : old.shape[1]] = old
            return new

        self.counts = grown(self.counts, self.vocab_size)
        self.params = grown(self.params, 3)
        self.bias_ids = grown(self.bias_ids, bias_width)
        self.bias_values = grown(self.bias_values, bias_width)
        self._free.extend(range(capacity - 1, self.capacity - 1, -1))
        self.capacity, self.bias_width = capacity, bias_width

    def slot(self, seq: TokenSequence) -> int:
        """The sequence's slot, filled from its tokens if it has none yet."""
        slot = self._slots.get(seq)
        return slot if slot is not None else self._assign(seq)

    def held(self, seq: Hashable) -> int | None:
        """The sequence's slot, if it holds one."""
        return self._slots.get(seq)

    def release(self, seq: Hashable) -> None:
        """Gives the sequence's slot back (if it holds one). Work already queued on the device
        for it runs before the slot's next fill, which is queued after it."""
        slot = self._slots.pop(seq, None)
        if slot is not None:
            self._free.append(slot)

    def _assign(self, seq: TokenSequence) -> int:
        # Filled from token_ids, so every token must be known: a sequence is first sampled (or
        # sampled again after a preemption) with nothing pending.
        assert seq.num_pending_tokens == 0, "a sequence gets a slot with no token pending"
        options = seq.sampling
        bias = options.logit_bias
        if not self._free or len(bias) > self.bias_width:
            width = self.bias_width
            if len(bias) > width:
                width = 1 << (len(bias) - 1).bit_length()
            capacity = self.capacity
            if not self._free:
                capacity = max(MIN_SLOTS, 2 * capacity)
                if self.max_slots is not None:
                    capacity = max(min(capacity, self.max_slots), self.capacity + 1)
            self.reserve(capacity, width)
        slot = self._free.pop()
        self._slots[seq] = slot
        tokens = seq.token_ids
        num_prompt = seq.num_prompt_tokens - seq.num_resumed_output_tokens
        num_output, num_bias = len(tokens) - num_prompt, len(bias)
        # One upload of the ids (tokens, then bias ids), one of the values.
        ids = np.empty(len(tokens) + num_bias, dtype=np.int64)
        ids[: len(tokens)] = tokens
        values = np.empty(3 + num_bias, dtype=np.float32)
        values[:3] = (options.presence_penalty, options.frequency_penalty,
                      options.repetition_penalty)
        if num_bias:
            ids[len(tokens) :] = [token for token, _ in bias]
            values[3:] = [value for _, value in bias]
        ids_d = upload(ids, torch.int64, self.device)
        values_d = upload(values, torch.float32, self.device)
        row = self.counts[slot]
        row.zero_()
        row.index_fill_(0, ids_d[:num_prompt], PROMPT_BIT)
        if num_output:
            row.index_add_(0, ids_d[num_prompt : len(tokens)],
                           torch.ones(num_output, dtype=torch.int32, device=self.device))
        self.params[slot] = values_d[:3]
        self.bias_ids[slot].zero_()
        self.bias_values[slot].zero_()
        if num_bias:
            self.bias_ids[slot, :num_bias] = ids_d[len(tokens) :]
            self.bias_values[slot, :num_bias] = values_d[3:]
        return slot


@dataclass
class LogitsProcessing:
    """One step's processing of the rows that ask, as tensors on the logits' device."""

    state: TokenState
    # min_tokens: (rows, token ids) of the logits set to -inf; None = no row is short.
    banned: torch.Tensor | None  # [2, M] int64
    # Rows holding a slot, and their slots; None = none.
    rows: torch.Tensor | None  # [P] int64
    slots: torch.Tensor | None  # [P] int64
    bias: bool  # some slotted row has a logit bias
    penalties: bool  # some slotted row has a penalty
    # With drafts (speculative decoding): per round j, the slotted rows drawn after j draft
    # tokens, their slots, and the (slots, tokens) of each draft's j-th token, counted before
    # the round; the rows whose draw `record` counts (not a draft's: those count once kept).
    rounds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None
    recorded: tuple[torch.Tensor, torch.Tensor] | None = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """An fp32 copy of `logits` [N, V] with min_tokens, logit_bias and the penalties
        applied to the rows that ask (the other rows are unchanged)."""
        logits = logits.to(torch.float32, copy=True)
        if self.banned is not None:
            logits.index_put_((self.banned[0], self.banned[1]),
                              torch.full((), float("-inf"), device=logits.device))
        if self.rows is not None and self.slots is not None:
            state = self.state
            if self.bias:
                ids = state.bias_ids[self.slots]
                logits.index_put_((self.rows[:, None].expand_as(ids), ids),
                                  state.bias_values[self.slots], accumulate=True)
            if self.penalties and self.rounds is None:
                self._penalize(logits, self.rows, self.slots)
            elif self.penalties:
                # A row after j draft tokens sees them counted: each round adds the drafts'
                # next token to their slots, and the drafts are taken back out after.
                one = torch.ones((), dtype=state.counts.dtype, device=logits.device)
                added = [adds for _, _, adds in self.rounds if adds is not None]
                for rows, slots, adds in self.rounds:
                    if adds is not None:
                        state.counts.index_put_((adds[0], adds[1]), one, accumulate=True)
                    self._penalize(logits, rows, slots)
                for adds in added:
                    state.counts.index_put_((adds[0], adds[1]), -one, accumulate=True)
        return logits

    def _penalize(self, logits: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
        penalize = apply_penalties if logits.is_cuda else apply_penalties_torch
        penalize(logits, rows, slots, self.state.counts, self.state.params)

    def record(self, tokens: torch.Tensor) -> None:
        """Counts the step's drawn tokens [N] (on the device) in their rows' slots."""
        rows, slots = self.recorded if self.rounds is not None else (self.rows, self.slots)
        if rows is None or slots is None or not len(rows):
            return
        counts = self.state.counts
        counts.index_put_((slots, tokens[rows]),
                          torch.ones((), dtype=counts.dtype, device=counts.device),
                          accumulate=True)


class LogitsProcessors:
    """Builds each step's `LogitsProcessing` and owns the slots it reads."""

    def __init__(self, vocab_size: int, eos_token_ids: Sequence[int],
                 device: torch.device, max_slots: int | None = None) -> None:
        self.state = TokenState(vocab_size, device, max_slots)
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = device

    def prepare(self, seqs: Sequence[TokenSequence],
                drafts: Sequence[tuple[int, list[int]]] | None = None
                ) -> LogitsProcessing | None:
        """The processing of one step's sampling rows (one per sequence, in order); None when
        no row needs any (call it only when some row's options have `processes_logits`).

        With speculative decoding a sequence with a draft has a row after each of its draft
        tokens: `drafts[r]` is row r's (j, draft), j the draft tokens before it (None: no row
        follows a draft)."""
        banned_rows: list[int] = []
        banned_ids: list[int] = []
        rows: list[int] = []
        slots: list[int] = []
        offsets: list[int] = []
        bias = penalties = False
        for r, seq in enumerate(seqs):
            options = seq.sampling
            if not options.processes_logits:
                continue
            before = drafts[r][0] if drafts is not None else 0
            output = seq.num_tokens + before - seq.num_prompt_tokens
            if options.min_tokens and output < options.min_tokens:
                stops = options.stop_token_ids
                if not options.ignore_eos:
                    stops = (*stops, *self.eos_token_ids)
                banned_rows += [r] * len(stops)
                banned_ids += stops
            if options.keeps_token_state:
                rows.append(r)
                slots.append(self.state.slot(seq))
                offsets.append(before)
                bias |= bool(options.logit_bias)
                penalties |= (options.presence_penalty != 0 or options.frequency_penalty != 0
                              or options.repetition_penalty != 1.0)
        if not banned_rows and not rows:
            return None
        banned = (upload([banned_rows, banned_ids], torch.int64, self.device)
                  if banned_rows else None)
        index = upload([rows, slots], torch.int64, self.device) if rows else None
        processing = LogitsProcessing(self.state, banned,
                                      None if index is None else index[0],
                                      None if index is None else index[1], bias, penalties)
        if drafts is not None and any(drafts[r][1] for r in rows):
            self._draft_rounds(processing, rows, slots, offsets, drafts)
        return processing

    def _draft_rounds(self, processing: LogitsProcessing, rows: list[int], slots: list[int],
                      offsets: list[int], drafts: Sequence[tuple[int, list[int]]]) -> None:
        """Splits the slotted rows into rounds by the draft tokens before them (see
        `LogitsProcessing.rounds`); only the draws of rows without a draft are recorded at
        once."""
        rounds = []
        for j in range(max(offsets) + 1):
            at = [i for i, offset in enumerate(offsets) if offset == j]
            adds = [(slots[i], drafts[rows[i]][1][j - 1]) for i in at] if j else []
            where = upload([[rows[i] for i in at], [slots[i] for i in at]], torch.int64,
                           self.device)
            rounds.append((where[0], where[1],
                           upload(list(zip(*adds, strict=True)), torch.int64, self.device)
                           if adds else None))
        plain = [i for i in range(len(rows)) if not drafts[rows[i]][1]]
        recorded = upload([[rows[i] for i in plain], [slots[i] for i in plain]], torch.int64,
                          self.device)
        processing.rounds = rounds
        processing.recorded = (recorded[0], recorded[1])

    def record_kept(self, seq: Hashable, tokens: list[int]) -> None:
        """Counts a draft's kept tokens (and the pick after them) in the sequence's slot, if it
        holds one (the step's `record` left its rows out)."""
        slot = self.state.held(seq)
        if slot is None or not tokens:
            return
        row = self.state.counts[slot]
        row.index_put_((upload(tokens, torch.int64, self.device),),
                       torch.ones(len(tokens), dtype=row.dtype, device=row.device),
                       accumulate=True)

    def release(self, seq: Hashable) -> None:
        self.state.release(seq)
