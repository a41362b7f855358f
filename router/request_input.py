"""Turns a public request's input (prompt, messages or token ids) into prompt token ids."""

from collections.abc import Sequence
from dataclasses import dataclass

from llmserve.router.chat_template import ChatTemplateError
from llmserve.router.tokenizer import TextTokenizer
from llmserve.v1 import common_pb2, generate_service_pb2

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class InvalidInputError(ValueError):
    """The request's input is unusable; the message names the field and the limit."""


@dataclass(frozen=True)
class PromptInput:
    """The prompt as the engine will see it, and which request field it came from."""

    field: str
    text: str
    # For `prompt_token_ids`, the request's own repeated field: copying it into a list costs
    # more than everything else the router does before the request leaves (~17 us for 512 ids),
    # while the engine request is filled from it in C.
    token_ids: Sequence[int]


def prompt_input(
    request: generate_service_pb2.GenerateRequest | generate_service_pb2.TokenizeRequest,
    tokenizer: TextTokenizer,
    max_model_len: int,
) -> PromptInput:
    """Tokenizes exactly one of prompt / messages / prompt_token_ids and checks its length."""
    token_ids = getattr(request, "prompt_token_ids", ())  # TokenizeRequest has none
    given = [
        name
        for name, value in (
            ("prompt", request.prompt),
            ("messages", request.messages),
            ("prompt_token_ids", token_ids),
        )
        if value
    ]
    if not given:
        raise InvalidInputError(
            "prompt: give one of prompt, messages or prompt_token_ids (all are empty)"
        )
    if len(given) > 1:
        raise InvalidInputError(
            f"{given[0]}: give only one of prompt, messages or prompt_token_ids "
            f"(got {' and '.join(given)})"
        )
    field = given[0]
    if field == "prompt":
        result = PromptInput(field, request.prompt, tokenizer.encode(request.prompt))
    elif field == "messages":
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        for i, message in enumerate(messages):
            if not message["role"]:
                raise InvalidInputError(f"messages[{i}].role: must not be empty")
        try:
            text, ids = tokenizer.encode_chat(messages)
        except (ChatTemplateError, ValueError) as exc:
            raise InvalidInputError(f"messages: {exc}") from exc
        result = PromptInput(field, text, ids)
    else:
        result = PromptInput(field, "", token_ids)
    if not result.token_ids:
        raise InvalidInputError(f"{field}: tokenizes to no tokens")
    if len(result.token_ids) >= max_model_len:
        raise InvalidInputError(
            f"{field}: {len(result.token_ids)} tokens; the limit is {max_model_len - 1} "
            f"(max_model_len {max_model_len} minus at least one generated token)"
        )
    return result


def check_stop_strings(stop: list[str]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidInputError(f"stop: {len(stop)} strings; the limit is {MAX_STOP_STRINGS}")
    for i, s in enumerate(stop):
        if not s or len(s) > MAX_STOP_LENGTH:
            raise InvalidInputError(f"stop[{i}]: length {len(s)}; must be 1..{MAX_STOP_LENGTH}")


def check_max_tokens(stopping: common_pb2.StoppingCriteria, room: int, default: int) -> int:
    """The request's max_tokens, or the default capped by the room left in max_model_len."""
    if not stopping.HasField("max_tokens"):
        return min(default, room)
    if stopping.max_tokens <= 0:
        raise InvalidInputError(f"stopping.max_tokens: {stopping.max_tokens} must be >= 1")
    if stopping.max_tokens > room:
        raise InvalidInputError(
            f"stopping.max_tokens: {stopping.max_tokens} exceeds the limit {room} "
            f"(max_model_len minus the prompt's tokens)"
        )
    return stopping.max_tokens
