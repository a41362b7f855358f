"""Building the request messages from keyword arguments, the one place both clients share.

Nothing here checks ranges: the server validates and answers `INVALID_ARGUMENT` naming the field
and the limit, so a caller sees the server's rule rather than a stale copy of it.
"""

from __future__ import annotations

from typing import TypedDict

from llmserve.v1 import common_pb2, generate_service_pb2

PRIORITIES: dict[str, int] = {
    "critical": common_pb2.PRIORITY_CRITICAL,
    "standard": common_pb2.PRIORITY_STANDARD,
    "batch": common_pb2.PRIORITY_BATCH,
}


class GenerateParams(TypedDict, total=False):
    """The keyword arguments `generate()` and `generate_text()` take besides the prompt.

    See `build_generate_request` for what each one means and its default.
    """

    messages: list[dict[str, str]] | None
    prompt_token_ids: list[int] | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int
    min_p: float
    seed: int | None
    stop: list[str] | None
    stop_token_ids: list[int] | None
    ignore_eos: bool
    logprobs: int | None
    priority: str
    tenant: str
    request_id: str


def build_generate_request(
    prompt: str | None = None,
    *,
    messages: list[dict[str, str]] | None = None,
    prompt_token_ids: list[int] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    ignore_eos: bool = False,
    logprobs: int | None = None,
    priority: str = "standard",
    tenant: str = "",
    request_id: str = "",
) -> generate_service_pb2.GenerateRequest:
    """Builds a `GenerateRequest`.

    Give one of `prompt` (plain text), `messages` (chat turns, `{"role": ..., "content": ...}`,
    rendered with the model's chat template) or `prompt_token_ids`. Arguments left at `None` stay
    unset on the wire so the server applies its defaults (temperature 1.0, top_p 1.0, max_tokens
    256). `logprobs=N` asks for each token's log-probability and N alternatives. `priority` is
    "critical", "standard" or "batch".

    Raises:
        ValueError: `priority` is not one of the three names, or a value does not fit its
            protobuf field (e.g. a negative `seed`).
    """
    try:
        priority_value = PRIORITIES[priority.lower()]
    except KeyError:
        raise ValueError(
            f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}"
        ) from None
    # None leaves an `optional` field unset, so the server can tell "not given" from 0.
    return generate_service_pb2.GenerateRequest(
        prompt=prompt or "",
        messages=_chat_messages(messages),
        prompt_token_ids=prompt_token_ids or [],
        sampling=common_pb2.SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            logprobs=logprobs,
        ),
        stopping=common_pb2.StoppingCriteria(
            max_tokens=max_tokens,
            stop_token_ids=stop_token_ids or [],
            ignore_eos=ignore_eos,
        ),
        stop=stop or [],
        priority=priority_value,
        tenant=tenant,
        request_id=request_id,
    )


def build_tokenize_request(
    prompt: str | None = None, messages: list[dict[str, str]] | None = None
) -> generate_service_pb2.TokenizeRequest:
    """Builds a `TokenizeRequest` for a plain prompt or chat messages."""
    return generate_service_pb2.TokenizeRequest(
        prompt=prompt or "", messages=_chat_messages(messages)
    )


def _chat_messages(
    messages: list[dict[str, str]] | None,
) -> list[generate_service_pb2.ChatMessage]:
    return [
        generate_service_pb2.ChatMessage(role=m["role"], content=m["content"])
        for m in messages or []
    ]
