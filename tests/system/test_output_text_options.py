"""include_stop_str_in_output and skip_special_tokens from a client through the router to a real
engine (the tiny Qwen3, whose end-of-sequence token is <|im_end|>)."""

from llmserve.clients import LLMClient

PROMPT = [5, 17, 99, 230, 7]
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def test_include_stop_str_in_output_keeps_the_stop_string(qwen3_system) -> None:
    _, _, router = qwen3_system
    with LLMClient(router.address) as client:
        full = client.generate_text(prompt_token_ids=PROMPT, max_tokens=24, **GREEDY).text
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        start = full.index(stop)
        cut = client.generate_text(prompt_token_ids=PROMPT, max_tokens=24, stop=[stop], **GREEDY)
        kept = client.generate_text(prompt_token_ids=PROMPT, max_tokens=24, stop=[stop],
                                    include_stop_str_in_output=True, **GREEDY)
    assert len(stop) == 3
    assert (cut.finish_reason, kept.finish_reason) == ("stop", "stop")
    assert cut.text == full[:start]
    assert kept.text == full[: start + len(stop)]


def test_special_tokens_appear_in_the_text_unless_skipped(qwen3_system) -> None:
    _, _, router = qwen3_system
    with LLMClient(router.address) as client:
        eos = client.tokenize("<|im_end|>")
        assert len(eos) == 1
        # The end-of-sequence token, forced first, ends the stream.
        forced = {"prompt_token_ids": PROMPT, "max_tokens": 4, "logit_bias": {eos[0]: 100.0}}
        skipped = client.generate_text(**forced)
        shown = client.generate_text(**forced, skip_special_tokens=False)
        also_skipped = client.generate_text(**forced, skip_special_tokens=True)
    assert skipped.token_ids == shown.token_ids == eos
    assert skipped.finish_reason == "stop"
    assert (skipped.text, shown.text, also_skipped.text) == ("", "<|im_end|>", "")
