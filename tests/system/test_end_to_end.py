"""Client → router → engine, all real processes: greedy output equals transformers' generate."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from llmserve.clients import LLMClient

PROMPTS = ["Hello, how are you?", "The quick brown fox", "Prefix caching lets requests", "東京 😀"]
MESSAGES = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again."},
    ],
]
MAX_TOKENS = 10


def hf_greedy(model, prompt_ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_greedy_matches_transformers_through_router(
    architecture: str, tiny_checkpoint: Callable[[str], Path], start_engine, start_router
) -> None:
    model_dir = tiny_checkpoint(architecture)
    engine = start_engine(model_dir)
    router = start_router(model_dir, [engine])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    with LLMClient(router.address) as client:
        for prompt in PROMPTS:
            prompt_ids = hf_tokenizer(prompt)["input_ids"]
            assert client.tokenize(prompt) == prompt_ids
            result = client.generate_text(prompt, temperature=0.0, max_tokens=MAX_TOKENS)
            expected = hf_greedy(hf_model, prompt_ids)
            assert result.token_ids == expected, prompt
            assert result.text == hf_tokenizer.decode(expected, skip_special_tokens=True)
            assert result.usage.prompt_tokens == len(prompt_ids)
            assert result.usage.completion_tokens == len(expected)
        for messages in MESSAGES:
            rendered = hf_tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            prompt_ids = hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]
            assert client.tokenize(messages=messages) == prompt_ids
            result = client.generate_text(messages=messages, temperature=0.0, max_tokens=MAX_TOKENS)
            assert result.token_ids == hf_greedy(hf_model, prompt_ids)


def test_prompt_token_ids_stream_and_usage(qwen3_system) -> None:
    _, _, router = qwen3_system
    with LLMClient(router.address) as client:
        chunks = list(
            client.generate(
                prompt_token_ids=[10, 11, 12, 13],
                temperature=0.0,
                max_tokens=6,
                ignore_eos=True,
                logprobs=2,
            )
        )
    assert sum(len(c.token_ids) for c in chunks) == 6
    assert [c.finish_reason for c in chunks][-1] == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage.prompt_tokens == 4 and chunks[-1].usage.completion_tokens == 6
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert len(logprobs) == 6
    for lp in logprobs:
        assert len(lp.top) == 2
        assert lp.top[0].logprob >= lp.top[1].logprob
        assert lp.logprob == pytest.approx(lp.top[0].logprob)  # greedy picks the top token
        assert lp.top[0].text


def test_stop_string_ends_stream_before_it(qwen3_system) -> None:
    _, _, router = qwen3_system
    with LLMClient(router.address) as client:
        full = client.generate_text(
            "Once upon a time", temperature=0.0, max_tokens=24, ignore_eos=True
        )
        assert len(full.text) > 6
        stop = full.text[3:6]
        cut = client.generate_text(
            "Once upon a time", temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]
        )
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text


def test_seeded_sampling_repeats(qwen3_system) -> None:
    _, _, router = qwen3_system
    with LLMClient(router.address) as client:
        runs = [
            client.generate_text(
                "Sample me",
                temperature=1.0,
                top_p=0.9,
                top_k=50,
                seed=7,
                max_tokens=12,
                ignore_eos=True,
            ).token_ids
            for _ in range(2)
        ]
        other = client.generate_text(
            "Sample me", temperature=1.0, seed=8, max_tokens=12, ignore_eos=True
        ).token_ids
    assert runs[0] == runs[1]
    assert other != runs[0]
