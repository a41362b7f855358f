"""Prompt lookup: propose the tokens that followed the last time the sequence's suffix occurred.

Text that quotes its context (code edits, summaries, extraction, JSON echoing its input) repeats
spans of its prompt and of itself; where the last n tokens occurred before, what followed them
then is a cheap guess of what follows now. The guess costs no model pass; the target model's
verification keeps the output exact whatever it is.
"""

import numpy as np

from llmserve.engine_service.core.sequence import Sequence
from llmserve.engine_service.core.speculator import Drafts


class NgramProposer:
    """Looks up the sequence's last n tokens (longest n first, from `max_n` down to `min_n`)
    in its earlier tokens, and proposes up to k of the tokens after their latest match."""

    guess_cost = 0.0  # no model pass: a guess costs only its verified row

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Drafts:
        values = [self.lookup(seq.token_ids, k) for seq, k in zip(seqs, ks, strict=True)]
        return Drafts([len(v) for v in values], values=values)

    def verified(self, seq: Sequence, accepted: int) -> None:
        """Keeps nothing per sequence."""

    def forget(self, seq: Sequence) -> None:
        """Keeps nothing per sequence."""

    def lookup(self, token_ids: list[int], k: int) -> list[int]:
        """Up to `k` tokens to follow `token_ids` (none when no suffix recurs)."""
        length = len(token_ids)
        if k <= 0 or length <= self.min_n:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        last = length - 1
        # Earlier occurrences of the last token, each followed by at least one known token;
        # then, suffix token by suffix token, those the longer suffix still matches at.
        ends = np.flatnonzero(tokens[:last] == tokens[last])
        best = None
        for n in range(1, min(self.max_n, last) + 1):
            if n > 1:
                ends = ends[ends >= n - 1]
                ends = ends[tokens[ends - (n - 1)] == tokens[last - (n - 1)]]
            if not ends.size:
                break
            if n >= self.min_n:
                best = int(ends[-1]) + 1  # the latest occurrence: the nearest context
        return [] if best is None else token_ids[best : best + k]
