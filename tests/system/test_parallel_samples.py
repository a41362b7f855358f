"""n > 1 through real servers: the engine streams each sample under its index, the router
detokenizes each on its own (a stop string ends only its sample) and counts the prompt once."""

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
