"""Conversions between the engine's gRPC messages and its internal requests and outputs."""

import uuid
from typing import TypeVar

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.message import Message

from llmserve.common.priority import PRIORITY_CLASS
from llmserve.common.request_limits import (
    InvalidRequestError,
    check_prompt_tokens,
    check_shared_fields,
    check_truncate_prompt_tokens,
)
from llmserve.engine_service.frontend.validation import check_vocabulary, sampling_options
from llmserve.engine_service.seam import (
    EngineInfo,
    EngineRequest,
    FinishReason,
    LoadSnapshot,
    RequestOutput,
    TokenLogprobs,
)
from llmserve.v1 import common_pb2, engine_service_pb2

FINISH_REASON = {
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
}

_Message = TypeVar("_Message", bound=Message)


def request_from_proto(
    msg: engine_service_pb2.EngineServiceGenerateRequest, info: EngineInfo
) -> EngineRequest:
    """Converts and validates a Generate request (raises InvalidRequestError)."""
    check_shared_fields(msg)
    token_ids = msg.prompt_token_ids
    if msg.HasField("truncate_prompt_tokens"):
        check_truncate_prompt_tokens(msg.truncate_prompt_tokens, info.max_model_len)
        token_ids = token_ids[-msg.truncate_prompt_tokens :]  # the last ones (vLLM's rule)
    # Counted before the copy: a 64 MiB message holds 16 million ids.
    check_prompt_tokens("prompt_token_ids", len(token_ids), info.max_model_len)
    prompt = list(token_ids)
    check_vocabulary("prompt_token_ids", prompt, info.vocab_size)
    options = sampling_options(info, len(prompt), msg.sampling, msg.stopping)
    resumed = msg.resumed_output_tokens
    if not 0 <= resumed < len(prompt):
        raise InvalidRequestError(
            f"resumed_output_tokens: {resumed} must be in [0, {len(prompt) - 1}] (the prompt's "
            "ids but one)"
        )
    # Internal ids are always unique: two callers may reuse the same request_id.
    return EngineRequest(
        request_id=f"{msg.request_id or 'req'}-{uuid.uuid4().hex[:12]}",
        prompt_token_ids=prompt,
        sampling=options,
        priority=PRIORITY_CLASS[msg.priority],
        tenant=msg.tenant,
        resumed_output_tokens=resumed,
    )


def response_from_outputs(
    outputs: list[RequestOutput],
) -> engine_service_pb2.EngineServiceGenerateResponse:
    """Merges one or more step outputs of one sample of a request into one streamed response.

    Built straight from the outputs, not as one response each merged afterwards: a lagging
    reader would cost a message per output. The router's merge of responses that queue there
    (`engine_link.merge_responses`) gives the same message.
    """
    last = outputs[-1]
    # Called once per message of every stream: one output (a reader keeping up) is the rule.
    token_ids = (
        last.new_token_ids
        if len(outputs) == 1
        else [token_id for out in outputs for token_id in out.new_token_ids]
    )
    response = engine_service_pb2.EngineServiceGenerateResponse(token_ids=token_ids,
                                                                index=last.index)
    for out in outputs:
        if out.new_logprobs:
            _add_logprobs(response.logprobs, out.new_logprobs)
        if out.prompt_logprobs:
            _add_logprobs(response.prompt_logprobs, out.prompt_logprobs)
    if last.finish_reason is not None:
        response.finish_reason = FINISH_REASON[last.finish_reason]
    usage = response.usage
    usage.prompt_tokens = last.prompt_tokens
    usage.completion_tokens = last.completion_tokens
    usage.cached_prompt_tokens = last.cached_prompt_tokens
    # Cumulative for the sample, like completion_tokens: the newest output's are the counts.
    usage.speculative_proposed_tokens = last.spec_proposed_tokens
    usage.speculative_accepted_tokens = last.spec_accepted_tokens
    return response


def _add_logprobs(field: RepeatedCompositeFieldContainer[common_pb2.TokenLogprob],
                  entries: list[TokenLogprobs]) -> None:
    for lp in entries:
        field.add(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )


def info_to_proto(info: EngineInfo) -> engine_service_pb2.GetInfoResponse:
    """`GetInfo`'s answer (EngineInfo's tensor_parallel_size is not in it)."""
    return _by_field_name(engine_service_pb2.GetInfoResponse, info)


def load_to_proto(load: LoadSnapshot) -> engine_service_pb2.WatchLoadResponse:
    """One `WatchLoad` message."""
    return _by_field_name(engine_service_pb2.WatchLoadResponse, load)


def _by_field_name(message_type: type[_Message], source: object) -> _Message:
    """A message whose every field is `source`'s attribute of the same name: the message lists
    the fields, so one added to it and to the seam's dataclass needs no code here."""
    fields = message_type.DESCRIPTOR.fields_by_name
    return message_type(**{name: getattr(source, name) for name in fields})
