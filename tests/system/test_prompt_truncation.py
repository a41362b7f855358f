"""truncate_prompt_tokens through a real router and engine (the tiny Qwen3, max_model_len 512):
the prompt's last k tokens are served, a text too long to fit is served once truncated, and k
outside [1, max_model_len - 1] gets INVALID_ARGUMENT naming the field on both tiers."""

from pathlib import Path

import grpc
import pytest
from tokenizers import Tokenizer

from llmserve.clients import Completion, LLMClient
from llmserve.common import request_limits as limits
from llmserve.router.tokenizer import max_chars_per_token
from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc

MAX_MODEL_LEN = 512  # the tiny checkpoint's max_position_embeddings
GREEDY = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}
WORDS = "the quick brown fox jumps over a lazy dog while seven owls watch it from an oak"


def long_text(model_dir: Path) -> tuple[str, list[int]]:
    """A text past the router's character bound (it could never fit untruncated), and its ids."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    per_token = max_chars_per_token(tokenizer)
    assert per_token is not None
    text = WORDS
    while len(text) <= (MAX_MODEL_LEN - 1) * per_token:
        text += f" {WORDS} {len(text)}"
    return text, tokenizer.encode(text).ids


def same_output(truncated: Completion, expected: Completion, keep: int) -> None:
    assert truncated.usage is not None and truncated.usage.prompt_tokens == keep
    assert truncated.token_ids == expected.token_ids and truncated.text == expected.text


def test_router_serves_the_last_k_tokens_of_every_kind_of_prompt(qwen3_system) -> None:
    _, _, router = qwen3_system
    chat = [{"role": "user", "content": f"{WORDS}. {WORDS}?"}]
    with LLMClient(router.address) as client:
        prompt_ids = client.tokenize(WORDS)
        chat_ids = client.tokenize(messages=chat)
        for keep in (1, 7, len(prompt_ids) - 1, len(prompt_ids), len(prompt_ids) + 50):
            same_output(
                client.generate_text(WORDS, truncate_prompt_tokens=keep, **GREEDY),
                client.generate_text(prompt_token_ids=prompt_ids[-keep:], **GREEDY),
                min(keep, len(prompt_ids)),
            )
        # After the chat template.
        same_output(
            client.generate_text(messages=chat, truncate_prompt_tokens=9, **GREEDY),
            client.generate_text(prompt_token_ids=chat_ids[-9:], **GREEDY),
            9,
        )
        same_output(
            client.generate_text(prompt_token_ids=chat_ids, truncate_prompt_tokens=5, **GREEDY),
            client.generate_text(prompt_token_ids=chat_ids[-5:], **GREEDY),
            5,
        )


def test_a_text_too_long_to_fit_is_served_only_when_truncated(qwen3_system) -> None:
    model_dir, _, router = qwen3_system
    text, ids = long_text(model_dir)
    assert len(ids) >= MAX_MODEL_LEN
    with LLMClient(router.address) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.generate_text(text, **GREEDY)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt:" in refused.value.details()
        for keep in (100, MAX_MODEL_LEN - 1):
            greedy = {**GREEDY, "max_tokens": min(6, MAX_MODEL_LEN - keep)}
            same_output(
                client.generate_text(text, truncate_prompt_tokens=keep, **greedy),
                client.generate_text(prompt_token_ids=ids[-keep:], **greedy),
                keep,
            )
        # Still bounded before tokenizing.
        huge = "a" * (limits.MAX_TRUNCATED_PROMPT_CHARS + 1)
        with pytest.raises(grpc.RpcError) as refused:
            client.generate_text(huge, truncate_prompt_tokens=10, max_tokens=1)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"the limit is {limits.MAX_TRUNCATED_PROMPT_CHARS}" in refused.value.details()


def engine_generate(address: str, prompt: list[int], truncate: int | None
                    ) -> list[engine_service_pb2.EngineServiceGenerateResponse]:
    request = engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(temperature=0),
        stopping=common_pb2.StoppingCriteria(max_tokens=6, ignore_eos=True),
        truncate_prompt_tokens=truncate,
    )
    with grpc.insecure_channel(address) as channel:
        return list(engine_service_pb2_grpc.EngineServiceStub(channel).Generate(request,
                                                                                 timeout=30))


def test_engine_generate_serves_the_last_k_ids(qwen3_system) -> None:
    _, engine, _ = qwen3_system
    prompt = [(7 * i) % 600 + 3 for i in range(MAX_MODEL_LEN + 100)]  # too long untruncated
    truncated = engine_generate(engine.address, prompt, 40)
    expected = engine_generate(engine.address, prompt[-40:], None)
    assert truncated[-1].usage.prompt_tokens == 40
    assert [t for r in truncated for t in r.token_ids] == [t for r in expected for t in r.token_ids]


@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        (0, "truncate_prompt_tokens: 0 must be >= 1"),
        (-3, "truncate_prompt_tokens: -3 must be >= 1"),
        (MAX_MODEL_LEN, f"truncate_prompt_tokens: {MAX_MODEL_LEN}; the limit is 511"),
        (10**6, "truncate_prompt_tokens: 1000000; the limit is 511"),
    ],
)
def test_both_tiers_refuse_k_out_of_bounds(qwen3_system, keep: int, expected: str) -> None:
    _, engine, router = qwen3_system
    with LLMClient(router.address) as client, pytest.raises(grpc.RpcError) as refused:
        client.generate_text(WORDS, truncate_prompt_tokens=keep, max_tokens=2)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in refused.value.details()
    with pytest.raises(grpc.RpcError) as refused:
        engine_generate(engine.address, [5, 6, 7], keep)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in refused.value.details()
