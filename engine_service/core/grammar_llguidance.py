"""The llguidance structured-output backend: compiles a constraint into an `llguidance.LLMatcher`
(which is itself the core's `Matcher`: it has every method `structured_output.Matcher` names) and
fills bitmask rows for a batch of them.

llguidance bounds its own work (`LIMITS`: lexer fuel, grammar size, Earley items per step), so a
hostile constraint ends in an error state instead of running on; its errors are short messages,
fit to quote back to the caller. It is the only backend that speaks the `grammar` kind (Lark).
"""

import json
from collections.abc import Sequence
from pathlib import Path

import llguidance
import torch

# llguidance's defaults, with short errors: they go back to the caller, and the verbose ones
# carry the parser's state and the whole grammar.
LIMITS = llguidance.LLParserLimits(verbose_errors=False)

NAME = "llguidance"


def grammar_of(kind: str, text: str | tuple[str, ...]) -> str:
    """The llguidance grammar for a constraint (a JSON schema's own checks come when the
    matcher is built)."""
    Matcher = llguidance.LLMatcher
    if kind == "json_schema":
        assert isinstance(text, str)
        return Matcher.grammar_from_json_schema(text)
    if kind == "json_object":
        return Matcher.grammar_from_json_schema('{"type": "object"}')
    if kind == "regex":
        assert isinstance(text, str)
        return Matcher.grammar_from_regex(text)
    if kind == "grammar":
        assert isinstance(text, str)
        return Matcher.grammar_from_lark(text)
    if kind == "choice":
        # Lark string literals take JSON's escapes.
        return Matcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in text))
    raise ValueError(f"unknown kind {kind!r}")


class LLGuidanceBackend:
    """llguidance's vocabulary of the model (built once, from the checkpoint's tokenizer.json,
    sized to the model's logits) and what compiles and masks with it."""

    name = NAME

    def __init__(self, tokenizer_path: Path, vocab_size: int,
                 eos_token_ids: tuple[int, ...], num_threads: int) -> None:
        self.num_threads = num_threads  # that fill masks in parallel
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer_path.read_text(), n_vocab=vocab_size, eos_token=list(eos_token_ids) or None)
        self.words = (vocab_size + 31) // 32
        self._executor: llguidance.LLExecutor | None = None

    def compile(self, kind: str, text: str | tuple[str, ...],
                schema: object = None) -> llguidance.LLMatcher:
        """The matcher in its start state with its first mask computed (llguidance builds its
        lexer lazily); raises ValueError with the library's message."""
        matcher = llguidance.LLMatcher(self.tokenizer, grammar_of(kind, text), log_level=0,
                                       limits=LIMITS)
        if not matcher.is_error():
            scratch = torch.empty(self.words, dtype=torch.int32).numpy()
            matcher.unsafe_compute_mask_ptr(scratch.ctypes.data, scratch.nbytes)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    @staticmethod
    def owns(matcher: object) -> bool:
        return isinstance(matcher, llguidance.LLMatcher)

    def fill(self, matchers: Sequence[llguidance.LLMatcher], bitmask: torch.Tensor,
             rows: Sequence[int]) -> None:
        """Row rows[i] of the host int32 `bitmask` [R, words] gets matchers[i]'s next-token
        mask, in parallel over rows."""
        array = bitmask.numpy()
        stride = self.words * 4
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(array.ctypes.data + rows[0] * stride, stride)
            return
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=self.num_threads)
        self._executor.unsafe_compute_mask_ptr(
            list(zip(matchers, rows, strict=True)), array.ctypes.data, stride, array.shape[0])
