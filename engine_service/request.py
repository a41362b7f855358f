"""Messages between the gRPC edge and the engine core: plain dataclasses, no protobuf."""

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(Enum):
    LENGTH = "length"
    STOP = "stop"


@dataclass(frozen=True)
class SamplingOptions:
    """How one request's tokens are drawn and when it stops (already validated)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class EngineRequest:
    """A prompt as token ids, with its sampling options and priority class (0 = most important)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    priority: int = 1
    tenant: str = ""


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log-probability and the top alternatives at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    """What one step produced for one request; the last one carries the finish reason."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    # When the frontend received it (its own monotonic clock), for latency metrics.
    arrival: float = 0.0
