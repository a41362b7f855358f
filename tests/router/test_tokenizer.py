"""The prompt-length bound before tokenizing: never below a prompt's real token count."""

import sys
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from llmserve.engine_service.demo_model import build_tokenizer
from llmserve.router.tokenizer import (
    COMPOSED_CHARS_PER_BYTE,
    COMPOSED_CHARS_PER_CHAR,
    max_chars_per_token,
)

# Pieces a prompt is drawn from: the vocabulary's longest entries, special tokens, characters
# NFC composes (U+01D5 from three, a Hangul syllable from three jamo, U+1F82 from four).
PIECES = [
    " recomputing",
    "<|endoftext|>",
    "<|im_start|>",
    "U\u0308\u0304",
    "\u1100\u1161\u11a8",
    "\u03c9\u0313\u0300\u0345",
    "東京",
    "😀",
    " ",
    "a",
]


def nfc_tokenizer() -> Tokenizer:
    tokenizer = build_tokenizer()
    tokenizer.normalizer = normalizers.NFC()
    return tokenizer


def test_composition_constants_hold_for_every_character() -> None:
    per_char, per_byte = 0, 0.0
    for code_point in range(sys.maxunicode + 1):
        char = chr(code_point)
        if 0xD800 <= code_point < 0xE000 or unicodedata.normalize("NFC", char) != char:
            continue
        decomposed = len(unicodedata.normalize("NFD", char))
        per_char = max(per_char, decomposed)
        per_byte = max(per_byte, decomposed / len(char.encode()))
    assert (per_char, per_byte) == (COMPOSED_CHARS_PER_CHAR, COMPOSED_CHARS_PER_BYTE)


def test_byte_level_bpe_is_bounded_by_its_longest_token() -> None:
    # The demo vocabulary's longest entry and its longest special token both have 13.
    assert max_chars_per_token(build_tokenizer()) == 13
    # NFC: each byte a byte-level entry covers may stand for 1.5 prompt characters.
    assert max_chars_per_token(nfc_tokenizer()) == 13 * COMPOSED_CHARS_PER_BYTE


@pytest.mark.parametrize("make", [build_tokenizer, nfc_tokenizer], ids=["plain", "nfc"])
@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=300))
def test_no_prompt_has_fewer_tokens_than_the_bound_says(make, pieces: list[str]) -> None:
    tokenizer = make()
    prompt = "".join(pieces)
    tokens = len(tokenizer.encode(prompt, add_special_tokens=True))
    assert len(prompt) <= tokens * max_chars_per_token(tokenizer)


def test_runs_of_the_longest_pieces_meet_the_bound_exactly() -> None:
    """The bound is tight where a prompt is all longest tokens, so it refuses early."""
    tokenizer = build_tokenizer()
    bound = max_chars_per_token(tokenizer)
    prompt = "<|endoftext|>" * 100
    assert len(prompt) == len(tokenizer.encode(prompt)) * bound


def unbounded_tokenizers() -> dict[str, Tokenizer]:
    made = {}
    made["strip normalizer"] = build_tokenizer()
    made["strip normalizer"].normalizer = normalizers.Strip()
    made["pre-tokenizer removing spaces"] = build_tokenizer()
    made["pre-tokenizer removing spaces"].pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", "removed"), pre_tokenizers.ByteLevel()]
    )
    made["whitespace pre-tokenizer"] = build_tokenizer()
    made["whitespace pre-tokenizer"].pre_tokenizer = pre_tokenizers.Whitespace()
    made["added token eating spaces"] = build_tokenizer()
    made["added token eating spaces"].add_tokens([AddedToken("<tool>", lstrip=True)])
    made["truncation"] = build_tokenizer()
    made["truncation"].enable_truncation(100)
    made["fused unknowns"] = Tokenizer(
        models.BPE({"a": 0, "<unk>": 1}, [], unk_token="<unk>", fuse_unk=True)
    )
    made["wordpiece"] = Tokenizer(models.WordPiece({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    return made


@pytest.mark.parametrize("name", sorted(unbounded_tokenizers()))
def test_tokenizers_that_can_fold_any_run_into_a_token_have_no_bound(name: str) -> None:
    tokenizer = unbounded_tokenizers()[name]
    assert max_chars_per_token(tokenizer) is None
