"""A Generate call's responses from engine chunks of several samples: text and finish per
sample, a stop string ending only its sample (and asking its engine to stop it), usage once."""

import asyncio
from pathlib import Path

import pytest

from llmserve.engine_service.demo_model import build_tokenizer, write_tokenizer
from llmserve.router.sample_responses import SampleResponses
from llmserve.router.tokenizer import TextTokenizer
from llmserve.v1 import common_pb2, engine_service_pb2, generate_service_pb2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    out: Path = tmp_path_factory.mktemp("tok")
    write_tokenizer(build_tokenizer(), out, 512)
    return TextTokenizer.from_model_dir(out)


def chunk(tokenizer: TextTokenizer, index: int, text: str, finish: int = 0,
          cached: int = 0, speculative: tuple[int, int] = (0, 0),
          ) -> engine_service_pb2.EngineServiceGenerateResponse:
    proposed, accepted = speculative
    return engine_service_pb2.EngineServiceGenerateResponse(
        token_ids=asyncio.run(tokenizer.encode(text)).ids, index=index,
        finish_reason=finish, usage=common_pb2.Usage(
            cached_prompt_tokens=cached, speculative_proposed_tokens=proposed,
            speculative_accepted_tokens=accepted))


def test_samples_end_on_their_own_and_usage_counts_the_prompt_once(
    tokenizer: TextTokenizer,
) -> None:
    request = generate_service_pb2.GenerateRequest(
        prompt="hi", stop=["STOP"], sampling=common_pb2.SamplingParams(n=3))
    responses = SampleResponses(request, "r", prompt_tokens=7, tokenizer=tokenizer)
    assert responses.stops is not None
    length = common_pb2.FINISH_REASON_LENGTH

    chunks = [chunk(tokenizer, 0, "alpha ", cached=4), chunk(tokenizer, 1, "beta STOP x"),
              chunk(tokenizer, 1, "more"), chunk(tokenizer, 2, "gamma", length),
              chunk(tokenizer, 0, "end", length)]

    async def run() -> list[generate_service_pb2.GenerateResponse | None]:
        return [await responses.respond(c) for c in chunks]

    out = asyncio.run(run())
    assert out[1] is not None and out[1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert "STOP" not in out[1].text and out[1].index == 1
    assert responses.stops.done == {1}  # the engine is asked to stop sample 1
    assert out[2] is None  # sample 1's tokens in flight are dropped
    assert out[3] is not None and not out[3].HasField("usage")  # sample 0 still runs
    last = out[4]
    assert last is not None and responses.done and last.index == 0
    assert last.usage.prompt_tokens == 7 and last.usage.cached_prompt_tokens == 4
    relayed = sum(len(r.token_ids) for r in out if r is not None)
    assert last.usage.completion_tokens == relayed


def test_one_sample_asks_no_engine_to_stop_it(tokenizer: TextTokenizer) -> None:
    request = generate_service_pb2.GenerateRequest(prompt="hi", stop=["STOP"])
    responses = SampleResponses(request, "r", prompt_tokens=2, tokenizer=tokenizer)
    assert responses.stops is None
    one = chunk(tokenizer, 0, "a STOP b")
    last = asyncio.run(responses.respond(one))
    assert last is not None and responses.done
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP and last.usage.prompt_tokens == 2


def test_speculative_counts_are_each_samples_newest_summed(tokenizer: TextTokenizer) -> None:
    request = generate_service_pb2.GenerateRequest(
        prompt="hi", stop=["STOP"], sampling=common_pb2.SamplingParams(n=3))
    responses = SampleResponses(request, "r", prompt_tokens=2, tokenizer=tokenizer)
    length = common_pb2.FINISH_REASON_LENGTH
    # Each engine response has its sample's counts so far; sample 1's stop string ends it, and
    # its response still in flight (its later counts) is dropped with its tokens.
    chunks = [chunk(tokenizer, 0, "alpha ", speculative=(4, 3)),
              chunk(tokenizer, 1, "beta STOP", speculative=(4, 1)),
              chunk(tokenizer, 1, "more", speculative=(8, 2)),
              chunk(tokenizer, 2, "gamma", length),
              chunk(tokenizer, 0, "end", length, speculative=(12, 9))]

    async def run() -> list[generate_service_pb2.GenerateResponse | None]:
        return [await responses.respond(c) for c in chunks]

    out = asyncio.run(run())
    assert out[2] is None and not any(r.HasField("usage") for r in out[:4] if r is not None)
    last = out[4]
    assert last is not None and responses.done
    assert last.usage.speculative_proposed_tokens == 12 + 4 + 0
    assert last.usage.speculative_accepted_tokens == 9 + 1 + 0
