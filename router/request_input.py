"""Turns a public request's input (prompt, messages or token ids) into prompt token ids.

Every bound that needs no tokenizing is checked first (see `request_limits`): a prompt too long
to fit is refused by its length in characters, before any work on it.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from llmserve.common.request_limits import (
    InvalidRequestError,
    check_messages,
    check_prompt_chars,
    check_prompt_tokens,
)
from llmserve.router.chat_template import ChatTemplateError
from llmserve.router.tokenizer import TextTokenizer
from llmserve.v1 import generate_service_pb2


@dataclass(frozen=True)
class PromptInput:
    """The prompt as the engine will see it, and which request field it came from."""

    field: str
    text: str
    # For `prompt_token_ids`, the request's own repeated field: copying it into a list costs
    # more than everything else the router does before the request leaves, while the engine
    # request is filled from it in C.
    token_ids: Sequence[int]


async def prompt_input(
    request: generate_service_pb2.GenerateRequest | generate_service_pb2.TokenizeRequest,
    tokenizer: TextTokenizer,
    max_model_len: int,
) -> PromptInput:
    """Tokenizes exactly one of prompt / messages / prompt_token_ids and checks its length."""
    token_ids = getattr(request, "prompt_token_ids", ())  # TokenizeRequest has none
    # Read once: each read of a string field builds a new str, a copy of the whole prompt.
    prompt = request.prompt
    given = [
        name
        for name, value in (
            ("prompt", prompt),
            ("messages", request.messages),
            ("prompt_token_ids", token_ids),
        )
        if value
    ]
    if not given:
        raise InvalidRequestError(
            "prompt: give one of prompt, messages or prompt_token_ids (all are empty)"
        )
    if len(given) > 1:
        raise InvalidRequestError(
            f"{given[0]}: give only one of prompt, messages or prompt_token_ids "
            f"(got {' and '.join(given)})"
        )
    field = given[0]
    if field == "prompt_token_ids":
        check_prompt_tokens(field, len(token_ids), max_model_len)
        return PromptInput(field, "", token_ids)
    if field == "prompt":
        text, add_special_tokens = prompt, True
    else:
        check_messages(request.messages)
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            text = await tokenizer.render_chat(messages)
        except (ChatTemplateError, ValueError) as exc:
            raise InvalidRequestError(f"messages: {exc}") from exc
        # The template holds its special tokens already.
        add_special_tokens = False
    check_prompt_chars(field, len(text), max_model_len, tokenizer.chars_per_token)
    encoding = await tokenizer.encode(text, add_special_tokens)
    # Counted before `.ids` builds a list of them (millions for a long prompt refused here).
    check_prompt_tokens(field, len(encoding), max_model_len)
    return PromptInput(field, text, encoding.ids)
