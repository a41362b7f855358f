"""What the runner reads of a step's plan, as protocols: the core's `ScheduledChunk` and
`Sequence` fit them, and the runner never imports the core."""

from typing import Protocol


class ChunkSequence(Protocol):
    """A sequence being computed: its tokens and the KV pages that hold them."""

    token_ids: list[int]  # the tokens whose values the host knows
    num_prompt_tokens: int
    num_pending_tokens: int  # sampled on the device and not read yet: always the last ones
    block_ids: list[int]


class Chunk(Protocol):
    """`num_tokens` tokens of `seq` computed this step, from position `start`."""

    start: int
    num_tokens: int
    draft: list[int]  # its last len(draft) tokens: proposed past the sequence's tokens

    @property
    def seq(self) -> ChunkSequence: ...

    @property
    def samples(self) -> bool:
        """Whether the chunk reaches the sequence's end, so its last logits pick a token (its
        last 1 + len(draft) logits, with a draft)."""

    @property
    def prompt_logprobs(self) -> int | None:
        """Alternatives wanted per prompt token the chunk scores (each of its positions before
        the prompt's last scores the token after it); None: it scores none."""
