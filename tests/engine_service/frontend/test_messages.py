"""GetInfo and WatchLoad messages carry the seam's values, field by field; a Generate request's
sampling and stopping fields reach the seam's SamplingOptions, and a response's usage carries
its outputs' counts."""

import pytest

from llmserve.common.request_limits import InvalidRequestError
from llmserve.engine_service.frontend.messages import (
    info_to_proto,
    load_to_proto,
    request_from_proto,
    response_from_outputs,
)
from llmserve.engine_service.seam import EngineInfo, FinishReason, LoadSnapshot, RequestOutput
from llmserve.v1 import common_pb2, engine_service_pb2

INFO = EngineInfo(
    model="qwen3", architecture="Qwen3ForCausalLM", vocab_size=151936, max_model_len=4096,
    block_size=16, num_blocks=900, max_num_seqs=64, max_num_batched_tokens=2048,
    block_hash_algorithm="xxh3_64", block_hash_seed=2**63 + 5, eos_token_ids=(1, 2),
    attention_backend="triton", dtype="bfloat16", tensor_parallel_size=2, device="cuda:0",
    max_tokens_default=256,
)


def test_generate_request_carries_penalties_logit_bias_and_min_tokens() -> None:
    message = engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=[5, 6, 7],
        sampling=common_pb2.SamplingParams(
            presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.25,
            logit_bias=[common_pb2.LogitBias(token_id=9, bias=-100.0),
                        common_pb2.LogitBias(token_id=151935, bias=2.5)],
        ),
        stopping=common_pb2.StoppingCriteria(min_tokens=7, stop_token_ids=[4]),
    )
    options = request_from_proto(message, INFO).sampling
    assert (options.presence_penalty, options.frequency_penalty) == (0.5, -1.0)
    assert options.repetition_penalty == 1.25
    assert options.logit_bias == ((9, -100.0), (151935, 2.5))
    assert options.min_tokens == 7 and options.processes_logits
    plain = request_from_proto(
        engine_service_pb2.EngineServiceGenerateRequest(prompt_token_ids=[5]), INFO
    ).sampling
    assert plain.repetition_penalty == 1.0 and plain.min_tokens == 0
    assert not plain.processes_logits and not plain.keeps_token_state


@pytest.mark.parametrize("asked", [None, 0, 20])
def test_generate_request_carries_prompt_logprobs_set_or_not(asked: int | None) -> None:
    message = engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=[5, 6], sampling=common_pb2.SamplingParams(prompt_logprobs=asked))
    assert request_from_proto(message, INFO).sampling.prompt_logprobs == asked


@pytest.mark.parametrize(("asked", "samples"), [(None, 1), (1, 1), (16, 16)])
def test_generate_request_carries_n(asked: int | None, samples: int) -> None:
    message = engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=[5, 6], sampling=common_pb2.SamplingParams(n=asked))
    assert request_from_proto(message, INFO).sampling.n == samples


@pytest.mark.parametrize("asked", [0, 17])
def test_n_out_of_bounds_is_refused_naming_the_field(asked: int) -> None:
    message = engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=[5, 6], sampling=common_pb2.SamplingParams(n=asked))
    with pytest.raises(InvalidRequestError, match=r"^sampling\.n: \d+ must be in \[1, 16\]"):
        request_from_proto(message, INFO)


@pytest.mark.parametrize("asked", [None, 0, 3, 16])
def test_generate_request_carries_speculative_tokens_set_or_not(asked: int | None) -> None:
    message = engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=[5, 6], sampling=common_pb2.SamplingParams(speculative_tokens=asked))
    # None (unset) leaves the engine's --num-speculative-tokens; 0 is kept: no speculation.
    assert request_from_proto(message, INFO).sampling.speculative_tokens == asked


@pytest.mark.parametrize("asked", [-1, 17])
def test_speculative_tokens_out_of_bounds_is_refused_naming_the_field(asked: int) -> None:
    message = engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=[5, 6], sampling=common_pb2.SamplingParams(speculative_tokens=asked))
    with pytest.raises(InvalidRequestError,
                       match=r"^sampling\.speculative_tokens: -?\d+ must be in \[0, 16\]"):
        request_from_proto(message, INFO)


def test_usage_carries_the_samples_speculative_counts_so_far() -> None:
    outputs = [
        RequestOutput("r", [5, 6, 7], None, None, 4, 3, 0, spec_proposed_tokens=4,
                      spec_accepted_tokens=2),
        RequestOutput("r", [8], None, FinishReason.LENGTH, 4, 4, 0, spec_proposed_tokens=8,
                      spec_accepted_tokens=2),
    ]
    # Cumulative, like completion_tokens: a merged response has the newest output's counts.
    for sent, (proposed, accepted) in [(outputs[:1], (4, 2)), (outputs, (8, 2))]:
        usage = response_from_outputs(sent).usage
        assert (usage.speculative_proposed_tokens, usage.speculative_accepted_tokens) == (
            proposed, accepted)
    plain = response_from_outputs([RequestOutput("r", [5], completion_tokens=1)]).usage
    assert (plain.speculative_proposed_tokens, plain.speculative_accepted_tokens) == (0, 0)


def test_truncate_prompt_tokens_keeps_the_last_ids_before_the_length_check() -> None:
    too_long = list(range(10, 10 + INFO.max_model_len + 3))
    message = engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=too_long, truncate_prompt_tokens=4,
        stopping=common_pb2.StoppingCriteria(max_tokens=INFO.max_model_len - 4),
    )
    request = request_from_proto(message, INFO)
    assert request.prompt_token_ids == too_long[-4:]
    assert request.sampling.max_tokens == INFO.max_model_len - 4  # the room the kept ids leave
    message.truncate_prompt_tokens = len(too_long)
    expected = "truncate_prompt_tokens: 4099; the limit is 4095"
    with pytest.raises(InvalidRequestError, match=expected):
        request_from_proto(message, INFO)


def test_get_info_is_the_engine_info() -> None:
    info = EngineInfo(
        model="qwen3", architecture="Qwen3ForCausalLM", vocab_size=151936, max_model_len=4096,
        block_size=16, num_blocks=900, max_num_seqs=64, max_num_batched_tokens=2048,
        block_hash_algorithm="xxh3_64", block_hash_seed=2**63 + 5, eos_token_ids=(1, 2),
        attention_backend="triton", dtype="bfloat16", tensor_parallel_size=2, device="cuda:0",
        max_tokens_default=256,
    )
    message = info_to_proto(info)
    assert len(message.DESCRIPTOR.fields) == 15
    for name in message.DESCRIPTOR.fields_by_name:
        sent = getattr(message, name)
        assert (tuple(sent) if name == "eos_token_ids" else sent) == getattr(info, name), name


def test_watch_load_is_the_load_snapshot() -> None:
    message = load_to_proto(LoadSnapshot(3, 1, 40, 100, 2**40, (0, 3, 1)))
    assert (message.num_running, message.num_waiting, message.num_free_blocks,
            message.num_total_blocks, message.queued_prefill_tokens) == (3, 1, 40, 100, 2**40)
    assert list(message.requests_per_priority) == [0, 3, 1]
