"""The model's tokenizer and chat template, loaded from its checkpoint directory.

Large inputs are tokenized, rendered and decoded on worker threads: `tokenizers` releases the
GIL in its batch calls, so the event loop keeps relaying every other stream meanwhile (a huge
prompt tokenized in place stalls them all until it is done). Small ones stay in place, where they
cost less than the hop to a thread.
"""

import asyncio
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog
from tokenizers import Encoding, Tokenizer
from tokenizers.decoders import DecodeStream

from llmserve.router.chat_template import ChatTemplate

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Inputs up to these sizes are handled on the event loop, which each holds only briefly
# (docs/benchmarks.md has the times).
INLINE_CHARS = 4096
INLINE_TOKENS = 4096

# NFC and NFKC compose characters, so a prompt can hold more characters than the normalized text
# its tokens cover: a composed character stands for at most 4 (its full canonical decomposition,
# e.g. U+1F82), and for at most 1.5 per byte of its UTF-8 (U+01D5: 2 bytes, 3 characters).
# Unicode adds no new compositions (its normalization stability policy), so these stay true;
# tests/router/test_tokenizer.py recomputes both.
COMPOSED_CHARS_PER_CHAR = 4
COMPOSED_CHARS_PER_BYTE = 1.5
_COMPOSING = {"NFC", "NFKC"}
_DECOMPOSING = {"NFD", "NFKD"}  # never shorten the text
# Pre-tokenizers that keep every character (the split ones, unless told to remove matches).
_KEEPING = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"}
_SPLITTING = {"Split", "Punctuation"}


def _token_text(value: object) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _keeps_text(pre_tokenizer: dict[str, Any] | None) -> bool:
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer["type"]
    if kind == "Sequence":
        return all(_keeps_text(p) for p in pre_tokenizer["pretokenizers"])
    if kind in _SPLITTING:
        return pre_tokenizer.get("behavior") != "Removed"
    return kind in _KEEPING


def _byte_level(pre_tokenizer: dict[str, Any] | None) -> bool:
    if pre_tokenizer is None:
        return False
    if pre_tokenizer["type"] == "Sequence":
        return any(_byte_level(p) for p in pre_tokenizer["pretokenizers"])
    return pre_tokenizer["type"] == "ByteLevel"


def max_chars_per_token(tokenizer: Tokenizer) -> float | None:
    """The most prompt characters one token can stand for; None when unbounded.

    A BPE token covers its vocabulary entry in the normalized text: one character per entry
    character, or for a byte-level vocabulary one byte per entry character (so at most one
    character); an added token covers its content. Unbounded: a tokenizer that can drop text
    (a normalizer other than the Unicode forms, a pre-tokenizer that removes whitespace, added
    tokens that strip their neighbours, truncation) or fold any run into one token (an unknown
    token fused over unknown characters, other models).
    """
    spec = json.loads(tokenizer.to_str())
    model, normalizer, pre_tokenizer = spec["model"], spec["normalizer"], spec["pre_tokenizer"]
    fused_unknowns = (
        model.get("unk_token") and model.get("fuse_unk") and not model.get("byte_fallback")
    )
    if model["type"] != "BPE" or fused_unknowns or spec["truncation"]:
        return None
    added = spec["added_tokens"]
    if not _keeps_text(pre_tokenizer) or any(t["lstrip"] or t["rstrip"] for t in added):
        return None
    kind = None if normalizer is None else normalizer["type"]
    if kind is None or kind in _DECOMPOSING:
        per_char = per_entry_char = 1.0
    elif kind in _COMPOSING:
        per_char = COMPOSED_CHARS_PER_CHAR
        per_entry_char = (
            COMPOSED_CHARS_PER_BYTE if _byte_level(pre_tokenizer) else COMPOSED_CHARS_PER_CHAR
        )
    else:
        return None
    longest_entry = max(map(len, tokenizer.get_vocab(with_added_tokens=False)), default=0)
    # Added tokens match the prompt itself unless marked `normalized`.
    longest_added = max(
        (len(t["content"]) * (per_char if t["normalized"] else 1) for t in added), default=0
    )
    return max(longest_entry * per_entry_char, longest_added)


class TextTokenizer:
    """Encodes prompts, renders chat messages, and makes incremental decoders."""

    def __init__(self, tokenizer: Tokenizer, chat_template: ChatTemplate | None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        # Computed once: request_limits.check_prompt_chars refuses longer prompts untokenized.
        self.chars_per_token = max_chars_per_token(tokenizer)
        # Big inputs at once beyond one per core would only queue for the CPU.
        self._workers = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="tokenize")

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "TextTokenizer":
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
        config_file = model_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: use the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if source is None and (model_dir / "chat_template.jinja").is_file():
            source = (model_dir / "chat_template.jinja").read_text()
        specials = {
            key: _token_text(config.get(key))
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        template = ChatTemplate(source, specials) if source else None
        loaded = cls(Tokenizer.from_file(str(tokenizer_file)), template)
        log.info("tokenizer_loaded", chars_per_token=loaded.chars_per_token)
        return loaded

    async def _run(self, in_place: bool, work: Callable[..., T], *args: Any) -> T:
        if in_place:
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(self._workers, work, *args)

    def _encode(self, text: str, add_special_tokens: bool) -> Encoding:
        # The batch call: `encode` holds the GIL throughout, and computes offsets never read.
        return self.tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0]

    async def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        """The text's tokens (`len()` counts them without building the `.ids` list).

        `add_special_tokens` adds the tokenizer's own, e.g. BOS: a plain prompt wants them, a
        rendered chat template holds its own already.
        """
        return await self._run(len(text) <= INLINE_CHARS, self._encode, text, add_special_tokens)

    def _encode_last(self, text: str, add_special_tokens: bool, keep: int) -> list[int]:
        return self._encode(text, add_special_tokens).ids[-keep:]

    async def encode_last(self, text: str, add_special_tokens: bool, keep: int) -> list[int]:
        """The text's last `keep` token ids (truncate_prompt_tokens). Sliced where it was
        tokenized: listing all the ids of a long text on the event loop would stall it."""
        return await self._run(
            len(text) <= INLINE_CHARS, self._encode_last, text, add_special_tokens, keep
        )

    async def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a prompt instead")
        size = sum(len(m["content"]) + len(m["role"]) for m in messages)
        return await self._run(size <= INLINE_CHARS, self.chat_template.render, messages)

    def _decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode_batch([token_ids], skip_special_tokens=skip_special_tokens)[0]

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """The tokens' text; special tokens (end-of-sequence, chat markers) left out unless
        `skip_special_tokens` is false."""
        return await self._run(
            len(token_ids) <= INLINE_TOKENS, self._decode, token_ids, skip_special_tokens
        )

    def decode_stream(self, skip_special_tokens: bool = True) -> DecodeStream:
        return DecodeStream(skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
