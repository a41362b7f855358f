"""The bounds of every request field, checked by both tiers before any work is done.

The router checks a `GenerateRequest` and an engine its `EngineServiceGenerateRequest` against
the same bounds here, so a request the router let through is never refused by an engine for a
limit, and one sent straight to an engine meets the same ones. A violation raises
InvalidRequestError, whose message names the field and its limit (the caller's INVALID_ARGUMENT).
Fixed bounds are constants; those that follow the model (prompt length, max_tokens) take
max_model_len. The proto comments quote every bound.

Counts are checked before contents: the length of a repeated field is known without reading it,
so an oversized one costs nothing to refuse.
"""

from collections.abc import Sequence, Sized

from llmserve.common.priority import PRIORITY_CLASS
from llmserve.v1 import common_pb2, engine_service_pb2, generate_service_pb2

# Echoed in every response chunk and written into both tiers' logs: a UUID takes 36.
MAX_ID_CHARS = 128
# Tenant names key admission queues and logs.
MAX_TENANT_CHARS = 128
# Every stop string is searched for in the pending text after each chunk.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# The engine checks each generated token against every one of them.
MAX_STOP_TOKEN_IDS = 128
# The chat completion APIs' own bound; each turn costs a few template tokens anyway.
MAX_MESSAGES = 2048
# "system", "user", "assistant", "tool", ...
MAX_ROLE_CHARS = 64
# Alternatives returned per generated token.
MAX_LOGPROBS = 20
# OpenAI's bounds (and vLLM's): presence and frequency penalties in [-2, 2], a repetition
# penalty in (0, 2], at most 300 logit_bias entries, each in [-100, 100].
MAX_ABS_PENALTY = 2.0
MAX_REPETITION_PENALTY = 2.0
MAX_LOGIT_BIAS = 300
MAX_ABS_LOGIT_BIAS = 100.0
# Structured output: a JSON schema, regex or grammar is compiled by the engine (off its step
# loop, under a time limit); these bound the text it is asked to compile. A choice becomes a
# grammar of its strings.
MAX_STRUCTURED_SPEC_CHARS = 65536
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
# Samples of one prompt: each holds its own sequence slot and KV for its output, so one request
# may not take a large share of the batch.
MAX_N = 16
# Alternatives per prompt token with prompt_logprobs (each prompt position costs a vocabulary
# row of logits while it is prefilled).
MAX_PROMPT_LOGPROBS = 20
# Draft tokens a request may ask an engine to propose per step with speculative decoding: also
# the ceiling of an engine's --num-speculative-tokens (engine_service/config.py), which caps a
# request's ask at its own value. Each step verifies them in one forward pass of that many more
# positions per sequence.
MAX_SPECULATIVE_TOKENS = 16
# A prompt given as text to be truncated may exceed max_model_len tokens; it is still bounded
# before tokenizing (gRPC's default largest message).
MAX_TRUNCATED_PROMPT_CHARS = 4 * 1024 * 1024


class InvalidRequestError(ValueError):
    """A request field is out of its bounds; the message names the field and its limit."""


def check_length(field: str, value: Sized, limit: int, unit: str) -> None:
    if len(value) > limit:
        raise InvalidRequestError(f"{field}: {len(value)} {unit}; the limit is {limit}")


def check_shared_fields(
    request: generate_service_pb2.GenerateRequest | engine_service_pb2.EngineServiceGenerateRequest,
) -> None:
    """The fields both APIs' generate requests carry: ids, sampling, stop token ids, priority."""
    check_length("request_id", request.request_id, MAX_ID_CHARS, "characters")
    check_length("tenant", request.tenant, MAX_TENANT_CHARS, "characters")
    check_sampling(request.sampling)
    check_length(
        "stopping.stop_token_ids", request.stopping.stop_token_ids, MAX_STOP_TOKEN_IDS, "ids"
    )
    if request.stopping.min_tokens < 0:
        raise InvalidRequestError(
            f"stopping.min_tokens: {request.stopping.min_tokens} must be >= 0"
        )
    if request.priority not in PRIORITY_CLASS:
        raise InvalidRequestError(f"priority: unknown value {request.priority}")
    if request.HasField("truncate_prompt_tokens") and request.truncate_prompt_tokens < 1:
        raise InvalidRequestError(
            f"truncate_prompt_tokens: {request.truncate_prompt_tokens} must be >= 1"
        )


def check_truncate_prompt_tokens(value: int, max_model_len: int) -> None:
    """The upper bound of truncate_prompt_tokens, which follows the model."""
    if value >= max_model_len:
        raise InvalidRequestError(
            f"truncate_prompt_tokens: {value}; the limit is {max_model_len - 1} "
            f"(max_model_len {max_model_len} minus at least one generated token)"
        )


def check_sampling(sampling: common_pb2.SamplingParams) -> None:
    if sampling.HasField("temperature") and not sampling.temperature >= 0:
        raise InvalidRequestError(f"sampling.temperature: {sampling.temperature} must be >= 0")
    if sampling.HasField("top_p") and not 0 < sampling.top_p <= 1:
        raise InvalidRequestError(f"sampling.top_p: {sampling.top_p} must be in (0, 1]")
    if sampling.top_k < 0:
        raise InvalidRequestError(f"sampling.top_k: {sampling.top_k} must be >= 0 (0 = off)")
    if not 0 <= sampling.min_p <= 1:
        raise InvalidRequestError(f"sampling.min_p: {sampling.min_p} must be in [0, 1]")
    if sampling.HasField("logprobs") and not 0 <= sampling.logprobs <= MAX_LOGPROBS:
        raise InvalidRequestError(
            f"sampling.logprobs: {sampling.logprobs} must be in [0, {MAX_LOGPROBS}]"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(sampling, name)
        if not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:
            raise InvalidRequestError(
                f"sampling.{name}: {value} must be in [-{MAX_ABS_PENALTY:g}, {MAX_ABS_PENALTY:g}]"
            )
    if sampling.HasField("repetition_penalty") and not (
        0 < sampling.repetition_penalty <= MAX_REPETITION_PENALTY
    ):
        raise InvalidRequestError(
            f"sampling.repetition_penalty: {sampling.repetition_penalty} must be in "
            f"(0, {MAX_REPETITION_PENALTY:g}]"
        )
    if sampling.HasField("n") and not 1 <= sampling.n <= MAX_N:
        raise InvalidRequestError(f"sampling.n: {sampling.n} must be in [1, {MAX_N}]")
    if sampling.HasField("prompt_logprobs") and not (
        0 <= sampling.prompt_logprobs <= MAX_PROMPT_LOGPROBS
    ):
        raise InvalidRequestError(
            f"sampling.prompt_logprobs: {sampling.prompt_logprobs} must be in "
            f"[0, {MAX_PROMPT_LOGPROBS}]"
        )
    if sampling.HasField("speculative_tokens") and not (
        0 <= sampling.speculative_tokens <= MAX_SPECULATIVE_TOKENS
    ):
        raise InvalidRequestError(
            f"sampling.speculative_tokens: {sampling.speculative_tokens} must be in "
            f"[0, {MAX_SPECULATIVE_TOKENS}] (0 = no speculation)"
        )
    check_logit_bias(sampling.logit_bias)
    if sampling.HasField("structured_output"):
        check_structured_output(sampling.structured_output)


def check_logit_bias(entries: Sequence[common_pb2.LogitBias]) -> None:
    """At most MAX_LOGIT_BIAS entries, each token once and >= 0 (the engine checks the top of
    the vocabulary), each bias in [-MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS]."""
    check_length("sampling.logit_bias", entries, MAX_LOGIT_BIAS, "entries")
    seen: set[int] = set()
    for i, entry in enumerate(entries):
        if entry.token_id < 0:
            raise InvalidRequestError(
                f"sampling.logit_bias[{i}].token_id: {entry.token_id} must be >= 0"
            )
        if entry.token_id in seen:
            raise InvalidRequestError(
                f"sampling.logit_bias[{i}].token_id: {entry.token_id} appears more than once"
            )
        seen.add(entry.token_id)
        if not -MAX_ABS_LOGIT_BIAS <= entry.bias <= MAX_ABS_LOGIT_BIAS:
            raise InvalidRequestError(
                f"sampling.logit_bias[{i}].bias: {entry.bias} must be in "
                f"[-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}]"
            )


def check_structured_output(spec: common_pb2.StructuredOutput) -> None:
    """Exactly one kind, and its text within bounds (its contents are the engine's to judge)."""
    field = "sampling.structured_output"
    kind = spec.WhichOneof("kind")
    if kind is None:
        raise InvalidRequestError(
            f"{field}: set one of json_schema, json_object, regex, grammar or choice (or leave "
            "structured_output unset)"
        )
    if kind == "json_object":
        if not spec.json_object:
            raise InvalidRequestError(f"{field}.json_object: must be true when set")
    elif kind == "choice":
        choices = spec.choice.choices
        if not choices:
            raise InvalidRequestError(f"{field}.choice.choices: must not be empty")
        check_length(f"{field}.choice.choices", choices, MAX_CHOICES, "strings")
        for i, choice in enumerate(choices):
            if not choice or len(choice) > MAX_CHOICE_CHARS:
                raise InvalidRequestError(
                    f"{field}.choice.choices[{i}]: length {len(choice)}; must be "
                    f"1..{MAX_CHOICE_CHARS}"
                )
    else:
        text = getattr(spec, kind)
        if not text:
            raise InvalidRequestError(f"{field}.{kind}: must not be empty")
        check_length(f"{field}.{kind}", text, MAX_STRUCTURED_SPEC_CHARS, "characters")


def check_stop_strings(stop: Sequence[str]) -> None:
    check_length("stop", stop, MAX_STOP_STRINGS, "strings")
    for i, s in enumerate(stop):
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidRequestError(f"stop[{i}]: length {len(s)}; must be 1..{MAX_STOP_CHARS}")


def check_messages(messages: Sequence[generate_service_pb2.ChatMessage]) -> None:
    """The conversation's turns and roles; contents are bounded once rendered, like a prompt."""
    check_length("messages", messages, MAX_MESSAGES, "messages")
    for i, message in enumerate(messages):
        role = message.role
        if not role or len(role) > MAX_ROLE_CHARS:
            raise InvalidRequestError(
                f"messages[{i}].role: length {len(role)}; must be 1..{MAX_ROLE_CHARS}"
            )


def check_prompt_chars(
    field: str, num_chars: int, max_model_len: int, chars_per_token: float | None
) -> None:
    """Refuses a text that must tokenize to more than max_model_len - 1 tokens, untokenized.

    `chars_per_token` is the most characters one token of the model's tokenizer can stand for
    (None: unbounded, nothing is refused here), so the text has at least
    num_chars / chars_per_token tokens: past the limit, it could never fit.
    """
    if chars_per_token is None:
        return
    limit = int((max_model_len - 1) * chars_per_token)
    if num_chars > limit:
        raise InvalidRequestError(
            f"{field}: {num_chars} characters; the limit is {limit} ({max_model_len - 1} tokens "
            f"of at most {chars_per_token:g} characters each, max_model_len {max_model_len} minus "
            "at least one generated token)"
        )


def check_prompt_tokens(field: str, num_tokens: int, max_model_len: int) -> None:
    if num_tokens == 0:
        raise InvalidRequestError(f"{field}: must not be empty (no tokens)")
    if num_tokens >= max_model_len:
        raise InvalidRequestError(
            f"{field}: {num_tokens} tokens; the limit is {max_model_len - 1} "
            f"(max_model_len {max_model_len} minus at least one generated token)"
        )


def resolve_max_tokens(
    stopping: common_pb2.StoppingCriteria, max_model_len: int, prompt_tokens: int, default: int
) -> int:
    """The request's max_tokens, or the default capped by the room left in max_model_len; and
    min_tokens (already >= 0, `check_shared_fields`) checked against it."""
    room = max_model_len - prompt_tokens
    if not stopping.HasField("max_tokens"):
        max_tokens = min(default, room)
    else:
        max_tokens = stopping.max_tokens
        if max_tokens <= 0:
            raise InvalidRequestError(f"stopping.max_tokens: {max_tokens} must be >= 1")
        if max_tokens > room:
            raise InvalidRequestError(
                f"stopping.max_tokens: {max_tokens} exceeds the limit {room} "
                f"(max_model_len {max_model_len} minus {prompt_tokens} prompt tokens)"
            )
    if stopping.min_tokens > max_tokens:
        raise InvalidRequestError(
            f"stopping.min_tokens: {stopping.min_tokens} exceeds max_tokens {max_tokens}"
            + ("" if stopping.HasField("max_tokens") else " (the default, capped by the room "
               f"max_model_len {max_model_len} leaves after {prompt_tokens} prompt tokens)")
        )
    return max_tokens
