"""What a caller sees of a streamed completion: plain dataclasses, free of protobuf types."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from llmserve.v1 import common_pb2, generate_service_pb2

# "length", "stop", ... derived from the enum so a reason added to the contract needs no edit here.
_FINISH_REASONS: dict[int, str] = {
    value.number: value.name.removeprefix("FINISH_REASON_").lower()
    for value in common_pb2.FinishReason.DESCRIPTOR.values
    if value.number != common_pb2.FINISH_REASON_UNSPECIFIED
}


class TopLogprob(NamedTuple):
    """One alternative at a position: `(token_id, logprob, text)`."""

    token_id: int
    logprob: float
    text: str


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The log-probability of a token (generated, or of the prompt) and the most likely
    alternatives at its position."""

    token_id: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts for a finished request."""

    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens the engine served from its prefix cache.
    cached_prompt_tokens: int
    # Speculative decoding: draft tokens the engines proposed for the output, and those the
    # model accepted (accepted / proposed is the acceptance rate); 0 without speculation.
    speculative_proposed_tokens: int = 0
    speculative_accepted_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed piece of a completion: one or more new tokens of one sample and their text.

    `finish_reason` ("length" or "stop") is set on its sample's last chunk, `usage` (every
    sample's tokens, the prompt once) on the stream's last chunk only; `prompt_logprobs` (when
    asked for) on its first: one per prompt token after the first. `index` is the sample (0 to
    n - 1; always 0 without `n`).
    """

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    usage: Usage | None
    request_id: str
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    index: int = 0


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole completion: the chunks of one sample joined. `usage` is the whole request's."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage | None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    request_id: str = ""
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    index: int = 0
    # Every sample's completion by index, this one included (one entry without `n`).
    samples: list[Completion] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def from_chunks(cls, chunks: Iterable[Chunk]) -> Completion:
        """Joins the chunks of one stream, in order, per sample: sample 0's completion, whose
        `samples` lists them all."""
        by_index: dict[int, list[Chunk]] = {}
        for chunk in chunks:
            by_index.setdefault(chunk.index, []).append(chunk)
        usage = next((c.usage for group in by_index.values() for c in group if c.usage), None)
        samples = [cls._join(by_index.get(i, []), i, usage)
                   for i in range(max(by_index, default=0) + 1)]
        for sample in samples:
            object.__setattr__(sample, "samples", samples)  # frozen: set once, here
        return samples[0]

    @classmethod
    def _join(cls, chunks: list[Chunk], index: int, usage: Usage | None) -> Completion:
        texts: list[str] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        finish_reason: str | None = None
        request_id = ""
        prompt_logprobs: list[TokenLogprob] = []
        for chunk in chunks:
            texts.append(chunk.text)
            token_ids.extend(chunk.token_ids)
            logprobs.extend(chunk.logprobs)
            finish_reason = chunk.finish_reason or finish_reason
            request_id = request_id or chunk.request_id
            prompt_logprobs.extend(chunk.prompt_logprobs)
        return cls("".join(texts), token_ids, finish_reason, usage, logprobs, request_id,
                   prompt_logprobs, index)


def chunk_from_proto(response: generate_service_pb2.GenerateResponse) -> Chunk:
    """Converts one streamed `GenerateResponse` into a `Chunk`."""
    reason = response.finish_reason
    return Chunk(
        text=response.text,
        token_ids=list(response.token_ids),
        logprobs=_logprobs(response.logprobs),
        # A reason newer than this client still marks the end of the stream.
        finish_reason=_FINISH_REASONS.get(reason, f"unknown_{reason}") if reason else None,
        usage=(
            Usage(
                prompt_tokens=response.usage.prompt_tokens,
                completion_tokens=response.usage.completion_tokens,
                cached_prompt_tokens=response.usage.cached_prompt_tokens,
                speculative_proposed_tokens=response.usage.speculative_proposed_tokens,
                speculative_accepted_tokens=response.usage.speculative_accepted_tokens,
            )
            if response.HasField("usage")
            else None
        ),
        request_id=response.request_id,
        prompt_logprobs=_logprobs(response.prompt_logprobs),
        index=response.index,
    )


def _logprobs(entries: Iterable[common_pb2.TokenLogprob]) -> list[TokenLogprob]:
    return [
        TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[TopLogprob(t.token_id, t.logprob, t.text) for t in lp.top_logprobs],
        )
        for lp in entries
    ]
