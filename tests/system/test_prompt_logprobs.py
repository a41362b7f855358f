"""Prompt logprobs through real processes: on the engine's first response, and on the router's
first response with the alternatives' text; equal to transformers' log-softmax."""

import grpc
import torch
import transformers

from llmserve.clients import LLMClient
from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc

PROMPT = list(range(60, 100))  # several blocks, so a second request could hit the cache


def test_router_sends_prompt_logprobs_with_text_on_the_first_response(qwen3_system) -> None:
    model_dir, _, router = qwen3_system
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0], dim=-1)
    with LLMClient(router.address) as client:
        for attempt in range(2):  # the second finds the prompt cached, and computes it again
            chunks = list(client.generate(prompt_token_ids=PROMPT, prompt_logprobs=2,
                                          temperature=0.0, max_tokens=4, ignore_eos=True,
                                          timeout=30))
            first = chunks[0].prompt_logprobs
            assert [lp.token_id for lp in first] == PROMPT[1:], attempt
            assert all(not c.prompt_logprobs for c in chunks[1:])
            assert chunks[-1].usage.cached_prompt_tokens == 0
            for position, lp in enumerate(first):
                row = expected[position]
                assert abs(lp.logprob - row[PROMPT[position + 1]].item()) < 1e-4
                top_values, top_ids = row.topk(2)
                assert [t.token_id for t in lp.top] == top_ids.tolist()
                assert [t.text for t in lp.top] == [
                    hf_tokenizer.decode([t]) for t in top_ids.tolist()]
                assert abs(lp.top[0].logprob - top_values[0].item()) < 1e-4
        # The blocks were cached: a request that does not ask is served from them.
        plain = client.generate_text(prompt_token_ids=PROMPT, max_tokens=1, timeout=30)
        assert plain.usage.cached_prompt_tokens > 0 and not plain.prompt_logprobs


def test_engine_sends_prompt_logprobs_on_its_first_response_only(qwen3_system) -> None:
    _, engine, _ = qwen3_system
    request = engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=PROMPT[:7],
        sampling=common_pb2.SamplingParams(temperature=0, prompt_logprobs=0),
        stopping=common_pb2.StoppingCriteria(max_tokens=3, ignore_eos=True),
    )
    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        responses = list(stub.Generate(request, timeout=30))
    assert [lp.token_id for lp in responses[0].prompt_logprobs] == PROMPT[1:7]
    assert all(not lp.top_logprobs for lp in responses[0].prompt_logprobs)
    assert all(lp.logprob < 0 for lp in responses[0].prompt_logprobs)
    assert all(not r.prompt_logprobs for r in responses[1:])
