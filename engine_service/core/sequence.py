"""A request's life inside the engine: its tokens, its KV blocks and how far it is computed."""

from enum import Enum
from typing import TYPE_CHECKING

from llmserve.engine_service.seam import (
    EngineRequest,
    FinishReason,
    SamplingOptions,
    TokenLogprobs,
)

if TYPE_CHECKING:
    from llmserve.engine_service.core.structured_output import Matcher


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request's tokens (prompt + generated) and the KV blocks that hold them.

    With async scheduling a token is sampled by a step whose result the host has not read yet:
    it counts in `num_tokens` (the next step computes it, reading it on the device) but its
    value is not in `token_ids` until the step is read. Such tokens are always the last ones.
    """

    def __init__(self, request: EngineRequest, arrival: int, seed: int,
                 grammar: "Matcher | None" = None, index: int = 0) -> None:
        self.request_id = request.request_id
        self.index = index  # which sample of the request (0 to n - 1)
        # Every sample of the request, by index (the core links them): later samples share the
        # prompt blocks of one that has computed the prompt.
        self.samples: list[Sequence] = [self]
        self.priority = request.priority
        self.arrival = arrival
        self.sampling: SamplingOptions = request.sampling
        self.seed = seed
        self.num_prompt_tokens = len(request.prompt_token_ids)
        # The prompt's last this-many tokens are output another engine streamed (failover): the
        # penalties count them as output.
        self.num_resumed_output_tokens = request.resumed_output_tokens
        self.token_ids: list[int] = list(request.prompt_token_ids)  # the tokens with known values
        self.num_pending_tokens = 0  # sampled in a step still in flight; values come later
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        # Chained hashes of the full blocks of token_ids, extended as blocks fill.
        self.block_hashes: list[int] = []
        self.num_cached_prompt_tokens = 0
        self.num_preemptions = 0
        self.finish_reason: FinishReason | None = None
        # Its pending token reaches its length limit, so it ends there: nothing more to compute.
        self.final_token_pending = False
        # The prompt's logprobs, scored as its chunks are computed, while they are wanted: None
        # if the request asked for none, or once its first output carried them.
        self.prompt_logprobs: list[TokenLogprobs] | None = (
            None if request.sampling.prompt_logprobs is None else [])
        # Speculative decoding: draft tokens proposed for it, and how many were kept.
        self.num_spec_proposed = 0
        self.num_spec_accepted = 0
        self.num_spec_missed = 0  # drafts that lost a guess
        # Structured output: the matcher that has accepted every token of token_ids past the
        # prompt (a preempted sequence keeps it, as it keeps its tokens); None = unconstrained.
        self.grammar = grammar

    @property
    def order(self) -> tuple[int, int]:
        """Scheduling order: more important class first, then first come first served."""
        return (self.priority, self.arrival)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens - self.num_computed_tokens
