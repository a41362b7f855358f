"""Incremental detokenization: whole UTF-8 characters only, stop strings never leak."""

from pathlib import Path

import pytest

from llmserve.engine_service.demo_model import build_tokenizer, write_tokenizer
from llmserve.router.detokenizer import IncrementalDetokenizer
from llmserve.router.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    out: Path = tmp_path_factory.mktemp("tok")
    write_tokenizer(build_tokenizer(), out, 512)
    return TextTokenizer.from_model_dir(out)


def stream(tokenizer: TextTokenizer, text: str, stop: list[str]) -> tuple[list[str], bool]:
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for i, token in enumerate(ids):
        pieces.append(detok.push([token], final=i == len(ids) - 1))
        if detok.stopped:
            break
    return pieces, detok.stopped


def test_multibyte_characters_are_never_split(tokenizer: TextTokenizer) -> None:
    text = "Zürich 東京 😀 café"
    pieces, _ = stream(tokenizer, text, [])
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(tokenizer.encode("😀")) > 1  # the emoji spans several byte-level tokens


@pytest.mark.parametrize("stop", ["brown", "fox jumps", "x", "lazy dog"])
def test_stop_string_cuts_text_before_it(tokenizer: TextTokenizer, stop: str) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    pieces, stopped = stream(tokenizer, text, [stop, "never-matches"])
    assert stopped
    assert "".join(pieces) == text[: text.index(stop)]


def test_chat_template_renders_chatml(tokenizer: TextTokenizer) -> None:
    text, ids = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == tokenizer.tokenizer.token_to_id("<|im_start|>")


@pytest.mark.parametrize("per_message", [2, 3, 5])
@pytest.mark.parametrize("stop", [[], ["東京"]])
def test_several_tokens_per_message_decode_like_one_at_a_time(
    tokenizer: TextTokenizer, per_message: int, stop: list[str]
) -> None:
    """A lagging stream's merged messages: characters split across and inside them survive."""
    text = "Zürich 東京 😀 café, naïve"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for start in range(0, len(ids), per_message):
        chunk = ids[start : start + per_message]
        pieces.append(detok.push(chunk, final=start + per_message >= len(ids)))
        if detok.stopped:
            break
    one_at_a_time, _ = stream(tokenizer, text, stop)
    assert "".join(pieces) == "".join(one_at_a_time) == text.split("東京")[0] if stop else text
    assert all("\ufffd" not in p for p in pieces)
