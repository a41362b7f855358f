"""Incremental detokenization: whole UTF-8 characters only, stop strings never leak."""

import asyncio
from pathlib import Path

import pytest

from llmserve.engine_service.demo_model import build_tokenizer, write_tokenizer
from llmserve.router.detokenizer import IncrementalDetokenizer
from llmserve.router.tokenizer import INLINE_TOKENS, TextTokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    out: Path = tmp_path_factory.mktemp("tok")
    write_tokenizer(build_tokenizer(), out, 512)
    return TextTokenizer.from_model_dir(out)


def encode(tokenizer: TextTokenizer, text: str) -> list[int]:
    return asyncio.run(tokenizer.encode(text)).ids


def push_chunks(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> list[str]:
    """Pushes the chunks as a stream would, the last one as its end; stops at a stop string."""
    pieces = []
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        pieces.append(asyncio.run(detok.push_last(chunk)) if last else detok.push(chunk))
        if detok.stopped:
            break
    return pieces


def stream(tokenizer: TextTokenizer, text: str, stop: list[str]) -> tuple[list[str], bool]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = push_chunks(detok, [[token] for token in encode(tokenizer, text)])
    return pieces, detok.stopped


def test_multibyte_characters_are_never_split(tokenizer: TextTokenizer) -> None:
    text = "Zürich 東京 😀 café"
    pieces, _ = stream(tokenizer, text, [])
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(encode(tokenizer, "😀")) > 1  # the emoji spans several byte-level tokens


def test_unfinished_character_at_the_end_shows_as_replacement(tokenizer: TextTokenizer) -> None:
    """The last push decodes the whole output, off the event loop when it is long."""
    emoji = encode(tokenizer, "😀")
    for repeats in (1, INLINE_TOKENS // len(emoji) + 1):
        ids = emoji * repeats
        pieces = push_chunks(IncrementalDetokenizer(tokenizer, []), [ids, ids[:1]])
        assert "".join(pieces) == "😀" * repeats + "\ufffd"


@pytest.mark.parametrize("stop", ["brown", "fox jumps", "x", "lazy dog"])
def test_stop_string_cuts_text_before_it(tokenizer: TextTokenizer, stop: str) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    pieces, stopped = stream(tokenizer, text, [stop, "never-matches"])
    assert stopped
    assert "".join(pieces) == text[: text.index(stop)]


def test_chat_template_renders_chatml(tokenizer: TextTokenizer) -> None:
    text = asyncio.run(tokenizer.render_chat([{"role": "user", "content": "Hi"}]))
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = asyncio.run(tokenizer.encode(text, add_special_tokens=False)).ids
    assert ids[0] == tokenizer.tokenizer.token_to_id("<|im_start|>")


@pytest.mark.parametrize("per_message", [2, 3, 5])
@pytest.mark.parametrize("stop", [[], ["東京"]])
def test_several_tokens_per_message_decode_like_one_at_a_time(
    tokenizer: TextTokenizer, per_message: int, stop: list[str]
) -> None:
    """A lagging stream's merged messages: characters split across and inside them survive."""
    text = "Zürich 東京 😀 café, naïve"
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, stop)
    chunks = [ids[start : start + per_message] for start in range(0, len(ids), per_message)]
    pieces = push_chunks(detok, chunks)
    one_at_a_time, _ = stream(tokenizer, text, stop)
    assert "".join(pieces) == "".join(one_at_a_time) == text.split("東京")[0] if stop else text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("per_message", [1, 3])
def test_stop_strings_do_not_match_in_the_first_min_tokens(
    tokenizer: TextTokenizer, per_message: int
) -> None:
    """The text of the first min_tokens tokens goes out whole; a stop string in the text of a
    later token still stops the stream."""
    text = "the cat sat on the mat"
    ids = encode(tokenizer, text)
    # The first token whose text ends past the first "the".
    protected = next(n for n in range(1, len(ids) + 1)
                     if len(asyncio.run(tokenizer.decode(ids[:n]))) >= len("the cat"))
    detok = IncrementalDetokenizer(tokenizer, ["the"], min_tokens=protected)
    chunks = [ids[start : start + per_message] for start in range(0, len(ids), per_message)]
    pieces = push_chunks(detok, chunks)
    assert detok.stopped
    assert "".join(pieces) == "the cat sat on "
    detok = IncrementalDetokenizer(tokenizer, ["the"], min_tokens=len(ids))
    assert "".join(push_chunks(detok, chunks)) == text and not detok.stopped


@pytest.mark.parametrize("per_message", [1, 2, 100])
@pytest.mark.parametrize("include", [False, True])
def test_include_stop_str_ends_the_text_with_the_stop_string(
    tokenizer: TextTokenizer, per_message: int, include: bool
) -> None:
    """A stop string split across tokens is held back until complete, then kept if asked; of
    overlapping stop strings the one completed first wins, however the tokens were chunked."""
    text = "The quick brown fox jumps over the lazy dog"
    ids = encode(tokenizer, text)
    assert not any("fox jumps" in asyncio.run(tokenizer.decode([t])) for t in ids)
    chunks = [ids[start : start + per_message] for start in range(0, len(ids), per_message)]
    for stop, expected_end in (["fox jumps"], "fox jumps"), (["lazy dog", "azy"], "azy"):
        detok = IncrementalDetokenizer(tokenizer, stop, include_stop_str=include)
        pieces = push_chunks(detok, chunks)
        assert detok.stopped
        start = text.index(expected_end)
        assert "".join(pieces) == text[: start + len(expected_end) if include else start]


def test_special_tokens_show_in_the_text_unless_skipped(tokenizer: TextTokenizer) -> None:
    ids = encode(tokenizer, "Hi<|im_end|>there<|im_end|>")
    assert ids.count(tokenizer.tokenizer.token_to_id("<|im_end|>")) == 2
    for per_message in (1, 3):
        chunks = [ids[start : start + per_message] for start in range(0, len(ids), per_message)]
        kept = push_chunks(IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False),
                           chunks)
        assert "".join(kept) == "Hi<|im_end|>there<|im_end|>"
        assert "".join(push_chunks(IncrementalDetokenizer(tokenizer, []), chunks)) == "Hithere"
