"""n > 1 through real servers: the engine streams each sample under its index, the router
detokenizes each on its own (a stop string ends only its sample, which the engine then stops)
and counts the prompt once."""

import asyncio
import time
import urllib.request

import grpc

from llmserve.clients import Completion, LLMClient
from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc

PROMPT = [5, 17, 99, 230, 7]
SEEDED = {"temperature": 1.0, "seed": 4242, "ignore_eos": True}


def test_engine_generate_streams_each_sample_to_its_own_end(qwen3_system, engine_greedy) -> None:
    _, engine, _ = qwen3_system
    alone = engine_greedy(engine.address, PROMPT, 6)
    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        request = engine_service_pb2.EngineServiceGenerateRequest(
            prompt_token_ids=PROMPT,
            sampling=common_pb2.SamplingParams(temperature=0, n=3),
            stopping=common_pb2.StoppingCriteria(max_tokens=6, ignore_eos=True),
        )
        responses = list(stub.Generate(request, timeout=30))
    tokens: dict[int, list[int]] = {}
    ends = {}
    for response in responses:
        assert response.index not in ends, "a sample went on after its last response"
        tokens.setdefault(response.index, []).extend(response.token_ids)
        if response.finish_reason:
            ends[response.index] = response
    assert tokens == {i: alone for i in range(3)}
    assert {i: r.finish_reason for i, r in ends.items()} == {
        i: common_pb2.FINISH_REASON_LENGTH for i in range(3)}
    assert all(r.usage.prompt_tokens == len(PROMPT) and r.usage.completion_tokens == 6
               for r in ends.values())
    assert responses[-1].finish_reason  # the call ends with the last sample's end


def test_router_samples_reproduce_with_seed_plus_index(qwen3_system) -> None:
    _, _, router = qwen3_system
    with LLMClient(router.address) as client:
        three = client.generate_text(prompt_token_ids=PROMPT, max_tokens=12, n=3, **SEEDED)
        ones = [client.generate_text(prompt_token_ids=PROMPT, max_tokens=12,
                                     **{**SEEDED, "seed": SEEDED["seed"] + i}) for i in range(3)]
    assert [s.index for s in three.samples] == [0, 1, 2]
    assert [s.token_ids for s in three.samples] == [one.token_ids for one in ones]
    assert [s.text for s in three.samples] == [one.text for one in ones]
    assert len({tuple(s.token_ids) for s in three.samples}) == 3


def test_router_stop_string_ends_only_its_sample_and_usage_counts_the_prompt_once(
    qwen3_system,
) -> None:
    _, _, router = qwen3_system
    with LLMClient(router.address) as client:
        full = client.generate_text(prompt_token_ids=PROMPT, max_tokens=24, n=3, **SEEDED)
        text = full.samples[1].text
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        chunks = list(client.generate(prompt_token_ids=PROMPT, max_tokens=24, n=3, stop=[stop],
                                      **SEEDED))
    cut = Completion.from_chunks(chunks)
    assert len(stop) == 3 and stop in text
    for before, after in zip(full.samples, cut.samples, strict=True):
        assert after.text == before.text.split(stop)[0]
        assert after.finish_reason == ("stop" if stop in before.text else "length")
    assert cut.samples[1].finish_reason == "stop"
    assert [sum(c.finish_reason is not None for c in chunks if c.index == i)
            for i in range(3)] == [1, 1, 1]
    # Usage once, on the stream's last chunk: the prompt once, the tokens of every sample.
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(PROMPT)
    assert usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
    assert full.usage.completion_tokens == 3 * 24
    assert full.usage.prompt_tokens == len(PROMPT)


def _engine_generated_tokens(port: int) -> float:
    """An engine's llmserve_engine_generated_tokens_total, from its /metrics on `port`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("llmserve_engine_generated_tokens_total "))


def _wait_idle(engine_load, address: str) -> engine_service_pb2.WatchLoadResponse:
    deadline = time.monotonic() + 10
    while (load := engine_load(address)).num_running + load.num_waiting:
        assert time.monotonic() < deadline, "the engine still runs a stream"
        time.sleep(0.05)
    return load


def test_router_stop_string_stops_its_sample_on_the_engine(
    tiny_checkpoint, start_engine, start_router, unused_port, engine_load
) -> None:
    model_dir = tiny_checkpoint("qwen3")
    metrics_port = unused_port()
    engine = start_engine(model_dir, "--metrics-port", str(metrics_port))
    router = start_router(model_dir, [engine])
    max_tokens = 200
    with LLMClient(router.address) as client:
        full = client.generate_text(prompt_token_ids=PROMPT, max_tokens=max_tokens, n=3,
                                    **SEEDED)
        texts = [s.text for s in full.samples]
        # A stop string early in sample 1's text that samples 0 and 2 never produce.
        stop = next(texts[1][i : i + 4] for i in range(len(texts[1]) // 5)
                    if texts[1][i : i + 4] not in texts[0] + "\0" + texts[2])
        _wait_idle(engine_load, engine.address)
        before = _engine_generated_tokens(metrics_port)
        cut = client.generate_text(prompt_token_ids=PROMPT, max_tokens=max_tokens, n=3,
                                   stop=[stop], **SEEDED)
        _wait_idle(engine_load, engine.address)
        generated = _engine_generated_tokens(metrics_port) - before
    assert cut.samples[1].finish_reason == "stop"
    assert cut.samples[1].text == texts[1].split(stop)[0]
    for i in (0, 2):
        assert cut.samples[i].token_ids == full.samples[i].token_ids
        assert cut.samples[i].finish_reason == "length"
    # Sample 1 stopped on the engine a few tokens after its stop string, not at max_tokens.
    assert generated < 2 * max_tokens + len(cut.samples[1].token_ids) + 20 < 3 * max_tokens


def _run_streams(address: str, req, on_update) -> list:
    """Runs one GenerateStreams stream (id 1) to its end; `on_update(update)` may return actions
    to send. Every update in order."""

    async def run() -> list:
        async with grpc.aio.insecure_channel(address) as channel:
            call = engine_service_pb2_grpc.EngineServiceStub(channel).GenerateStreams()
            start = engine_service_pb2.StreamAction(stream_id=1, start=req)
            await call.write(engine_service_pb2.GenerateStreamsRequest(actions=[start]))
            seen = []
            sent = False
            async for message in call:
                for update in message.updates:
                    seen.append(update)
                    actions = None if sent else on_update(update)
                    if actions:
                        await call.write(engine_service_pb2.GenerateStreamsRequest(
                            actions=actions))
                        await call.done_writing()
                        sent = True
            return seen

    return asyncio.run(asyncio.wait_for(run(), 120))


def _sampled(n: int, max_tokens: int) -> engine_service_pb2.EngineServiceGenerateRequest:
    return engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=PROMPT,
        sampling=common_pb2.SamplingParams(temperature=1.0, seed=4242, n=n),
        stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
    )


def test_engine_cancel_sample_stops_it_and_frees_its_blocks(qwen3_system, engine_load) -> None:
    _, engine, _ = qwen3_system
    free_before = _wait_idle(engine_load, engine.address).num_free_blocks

    def cancel_one(update):
        if update.response.index == 1:
            return [engine_service_pb2.StreamAction(stream_id=1, cancel_sample=1)]
        return None

    seen = _run_streams(engine.address, _sampled(2, 200), cancel_one)
    assert not any(u.error_code for u in seen)
    tokens: dict[int, list[int]] = {0: [], 1: []}
    for update in seen:
        tokens[update.response.index].extend(update.response.token_ids)
    ends = {u.response.index: u.response.finish_reason for u in seen if u.response.finish_reason}
    assert ends == {0: common_pb2.FINISH_REASON_LENGTH}  # sample 1 never ends: it was stopped
    assert len(tokens[0]) == 200 and len(tokens[1]) < 200
    assert seen[-1].response.index == 0  # the stream ended with sample 0's end
    deadline = time.monotonic() + 10
    while _wait_idle(engine_load, engine.address).num_free_blocks != free_before:
        assert time.monotonic() < deadline, "the stopped sample's blocks were not freed"
        time.sleep(0.05)


def test_engine_cancel_sample_out_of_range_is_ignored(qwen3_system) -> None:
    _, engine, _ = qwen3_system

    def cancel_bad(update):
        return [engine_service_pb2.StreamAction(stream_id=1, cancel_sample=i) for i in (2, -1)]

    seen = _run_streams(engine.address, _sampled(2, 24), cancel_bad)
    assert not any(u.error_code for u in seen)
    ends = {u.response.index: u.response.finish_reason for u in seen if u.response.finish_reason}
    assert ends == {i: common_pb2.FINISH_REASON_LENGTH for i in range(2)}
    assert [sum(len(u.response.token_ids) for u in seen if u.response.index == i)
            for i in range(2)] == [24, 24]
