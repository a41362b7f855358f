"""Penalties, logit_bias and min_tokens from a client through the router to a real engine."""

from llmserve.clients import LLMClient


def test_logit_bias_and_min_tokens_reach_the_engine(qwen3_system) -> None:
    _, _, router = qwen3_system
    prompt = [5, 17, 99, 230, 7]
    with LLMClient(router.address) as client:
        forced = client.generate_text(prompt_token_ids=prompt, temperature=0.0, max_tokens=5,
                                      logit_bias={123: 100.0}, ignore_eos=True)
        assert forced.token_ids == [123] * 5
        free = client.generate_text(prompt_token_ids=prompt, temperature=0.0, max_tokens=12,
                                    ignore_eos=True, repetition_penalty=1.5)
        stop = free.token_ids[1]
        early = client.generate_text(prompt_token_ids=prompt, temperature=0.0, max_tokens=12,
                                     ignore_eos=True, repetition_penalty=1.5,
                                     stop_token_ids=[stop])
        held = client.generate_text(prompt_token_ids=prompt, temperature=0.0, max_tokens=12,
                                    ignore_eos=True, repetition_penalty=1.5,
                                    stop_token_ids=[stop], min_tokens=6)
    assert early.finish_reason == "stop" and len(early.token_ids) <= 2
    assert stop not in held.token_ids[:6] and len(held.token_ids) >= 6
