"""One sample's result when a request runs to its end in this process (the offline loop,
`EngineCore.run_to_completion`, and `LLM.generate`)."""

from dataclasses import dataclass, field

from llmserve.engine_service.seam import (
    FinishReason,
    RejectedRequest,
    RequestOutput,
    TokenLogprobs,
)


@dataclass
class Generation:
    """One sample's result when run to its end in this process (`run_to_completion`)."""

    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    cached_prompt_tokens: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # if the request asked for them
    prompt_logprobs: list[TokenLogprobs] | None = None  # if the request asked for them
    error: RejectedRequest | None = None  # refused (a constraint that did not compile) or failed
    index: int = 0  # the sample (0 to n - 1)
    # Every sample of the request by index, this one included (one entry when n = 1).
    samples: "list[Generation]" = field(default_factory=list, compare=False, repr=False)

    def add(self, out: RequestOutput) -> None:
        """Appends one of the sample's outputs."""
        self.token_ids += out.new_token_ids
        if out.new_logprobs:
            self.logprobs += out.new_logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            self.prompt_tokens = out.prompt_tokens
            self.cached_prompt_tokens = out.cached_prompt_tokens
