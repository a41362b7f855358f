"""Speculative decoding through real servers: an engine started with --speculative-method ngram,
a router in front of it. Its streams carry several tokens per response, and what the client
gets is what the plain engine of the shared system streams: the same text and tokens, stop
strings cut at the same place (also inside a multi-token response), samples of n > 1 alike;
usage and /metrics count the guesses."""

import urllib.request

import pytest

from llmserve.clients import Completion, LLMClient
from llmserve.common.ports import ephemeral_port

# Repeats spans of itself, so prompt lookup finds guesses.
PROMPTS = [[5, 17, 99, 230, 7] * 6, [40, 41, 42, 43] * 5 + [40, 41], list(range(300, 340)) * 2]
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def speculating(qwen3_system, start_engine, start_router):
    model_dir, _, _ = qwen3_system
    metrics_port = ephemeral_port()
    engine = start_engine(model_dir, "--speculative-method", "ngram",
                          "--num-speculative-tokens", "4", "--metrics-port", str(metrics_port))
    return engine, start_router(model_dir, [engine]), metrics_port


def test_streams_equal_plain_decoding_and_usage_counts_the_guesses(qwen3_system,
                                                                   speculating) -> None:
    _, _, plain_router = qwen3_system
    _, router, _ = speculating
    proposed = accepted = 0
    multi = False
    for prompt in PROMPTS:
        with LLMClient(plain_router.address) as client:
            plain = client.generate_text(prompt_token_ids=prompt, max_tokens=40, **GREEDY)
        with LLMClient(router.address) as client:
            chunks = list(client.generate(prompt_token_ids=prompt, max_tokens=40, **GREEDY))
        spec = Completion.from_chunks(chunks)
        assert (spec.token_ids, spec.text, spec.finish_reason) == (
            plain.token_ids, plain.text, plain.finish_reason)
        assert spec.usage.completion_tokens == 40
        multi |= any(len(c.token_ids) > 1 for c in chunks)
        proposed += spec.usage.speculative_proposed_tokens
        accepted += spec.usage.speculative_accepted_tokens
        assert plain.usage.speculative_proposed_tokens == 0
    assert multi and proposed > 0 and 0 < accepted <= proposed


def test_a_stop_string_inside_a_multi_token_response_cuts_there(qwen3_system,
                                                                speculating) -> None:
    _, _, plain_router = qwen3_system
    _, router, _ = speculating
    prompt = PROMPTS[0]
    with LLMClient(plain_router.address) as client:
        full = client.generate_text(prompt_token_ids=prompt, max_tokens=40, **GREEDY)
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    for address in (plain_router.address, router.address):
        with LLMClient(address) as client:
            cut = client.generate_text(prompt_token_ids=prompt, max_tokens=40, stop=[stop],
                                       **GREEDY)
            kept = client.generate_text(prompt_token_ids=prompt, max_tokens=40, stop=[stop],
                                        include_stop_str_in_output=True, **GREEDY)
        assert (cut.text, cut.finish_reason) == (text.split(stop)[0], "stop")
        assert kept.text == text.split(stop)[0] + stop


def test_seeded_samples_of_one_request_equal_plain_decodings(qwen3_system, speculating) -> None:
    _, _, plain_router = qwen3_system
    _, router, _ = speculating
    seeded = {"temperature": 0.8, "seed": 77, "ignore_eos": True, "n": 3}
    with LLMClient(plain_router.address) as client:
        plain = client.generate_text(prompt_token_ids=PROMPTS[1], max_tokens=24, **seeded)
    with LLMClient(router.address) as client:
        spec = client.generate_text(prompt_token_ids=PROMPTS[1], max_tokens=24, **seeded)
    assert [s.token_ids for s in spec.samples] == [s.token_ids for s in plain.samples]
    assert [s.text for s in spec.samples] == [s.text for s in plain.samples]


def test_metrics_count_proposed_accepted_and_drafts(speculating) -> None:
    _, _, port = speculating
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {line.split(" ")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("llmserve_engine_speculative_")}
    proposed = values["llmserve_engine_speculative_proposed_tokens_total"]
    accepted = values["llmserve_engine_speculative_accepted_tokens_total"]
    drafts = values["llmserve_engine_speculative_drafts_total"]
    assert proposed > 0 and 0 < accepted <= proposed and 0 < drafts <= proposed
