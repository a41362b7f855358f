"""Incremental detokenization with stop strings: text goes out as soon as it cannot change.

Text that might be the start of a stop string is held back until it is clearly not one, so a
stop string never reaches the client (unless asked for: `include_stop_str` ends the text with
it), and a UTF-8 character is never split (DecodeStream waits for its last byte). The text of a
request's first `min_tokens` tokens is never searched for stop strings (vLLM's rule: no stop
before min_tokens, as the engine holds off its stop tokens).
"""

from collections.abc import Sequence

from tokenizers import Tokenizer

from llmserve.router.tokenizer import TextTokenizer


class IncrementalDetokenizer:
    """Turns a stream of token ids into text chunks, stopping at the first stop string."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        stop: Sequence[str],
        min_tokens: int = 0,
        *,
        include_stop_str: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._text_tokenizer = tokenizer
        self._tokenizer: Tokenizer = tokenizer.tokenizer
        self._stream = tokenizer.decode_stream(skip_special_tokens)
        self._skip_special_tokens = skip_special_tokens
        self._stop = [s for s in stop if s]
        self._include_stop_str = include_stop_str
        self._pending = ""
        self._token_ids: list[int] = []
        self._decoded_len = 0
        self._min_tokens = min_tokens
        self.stopped = False

    def push(self, token_ids: Sequence[int]) -> str:
        """Adds tokens; returns the text now safe to emit. Sets `stopped` on a stop string."""
        return self._emit(*self._step(token_ids), final=False)

    async def push_last(self, token_ids: Sequence[int]) -> str:
        """Adds the stream's last tokens; returns all the text left to emit."""
        protected, text = self._step(token_ids)
        # Bytes of an unfinished character stay in the stream: the full decode shows them (as
        # U+FFFD), exactly as a one-shot decode of the whole output would.
        full = await self._text_tokenizer.decode(self._token_ids, self._skip_special_tokens)
        tail = full[self._decoded_len :]
        if len(self._token_ids) <= self._min_tokens:
            protected += tail
        else:
            text += tail
        return self._emit(protected, text, final=True)

    def _step(self, token_ids: Sequence[int]) -> tuple[str, str]:
        """The new tokens' text: that of tokens within min_tokens (never searched for stop
        strings), and that of the others."""
        num_protected = min(max(0, self._min_tokens - len(self._token_ids)), len(token_ids))
        self._token_ids.extend(token_ids)
        # One step per token: DecodeStream.step also takes a list, but (tokenizers 0.23) a list
        # that ends inside a UTF-8 character loses the text of the tokens before it.
        step, tokenizer = self._stream.step, self._tokenizer
        protected = ""
        if num_protected:
            protected = "".join([step(tokenizer, t) or "" for t in token_ids[:num_protected]])
            token_ids = token_ids[num_protected:]
        text = "".join([piece for token_id in token_ids if (piece := step(tokenizer, token_id))])
        self._decoded_len += len(protected) + len(text)
        return protected, text

    def _emit(self, protected: str, text: str, final: bool) -> str:
        """The protected text, then the new text less what may begin a stop string (held until
        `final`). Nothing is pending while tokens are protected: all before them were too."""
        if not self._stop:
            return protected + text  # nothing to hold back
        if protected:
            return protected + self._emit("", text, final)
        self._pending += text
        # The stop string completed first (then the longest of those): the same one however the
        # text was split into pushes.
        match = min(
            ((i + len(s), i) for s in self._stop if (i := self._pending.find(s)) >= 0),
            default=None,
        )
        if match is not None:
            self.stopped = True
            end, start = match
            text, self._pending = self._pending[: end if self._include_stop_str else start], ""
            return text
        cut = len(self._pending) if final else len(self._pending) - self._partial_match()
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text

    def _partial_match(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        pending = self._pending
        return max(
            (
                k
                for s in self._stop
                for k in range(min(len(s) - 1, len(pending)), 0, -1)
                if s.startswith(pending[-k:])
            ),
            default=0,
        )
