"""The engine's own checks of a request, after the bounds both tiers share (`request_limits`):
its token ids must lie in the model's vocabulary. Each failure names the field and the limit."""

from collections.abc import Sequence

from llmserve.common.request_limits import (
    InvalidRequestError,
    check_prompt_tokens,
    resolve_max_tokens,
)
from llmserve.engine_service.seam import EngineInfo, SamplingOptions, StructuredOutputSpec
from llmserve.v1 import common_pb2


def check_vocabulary(field: str, token_ids: Sequence[int], vocab_size: int) -> None:
    # min/max run in C; the scan that names the culprit runs only for a bad list.
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
        bad = next(t for t in token_ids if not 0 <= t < vocab_size)
        raise InvalidRequestError(
            f"{field}: token id {bad} is outside the vocabulary [0, {vocab_size})"
        )


def check_prompt(token_ids: list[int], info: EngineInfo, field: str = "prompt_token_ids") -> None:
    check_prompt_tokens(field, len(token_ids), info.max_model_len)
    check_vocabulary(field, token_ids, info.vocab_size)


def sampling_options(
    info: EngineInfo,
    prompt_len: int,
    sampling: common_pb2.SamplingParams,
    stopping: common_pb2.StoppingCriteria,
) -> SamplingOptions:
    """The request's options with their defaults filled in; its fields already met the shared
    bounds (`request_limits.check_shared_fields`)."""
    stop_token_ids = tuple(stopping.stop_token_ids)
    check_vocabulary("stopping.stop_token_ids", stop_token_ids, info.vocab_size)
    logit_bias = tuple((entry.token_id, entry.bias) for entry in sampling.logit_bias)
    check_vocabulary("sampling.logit_bias", [token for token, _ in logit_bias], info.vocab_size)
    return SamplingOptions(
        temperature=sampling.temperature if sampling.HasField("temperature") else 1.0,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        seed=sampling.seed if sampling.HasField("seed") else None,
        logprobs=sampling.logprobs if sampling.HasField("logprobs") else None,
        max_tokens=resolve_max_tokens(
            stopping, info.max_model_len, prompt_len, info.max_tokens_default
        ),
        stop_token_ids=stop_token_ids,
        ignore_eos=stopping.ignore_eos,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=(
            sampling.repetition_penalty if sampling.HasField("repetition_penalty") else 1.0
        ),
        logit_bias=logit_bias,
        min_tokens=stopping.min_tokens,
        structured_output=structured_output_spec(sampling),
        n=sampling.n if sampling.HasField("n") else 1,
        prompt_logprobs=(
            sampling.prompt_logprobs if sampling.HasField("prompt_logprobs") else None
        ),
        # Unset: None, the engine's --num-speculative-tokens (the core caps a request's ask).
        speculative_tokens=(
            sampling.speculative_tokens if sampling.HasField("speculative_tokens") else None
        ),
    )


def structured_output_spec(sampling: common_pb2.SamplingParams) -> StructuredOutputSpec | None:
    """The request's constraint, its bounds already checked (`request_limits`); the core
    compiles it and refuses what does not compile."""
    if not sampling.HasField("structured_output"):
        return None
    spec = sampling.structured_output
    kind = spec.WhichOneof("kind")
    if kind == "choice":
        return StructuredOutputSpec(kind, tuple(spec.choice.choices))
    return StructuredOutputSpec(kind, "" if kind == "json_object" else getattr(spec, kind))
