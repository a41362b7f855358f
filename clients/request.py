"""Building the request messages from keyword arguments, the one place both clients share.

Nothing here checks ranges: the server validates and answers `INVALID_ARGUMENT` naming the field
and the limit, so a caller sees the server's rule rather than a stale copy of it.
"""

from __future__ import annotations

import json
from typing import Any, TypedDict

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
    n: int | None
    stop: list[str] | None
    stop_token_ids: list[int] | None
    ignore_eos: bool
    logprobs: int | None
    prompt_logprobs: int | None
    speculative_tokens: int | None
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float | None
    logit_bias: dict[int, float] | None
    min_tokens: int
    json_schema: dict[str, Any] | str | None
    json_object: bool
    regex: str | None
    grammar: str | None
    choice: list[str] | None
    include_stop_str_in_output: bool
    skip_special_tokens: bool | None
    truncate_prompt_tokens: int | None
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
    n: int | None = None,
    stop: list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    ignore_eos: bool = False,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    speculative_tokens: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float | None = None,
    logit_bias: dict[int, float] | None = None,
    min_tokens: int = 0,
    json_schema: dict[str, Any] | str | None = None,
    json_object: bool = False,
    regex: str | None = None,
    grammar: str | None = None,
    choice: list[str] | None = None,
    include_stop_str_in_output: bool = False,
    skip_special_tokens: bool | None = None,
    truncate_prompt_tokens: int | None = None,
    priority: str = "standard",
    tenant: str = "",
    request_id: str = "",
) -> generate_service_pb2.GenerateRequest:
    """Builds a `GenerateRequest`.

    Give one of `prompt` (plain text), `messages` (chat turns, `{"role": ..., "content": ...}`,
    rendered with the model's chat template) or `prompt_token_ids`. Arguments left at `None` stay
    unset on the wire so the server applies its defaults (temperature 1.0, top_p 1.0, max_tokens
    256). `logprobs=N` asks for each token's log-probability and N alternatives;
    `prompt_logprobs=N` the same for every prompt token after the first (on the first chunk;
    the prompt is then not served from the prefix cache). `priority` is "critical", "standard"
    or "batch". `n=K` asks for K samples of the prompt (chunks name theirs in `index`; sample
    i is seeded `seed + i`). `speculative_tokens=K` caps the draft tokens an engine running
    speculative decoding proposes per step for this request (0 = none; None = the engine's
    default); the output is the same either way, and `usage` counts the drafts proposed and
    accepted.

    `presence_penalty` and `frequency_penalty` (OpenAI's, over the generated tokens),
    `repetition_penalty` (Hugging Face's, over prompt and generated tokens; None = 1.0, off),
    `logit_bias` ({token id: bias} added to the logits) and `min_tokens` (no end-of-sequence or
    stop before that many tokens) follow the `SamplingParams` and `StoppingCriteria` comments in
    proto/llmserve/v1/common.proto, which give their bounds.

    Structured output (at most one; docs/structured-output.md): `json_schema` (a dict, or its
    JSON text) makes the output one JSON value of that schema, `json_object=True` any JSON
    object, `regex` a full match of the regular expression, `grammar` a sentence of the Lark
    grammar, `choice` exactly one of the strings.

    `include_stop_str_in_output=True` ends the text with the stop string that ended it;
    `skip_special_tokens=False` keeps special tokens (end-of-sequence, chat markers) in the text
    (None = the server's default, True); `truncate_prompt_tokens=K` keeps only the prompt's last
    K tokens, so a longer prompt is served instead of refused.

    Raises:
        ValueError: `priority` is not one of the three names, more than one structured output
            argument is given, or a value does not fit its protobuf field (e.g. a negative
            `seed`).
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
            n=n,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            speculative_tokens=speculative_tokens,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            logit_bias=[
                common_pb2.LogitBias(token_id=token_id, bias=bias)
                for token_id, bias in (logit_bias or {}).items()
            ],
            structured_output=_structured_output(json_schema, json_object, regex, grammar,
                                                 choice),
        ),
        stopping=common_pb2.StoppingCriteria(
            max_tokens=max_tokens,
            stop_token_ids=stop_token_ids or [],
            ignore_eos=ignore_eos,
            min_tokens=min_tokens,
        ),
        stop=stop or [],
        include_stop_str_in_output=include_stop_str_in_output,
        skip_special_tokens=skip_special_tokens,
        truncate_prompt_tokens=truncate_prompt_tokens,
        priority=priority_value,
        tenant=tenant,
        request_id=request_id,
    )


def _structured_output(
    json_schema: dict[str, Any] | str | None,
    json_object: bool,
    regex: str | None,
    grammar: str | None,
    choice: list[str] | None,
) -> common_pb2.StructuredOutput | None:
    given = {
        "json_schema": json_schema if json_schema is None or isinstance(json_schema, str)
        else json.dumps(json_schema),
        "json_object": json_object or None,
        "regex": regex,
        "grammar": grammar,
        "choice": None if choice is None else common_pb2.ChoiceList(choices=choice),
    }
    given = {name: value for name, value in given.items() if value is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one of json_schema, json_object, regex, grammar and "
                         f"choice, got {', '.join(given)}")
    return common_pb2.StructuredOutput(**given) if given else None


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
