"""A stream that fails over: the request's speculative_tokens reaches every engine it is sent
to, and the speculative decoding counts of the engine it left add to the next one's."""

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from llmserve.router.balancer import Balancer
from llmserve.router.config import Policy
from llmserve.router.engine_link import StreamError
from llmserve.router.engine_pool import Engine
from llmserve.router.forwarding import ForwardedRequest, Forwarder
from llmserve.router.hash_check import HashSelfCheck
from llmserve.router.prefix_index import PrefixIndex
from llmserve.v1 import common_pb2, engine_service_pb2

_Response = engine_service_pb2.EngineServiceGenerateResponse
PROMPT = [5, 6, 7]  # shorter than a block: nothing to hash
LENGTH = common_pb2.FINISH_REASON_LENGTH


def response(index: int, tokens: list[int], completion: int, proposed: int, accepted: int,
             finish: int = 0) -> _Response:
    return _Response(token_ids=tokens, index=index, finish_reason=finish, usage=common_pb2.Usage(
        prompt_tokens=len(PROMPT), completion_tokens=completion,
        speculative_proposed_tokens=proposed, speculative_accepted_tokens=accepted))


class ScriptedLink:
    """An engine link that answers each request with `script(request)`: its responses, and
    whether the engine then fails (UNAVAILABLE, which the router fails over)."""

    def __init__(self, script: Callable[[dict], tuple[list[_Response], bool]],
                 sent: list[dict]) -> None:
        self.script = script
        self.sent = sent  # every engine's requests, in the order they were sent

    async def stream(self, request: dict, deadline: float | None, num_samples: int = 1,
                     stops: object = None) -> AsyncIterator[_Response]:
        self.sent.append(request)
        responses, fails = self.script(request)
        for item in responses:
            await asyncio.sleep(0)
            yield item
        if fails:
            raise StreamError(grpc.StatusCode.UNAVAILABLE, "engine went away")


class Pool:
    def __init__(self, engines: list[Engine]) -> None:
        self.engines = engines

    def ready_engines(self) -> list[Engine]:
        return self.engines


def engines(script: Callable[[dict], tuple[list[_Response], bool]], count: int,
            sent: list[dict]) -> list[Engine]:
    info = engine_service_pb2.GetInfoResponse(block_size=16, max_num_seqs=8)
    return [Engine(address=f"engine-{i}", channel=None, stub=None,  # type: ignore[arg-type]
                   link_channel=None, link=ScriptedLink(script, sent), info=info)  # type: ignore[arg-type]
            for i in range(count)]


def forward(pool_engines: list[Engine], n: int) -> list[_Response]:
    index = PrefixIndex()
    forwarder = Forwarder(Pool(pool_engines), index, Balancer(Policy.ROUND_ROBIN),  # type: ignore[arg-type]
                          HashSelfCheck(index))
    request = ForwardedRequest(
        request_id="r", prompt_token_ids=PROMPT,
        sampling=common_pb2.SamplingParams(temperature=0, n=n, speculative_tokens=3),
        max_tokens=4, stopping=common_pb2.StoppingCriteria(max_tokens=4), priority=1, tenant="")

    async def run() -> list[_Response]:
        return [chunk async for chunk in forwarder.stream(request, None)]

    return asyncio.run(run())


def test_counts_of_the_failed_engine_add_to_the_next_ones() -> None:
    def script(request: dict) -> tuple[list[_Response], bool]:
        if not request["resumed_output_tokens"]:
            # Two tokens of four, then the engine fails.
            return [response(0, [10], 1, 4, 2), response(0, [11], 2, 6, 3)], True
        # The resumed request: the other engine counts its own, from zero.
        return [response(0, [12], 1, 2, 1), response(0, [13], 2, 4, 1, LENGTH)], False

    requests: list[dict] = []
    chunks = forward(engines(script, 2, requests), n=1)
    assert [list(c.token_ids) for c in chunks] == [[10], [11], [12], [13]]
    assert [(c.usage.speculative_proposed_tokens, c.usage.speculative_accepted_tokens)
            for c in chunks] == [(4, 2), (6, 3), (8, 4), (10, 4)]
    assert [r["resumed_output_tokens"] for r in requests] == [0, 2]
    assert all(r["sampling"].speculative_tokens == 3 for r in requests)


def test_each_resumed_sample_keeps_its_own_counts() -> None:
    def script(request: dict) -> tuple[list[_Response], bool]:
        if not request["resumed_output_tokens"]:
            return [response(0, [10], 1, 3, 2), response(1, [20], 1, 5, 0)], True
        # Each unfinished sample on its own (n = 1, so index 0), finishing.
        last = request["prompt_token_ids"][-1]
        return [response(0, [last + 1], 1, 1, 1, LENGTH)], False

    requests: list[dict] = []
    chunks = forward(engines(script, 3, requests), n=2)
    final = {c.index: c for c in chunks if c.finish_reason == LENGTH}
    assert sorted(final) == [0, 1]
    assert (final[0].usage.speculative_proposed_tokens,
            final[0].usage.speculative_accepted_tokens) == (3 + 1, 2 + 1)
    assert (final[1].usage.speculative_proposed_tokens,
            final[1].usage.speculative_accepted_tokens) == (5 + 1, 0 + 1)
    assert len(requests) == 3 and all(r["sampling"].speculative_tokens == 3 for r in requests)
    assert [r["sampling"].HasField("n") for r in requests].count(False) == 2  # one per sample
