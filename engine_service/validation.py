"""Checks a request against the engine's limits; each failure names the field and the limit."""

from llmserve.engine_service.engine_builder import EngineInfo
from llmserve.engine_service.request import SamplingOptions

MAX_LOGPROBS = 20


class InvalidRequestError(ValueError):
    """A request field is out of range; the message names the field and its limit."""


def check_prompt(token_ids: list[int], info: EngineInfo, field: str = "prompt_token_ids") -> None:
    if not token_ids:
        raise InvalidRequestError(f"{field}: must not be empty")
    if len(token_ids) >= info.max_model_len:
        raise InvalidRequestError(
            f"{field}: {len(token_ids)} tokens; the limit is {info.max_model_len - 1} "
            f"(max_model_len {info.max_model_len} minus at least one generated token)"
        )
    # min/max run in C; the scan that names the culprit runs only for a bad prompt.
    if min(token_ids) < 0 or max(token_ids) >= info.vocab_size:
        bad = next(t for t in token_ids if not 0 <= t < info.vocab_size)
        raise InvalidRequestError(
            f"{field}: token id {bad} is outside the vocabulary [0, {info.vocab_size})"
        )


def sampling_options(
    info: EngineInfo,
    prompt_len: int,
    *,
    temperature: float | None,
    top_p: float | None,
    top_k: int,
    min_p: float,
    seed: int | None,
    logprobs: int | None,
    max_tokens: int | None,
    stop_token_ids: list[int],
    ignore_eos: bool,
) -> SamplingOptions:
    """Validates sampling and stopping fields and fills in their defaults."""
    room = info.max_model_len - prompt_len
    if temperature is not None and not temperature >= 0:
        raise InvalidRequestError(f"sampling.temperature: {temperature} must be >= 0")
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidRequestError(f"sampling.top_p: {top_p} must be in (0, 1]")
    if top_k < 0:
        raise InvalidRequestError(f"sampling.top_k: {top_k} must be >= 0 (0 = off)")
    if not 0 <= min_p <= 1:
        raise InvalidRequestError(f"sampling.min_p: {min_p} must be in [0, 1]")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise InvalidRequestError(f"sampling.logprobs: {logprobs} must be in [0, {MAX_LOGPROBS}]")
    if max_tokens is not None and max_tokens <= 0:
        raise InvalidRequestError(f"stopping.max_tokens: {max_tokens} must be >= 1")
    if max_tokens is not None and max_tokens > room:
        raise InvalidRequestError(
            f"stopping.max_tokens: {max_tokens} exceeds the limit {room} "
            f"(max_model_len {info.max_model_len} minus {prompt_len} prompt tokens)"
        )
    bad = next((t for t in stop_token_ids if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            f"stopping.stop_token_ids: {bad} is outside the vocabulary [0, {info.vocab_size})"
        )
    return SamplingOptions(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        logprobs=logprobs,
        max_tokens=max_tokens if max_tokens is not None else min(info.max_tokens_default, room),
        stop_token_ids=tuple(stop_token_ids),
        ignore_eos=ignore_eos,
    )
