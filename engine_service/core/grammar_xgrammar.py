"""The xgrammar structured-output backend: compiles a JSON schema, JSON object, regex or choice
into an `xgrammar.GrammarMatcher`, wrapped as the core's `Matcher`, and fills bitmask rows for
a batch of them (docs/structured-output.md says when the engine uses it, and why).

xgrammar precomputes, at compile time, which tokens each of a grammar's states allows, so a
step's masks cost a fraction of llguidance's, most of all inside long JSON strings, where
nearly every token is allowed; compiling costs about ten times more. It has no fuel limits,
so this module keeps to what it can serve safely and correctly:

- only JSON schemas whose every keyword xgrammar enforces (`SCHEMA_KEYWORDS`); it accepts, and
  silently ignores, many others (format, uniqueItems, multipleOf, not, ...), which would let
  invalid outputs through. `Unsupported` says which keyword;
- schemas nested at most `MAX_SCHEMA_DEPTH` deep: its compile time grows steeply with nesting
  (a 600-deep schema took 15 s) and cannot be interrupted;
- JSON strings with a length bound are compiled to a rule that (in 0.2.9) allows raw control
  characters, which is not JSON, and every JSON string character takes UTF-8-encoded
  surrogates, which are not UTF-8; `_strict_strings` rewrites those rules before compiling. A
  bounded string still takes no backslash escapes (allowing them as an alternative to the
  character class makes xgrammar compute those masks at run time: 600 times slower on W7).

`grammar` (Lark) is llguidance's alone: xgrammar speaks EBNF.
"""

import json
import re
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

with warnings.catch_warnings():  # its import warns about optional tokenizer libraries
    warnings.simplefilter("ignore")
    import xgrammar

NAME = "xgrammar"
# Schema nesting (of the schema's JSON document) xgrammar may compile: ~30 levels of nested
# objects, far beyond real schemas, and each compiles in milliseconds.
MAX_SCHEMA_DEPTH = 64
# The keywords xgrammar 0.2.9 enforces (annotations included: they constrain nothing).
SCHEMA_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "minLength", "maxLength", "pattern", "minimum",
    "maximum", "exclusiveMinimum", "exclusiveMaximum", "anyOf", "$ref", "$defs", "definitions",
    "title", "description", "$schema", "$id", "$comment", "default", "examples", "x-guidance",
})
# Keywords whose value is a schema, a list of them, or a map of them (the others hold data).
_SUBSCHEMA = frozenset({"additionalProperties", "items"})
_SUBSCHEMA_LISTS = frozenset({"prefixItems", "anyOf"})
_SUBSCHEMA_MAPS = frozenset({"properties", "$defs", "definitions"})
# llguidance's per-schema options that xgrammar can express.
GUIDANCE_OPTIONS = frozenset({"whitespace_flexible", "item_separator", "key_separator"})
# Regex syntax of llguidance's dialect (Rust) that xgrammar lacks or reads otherwise, and
# syntax for "any character" or wide ranges: xgrammar's classes take UTF-8-encoded surrogates
# (ED A0 80 to ED BF BF), which are not UTF-8, so a regex that can match one stays llguidance's.
_REGEX_FOREIGN = re.compile(r"\[:|\(\?|\\[pPbBAzQ]|(?<!\\)\.|\[\^|\\[SWDuUx]")
# A JSON string character with a length bound, as xgrammar 0.2.9 writes its rule, and JSON's
# unescaped ones (escapes left out: see the module's docstring).
_LOOSE_CHARACTER = re.compile(r'^(\S+_characters) ::= \(\(\[\^\\"\\\\\\r\\n\]\)\)$',
                              re.MULTILINE)
_JSON_CHARACTER = r' ::= (([^\0-\x1f\"\\\ud800-\udfff]))'
# A character of an unbounded JSON string, as xgrammar writes it, and without surrogates.
_STRING_CHARACTER = r'[^\0-\x1f\"\\\r\n]'
_STRICT_STRING_CHARACTER = r'[^\0-\x1f\"\\\r\n\ud800-\udfff]'

# How xgrammar's errors start: "[06:30:17] /project/cpp/regex_converter.cc:94: ".
_SOURCE_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")


class Unsupported(ValueError):
    """A constraint xgrammar would not serve faithfully (the other backend may)."""


def _depth(value: object) -> int:
    depth, stack = 0, [(value, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict | list):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict)
                                                   else value))
    return depth


def check_schema(schema: object, at: str = "#") -> None:
    """Raises Unsupported for a keyword xgrammar does not enforce, or an option of llguidance's
    it cannot express."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise Unsupported(f"{at}: a schema is an object or a boolean")
    for key, value in schema.items():
        if key not in SCHEMA_KEYWORDS:
            raise Unsupported(f"{at}: the xgrammar backend does not enforce {key!r}")
        if key == "pattern" and not (isinstance(value, str) and regex_is_portable(value)):
            raise Unsupported(f"{at}/pattern: regex syntax the xgrammar backend does not "
                              "read alike, or that could match a character outside UTF-8")
        if key == "x-guidance":
            extra = set(value) - GUIDANCE_OPTIONS if isinstance(value, dict) else {"?"}
            if extra:
                raise Unsupported(f"{at}: x-guidance options {sorted(extra)} need llguidance")
        elif key in _SUBSCHEMA:
            if isinstance(value, list):
                raise Unsupported(f"{at}/{key}: a list of item schemas (use prefixItems)")
            check_schema(value, f"{at}/{key}")
        elif key in _SUBSCHEMA_LISTS:
            if not isinstance(value, list):
                raise Unsupported(f"{at}/{key}: must be a list")
            for i, sub in enumerate(value):
                check_schema(sub, f"{at}/{key}/{i}")
        elif key in _SUBSCHEMA_MAPS:
            if not isinstance(value, dict):
                raise Unsupported(f"{at}/{key}: must be an object")
            for name, sub in value.items():
                check_schema(sub, f"{at}/{key}/{name}")


def regex_is_portable(regex: str) -> bool:
    """Whether a regex means the same to xgrammar as in llguidance's Rust dialect and matches
    only valid UTF-8 there (as far as a look at its syntax can tell: conservatively)."""
    return _REGEX_FOREIGN.search(regex) is None


def _strict_strings(ebnf: str) -> str:
    """JSON's string characters, without surrogates, for those of xgrammar's JSON grammar."""
    ebnf = ebnf.replace(_STRING_CHARACTER, _STRICT_STRING_CHARACTER)
    return _LOOSE_CHARACTER.sub(lambda rule: rule[1] + _JSON_CHARACTER, ebnf)


def _vocabulary(tokenizer_path: Path, vocab_size: int,
                eos_token_ids: tuple[int, ...]) -> "xgrammar.TokenizerInfo":
    """xgrammar's view of the checkpoint's tokens, sized to the model's logits: special tokens
    (and ids past the tokenizer's) are left empty, which xgrammar never allows, as llguidance
    never allows them."""
    text = tokenizer_path.read_text()
    tokenizer = Tokenizer.from_str(text)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    encoded = [""] * vocab_size
    for token, index in vocab.items():
        if index < vocab_size and token not in special:
            encoded[index] = token
    # How the tokenizer spells bytes (byte-level, byte fallback or raw), as xgrammar's
    # from_huggingface detects it, from the same tokenizer.json.
    metadata = xgrammar.TokenizerInfo._detect_metadata_from_hf(text)
    vocab_type = (xgrammar.TokenizerInfo._detect_vocab_type_from_vocab(vocab)
                  or metadata["vocab_type"])
    return xgrammar.TokenizerInfo(
        encoded, vocab_type, vocab_size=vocab_size,
        stop_token_ids=list(eos_token_ids) or None,
        add_prefix_space=metadata["add_prefix_space"])


class XGrammarMatcher:
    """An `xgrammar.GrammarMatcher` as the core's `Matcher` (llguidance's method names).

    xgrammar ends only at a stop token; llguidance also ends once nothing but a stop token can
    follow (a closed JSON object), which the core relies on to finish a complete output with
    `stop`. So after each token that leaves the grammar complete, the matcher looks at its next
    mask: if it allows only stop tokens, it has stopped.
    """

    __slots__ = ("_backend", "_error", "_matcher", "_stopped")

    def __init__(self, backend: "XGrammarBackend", matcher: "xgrammar.GrammarMatcher") -> None:
        self._backend, self._matcher = backend, matcher
        self._stopped = False
        self._error: str | None = None

    def deep_copy(self) -> "XGrammarMatcher":
        copy = XGrammarMatcher(self._backend, self._matcher.fork())
        copy._stopped, copy._error = self._stopped, self._error
        return copy

    def consume_token(self, token: int) -> bool:
        if self._error is not None or self._stopped:
            self._error = self._error or f"token {token} after the constraint was complete"
            return False
        if not self._matcher.accept_token(token):
            self._error = f"token {token} is not allowed here"
            return False
        self._stopped = self._matcher.is_terminated() or (
            self._matcher.is_completed() and self._backend.only_stop_allowed(self._matcher))
        return True

    def consume_tokens(self, tokens: Sequence[int]) -> bool:
        return all(self.consume_token(token) for token in tokens)

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)
        self._stopped, self._error = self._matcher.is_terminated(), None

    def validate_tokens(self, tokens: Sequence[int]) -> int:
        """How many of `tokens`, in a row from here, the constraint accepts (as llguidance's
        `validate_tokens`): the state is as it was after."""
        stopped, error = self._stopped, self._error
        count = 0
        for token in tokens:
            if not self.consume_token(token):  # a refused token leaves xgrammar's state as is
                break
            count += 1
        self._matcher.rollback(count)
        self._stopped, self._error = stopped, error
        return count

    def is_stopped(self) -> bool:
        return self._stopped

    def is_error(self) -> bool:
        return self._error is not None

    def get_error(self) -> str:
        return self._error or ""


class XGrammarBackend:
    """xgrammar's vocabulary of the model and its compiler (no cache of its own: the core's
    LRU keeps the compiled matchers), and what masks with them."""

    name = NAME

    def __init__(self, tokenizer_path: Path, vocab_size: int,
                 eos_token_ids: tuple[int, ...], num_threads: int) -> None:
        self.num_threads = num_threads  # that fill masks in parallel
        self.info = _vocabulary(tokenizer_path, vocab_size, eos_token_ids)
        self.compiler = xgrammar.GrammarCompiler(self.info, cache_enabled=False)
        self.words = (vocab_size + 31) // 32
        # Every token but the stop tokens: a mask that shares no bit with it allows only those.
        not_stop = np.full(self.words, 0xFFFFFFFF, dtype=np.uint32)
        for token in self.info.stop_token_ids:
            if token < vocab_size:
                not_stop[token // 32] &= np.uint32(~(1 << (token % 32)) & 0xFFFFFFFF)
        self._not_stop = not_stop.view(np.int32)
        self._scratch = threading.local()
        self._batch: xgrammar.BatchGrammarMatcher | None = None

    def compile(self, kind: str, text: str | tuple[str, ...],
                schema: object = None) -> XGrammarMatcher:
        """The matcher in its start state; raises Unsupported for what xgrammar would not serve
        faithfully, ValueError for what it cannot compile (its message, without the C++
        source location it starts with)."""
        try:
            return XGrammarMatcher(self, xgrammar.GrammarMatcher(self._compiled(kind, text,
                                                                                schema)))
        except RuntimeError as exc:
            raise ValueError(_SOURCE_LOCATION.sub("", str(exc)).strip()) from exc

    def _compiled(self, kind: str, text: str | tuple[str, ...],
                  schema: object) -> "xgrammar.CompiledGrammar":
        if kind == "json_schema":
            if _depth(schema) > MAX_SCHEMA_DEPTH:
                raise Unsupported(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
            check_schema(schema)
            options = schema.get("x-guidance", {}) if isinstance(schema, dict) else {}
            flexible = options.get("whitespace_flexible", True)
            separators = None if flexible else (options.get("item_separator", ","),
                                                options.get("key_separator", ":"))
            grammar = xgrammar.Grammar.from_json_schema(
                json.dumps(schema), any_whitespace=flexible, separators=separators,
                strict_mode=False)
            compiled = self.compiler.compile_grammar(_strict_strings(str(grammar)))
        elif kind == "json_object":
            grammar = xgrammar.Grammar.from_json_schema('{"type": "object"}', strict_mode=False)
            compiled = self.compiler.compile_grammar(_strict_strings(str(grammar)))
        elif kind == "regex":
            assert isinstance(text, str)
            if not regex_is_portable(text):
                raise Unsupported("regex syntax the xgrammar backend does not read alike, or "
                                  "that could match a character outside UTF-8")
            compiled = self.compiler.compile_regex(text)
        elif kind == "choice":
            # EBNF string literals take JSON's escapes.
            compiled = self.compiler.compile_grammar("root ::= " + " | ".join(
                json.dumps(choice, ensure_ascii=False) for choice in text))
        else:
            raise Unsupported(f"the xgrammar backend does not serve {kind}")
        return compiled

    @staticmethod
    def owns(matcher: object) -> bool:
        return isinstance(matcher, XGrammarMatcher)

    def only_stop_allowed(self, matcher: "xgrammar.GrammarMatcher") -> bool:
        scratch = getattr(self._scratch, "row", None)
        if scratch is None:
            scratch = self._scratch.row = torch.empty((1, self.words), dtype=torch.int32)
        matcher.fill_next_token_bitmask(scratch)
        return not (scratch.numpy()[0] & self._not_stop).any()

    def fill(self, matchers: Sequence[XGrammarMatcher], bitmask: torch.Tensor,
             rows: Sequence[int]) -> None:
        """Row rows[i] of the host int32 `bitmask` [R, words] gets matchers[i]'s next-token
        mask, in parallel over rows."""
        if len(matchers) == 1:
            matchers[0]._matcher.fill_next_token_bitmask(bitmask, rows[0])
            return
        if self._batch is None:
            self._batch = xgrammar.BatchGrammarMatcher(max_threads=self.num_threads)
        self._batch.batch_fill_next_token_bitmask(
            [m._matcher for m in matchers], bitmask, list(rows))
