"""Router tier over several real engines: prefix-aware placement and mid-stream failover."""

import time
from types import SimpleNamespace

import pytest

from llmserve.clients import LLMClient
from llmserve.common.ports import ephemeral_port


def routed_engine(router, request_id: str) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for event in router.log_events():
            if event.get("event") == "request_routed" and event["request_id"] == request_id:
                return event["engine"]
        time.sleep(0.05)
    raise AssertionError(f"{request_id} was never routed")


@pytest.mark.parametrize(
    "engine_flags", [(), ("--no-kv-events",)], ids=["kv-events", "routing-history"]
)
def test_requests_sharing_a_prefix_follow_it(
    tiny_checkpoint, start_engine, start_router, engine_flags
) -> None:
    # Without KV events the router indexes each engine by what it routed there.
    model = tiny_checkpoint("qwen3")
    engines = [start_engine(model, *engine_flags) for _ in range(2)]
    router = start_router(model, engines)
    prefix = list(range(100, 196))  # six full blocks
    with LLMClient(router.address) as client:
        first = client.generate_text(prompt_token_ids=[*prefix, 1], max_tokens=2, request_id="p0")
        assert first.usage.cached_prompt_tokens == 0
        home = routed_engine(router, "p0")
        for i in range(1, 5):
            result = client.generate_text(
                prompt_token_ids=[*prefix, 1 + i], max_tokens=2, request_id=f"p{i}"
            )
            assert routed_engine(router, f"p{i}") == home
            assert result.usage.cached_prompt_tokens == len(prefix)
        # An unrelated prompt goes to the idle engine, not the one holding the prefix.
        client.generate_text(
            prompt_token_ids=list(range(300, 400)), max_tokens=2, request_id="other"
        )
        assert routed_engine(router, "other") != home


def test_engine_killed_mid_stream_stream_continues_exactly(
    tiny_checkpoint, start_engine, start_router, engine_greedy
) -> None:
    model = tiny_checkpoint("qwen3")
    engines = [start_engine(model) for _ in range(2)]
    router = start_router(model, engines)
    prompt = [7, 8, 9, 10, 11]
    undisturbed = engine_greedy(engines[1].address, prompt, 300)
    with LLMClient(router.address) as client:
        received: list[int] = []
        killed = None
        for chunk in client.generate(
            prompt_token_ids=prompt,
            temperature=0.0,
            max_tokens=300,
            ignore_eos=True,
            request_id="survivor",
        ):
            received.extend(chunk.token_ids)
            if killed is None and len(received) >= 20:
                address = routed_engine(router, "survivor")
                killed = next(e for e in engines if e.address == address)
                killed.process.kill()
            final = chunk
    assert killed is not None
    assert received == undisturbed  # nothing duplicated, nothing lost
    assert final.finish_reason == "length" and final.usage.completion_tokens == 300
    assert final.usage.prompt_tokens == len(prompt)
    failovers = [e for e in router.log_events() if e.get("event") == "engine_failed_over"]
    assert failovers and failovers[0]["stage"] == "mid_stream"
    deadline = time.monotonic() + 2
    while not any(e.get("event") == "engine_left" for e in router.log_events()):
        assert time.monotonic() < deadline, "the dead engine did not leave the pool within 2 s"
        time.sleep(0.05)


def test_engine_killed_mid_stream_each_sample_continues_exactly(
    tiny_checkpoint, start_engine, start_router
) -> None:
    # n = 3: each unfinished sample resumes on the other engine as a request of its own.
    model = tiny_checkpoint("qwen3")
    engines = [start_engine(model) for _ in range(2)]
    router = start_router(model, engines)
    prompt = [7, 8, 9, 10, 11]
    options = {"temperature": 1.0, "seed": 99, "max_tokens": 200, "ignore_eos": True, "n": 3}
    with LLMClient(router.address) as client:
        undisturbed = client.generate_text(prompt_token_ids=prompt, **options)
        received: dict[int, list[int]] = {0: [], 1: [], 2: []}
        killed = None
        for chunk in client.generate(prompt_token_ids=prompt, request_id="samples", **options):
            received[chunk.index].extend(chunk.token_ids)
            if killed is None and min(map(len, received.values())) >= 10:
                address = routed_engine(router, "samples")
                killed = next(e for e in engines if e.address == address)
                killed.process.kill()
            final = chunk
    assert killed is not None
    assert received == {s.index: s.token_ids for s in undisturbed.samples}
    assert len({tuple(tokens) for tokens in received.values()}) == 3
    assert final.usage.prompt_tokens == len(prompt)
    assert final.usage.completion_tokens == 3 * 200
    failovers = [e for e in router.log_events() if e.get("event") == "engine_failed_over"]
    assert failovers and failovers[0]["stage"] == "mid_stream"


def test_fresh_router_replica_routes_with_the_full_index_at_once(
    tiny_checkpoint, start_engine, start_router
) -> None:
    model = tiny_checkpoint("qwen3")
    engines = [start_engine(model) for _ in range(2)]
    first_router = start_router(model, engines)
    prefixes = [list(range(100 * i + 10, 100 * i + 106)) for i in range(1, 5)]
    with LLMClient(first_router.address) as client:
        for i, prefix in enumerate(prefixes):
            client.generate_text(prompt_token_ids=[*prefix, 1], max_tokens=2, request_id=f"a{i}")
    homes = [routed_engine(first_router, f"a{i}") for i in range(len(prefixes))]
    assert len(set(homes)) == 2  # cold prefixes spread over both engines
    started = time.monotonic()
    second_router = start_router(model, engines)
    with LLMClient(second_router.address) as client:
        for i, prefix in enumerate(prefixes):
            result = client.generate_text(
                prompt_token_ids=[*prefix, 2], max_tokens=2, request_id=f"b{i}"
            )
            # The new replica sends each prompt where its prefix already is, as the first did.
            assert routed_engine(second_router, f"b{i}") == homes[i]
            assert result.usage.cached_prompt_tokens == len(prefix)
    assert time.monotonic() - started < 15


def test_router_with_an_engine_that_never_answers_serves_after_the_start_up_sync(
    tiny_checkpoint, start_engine, start_router
) -> None:
    # The router waits for every engine it was given before SERVING, but not for ever.
    model = tiny_checkpoint("qwen3")
    silent = SimpleNamespace(address=f"127.0.0.1:{ephemeral_port()}")
    started = time.monotonic()
    router = start_router(model, [start_engine(model), silent])
    assert time.monotonic() - started < 30
    ready = next(e for e in router.log_events() if e.get("event") == "ready")
    assert len(ready["engines"]) == 1
    with LLMClient(router.address) as client:
        assert client.generate_text(prompt_token_ids=[5, 6, 7], max_tokens=2).token_ids
