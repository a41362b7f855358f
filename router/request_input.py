"""Turns a public request's input (prompt, messages or token ids) into prompt token ids.

Every bound that needs no tokenizing is checked first (see `request_limits`): a prompt too long
to fit is refused by its length in characters, before any work on it.

`truncate_prompt_tokens` keeps the prompt's last tokens (vLLM's rule), here and not at the engine:
engines get the kept tokens and never the field, so a failover, which resubmits the prompt plus
the output so far, cannot truncate that output away.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from llmserve.common.request_limits import (
    MAX_TRUNCATED_PROMPT_CHARS,
    InvalidRequestError,
    check_length,
    check_messages,
    check_prompt_chars,
    check_prompt_tokens,
    check_truncate_prompt_tokens,
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
    """Tokenizes exactly one of prompt / messages / prompt_token_ids, truncates it if asked, and
    checks its length."""
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
    keep = _kept_tokens(request, max_model_len)
    if field == "prompt_token_ids":
        if keep is not None:
            token_ids = token_ids[-keep:]
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
    if keep is not None:
        # It may be longer than max_model_len tokens (only its tail is kept), so the character
        # bound that says it cannot fit does not apply.
        check_length(field, text, MAX_TRUNCATED_PROMPT_CHARS, "characters")
        kept = await tokenizer.encode_last(text, add_special_tokens, keep)
        check_prompt_tokens(field, len(kept), max_model_len)
        return PromptInput(field, text, kept)
    check_prompt_chars(field, len(text), max_model_len, tokenizer.chars_per_token)
    encoding = await tokenizer.encode(text, add_special_tokens)
    # Counted before `.ids` builds a list of them (millions for a long prompt refused here).
    check_prompt_tokens(field, len(encoding), max_model_len)
    return PromptInput(field, text, encoding.ids)


def _kept_tokens(
    request: generate_service_pb2.GenerateRequest | generate_service_pb2.TokenizeRequest,
    max_model_len: int,
) -> int | None:
    """How many of the prompt's last tokens to keep; None = all (a TokenizeRequest has no
    truncate_prompt_tokens). Its lower bound is `check_shared_fields`'."""
    if not isinstance(request, generate_service_pb2.GenerateRequest) or not request.HasField(
        "truncate_prompt_tokens"
    ):
        return None
    check_truncate_prompt_tokens(request.truncate_prompt_tokens, max_model_len)
    return request.truncate_prompt_tokens
