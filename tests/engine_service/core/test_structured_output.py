"""Structured output in the engine core, on the demo model (random weights: whatever it draws
is only ever what the constraint allows, so every output that ends by `stop` must satisfy it).

Each test samples at temperature 1.0 over several seeds: the mask, not luck, makes the outputs
valid. Outputs that end by `length` are cut short and not checked.
"""

import json
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from llmserve.engine_service.core import grammar_llguidance, structured_output
from llmserve.engine_service.core.grammar_xgrammar import XGrammarMatcher
from llmserve.engine_service.core.structured_output import BACKENDS, StructuredOutputs
from llmserve.engine_service.seam import (
    EngineRequest,
    FinishReason,
    SamplingOptions,
    StructuredOutputSpec,
)

# A dev dependency the GPU image lacks (its runs collect every test module).
jsonschema = pytest.importorskip("jsonschema")
SEEDS = range(8)
# Every test that takes `backend` runs on each: auto, llguidance and xgrammar.
# A small pool (the default KV budget would allocate 1 GiB for each core).
KV = {"num_kv_blocks": 256}
# Compact JSON (llguidance's `x-guidance` options, in the schema): with flexible whitespace a
# random model mostly draws whitespace and seldom finishes within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "status": {"enum": ["open", "closed"]},
        "score": {"type": "number"},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 8},
                           "admin": {"type": "boolean"}},
            "required": ["name", "admin"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["id", "status", "owner", "tags"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}
REGEX = r"[a-z]{2,5}-[0-9]{3}"
CHOICES = ("red apple", 'say "hi"', "new\nline", "Zürich", "back\\slash")
# Arithmetic: checked below by a parser written by hand, not by the library that constrained it.
GRAMMAR = """
start: expr
expr: term (OP term)*
term: NUMBER | "(" expr ")"
OP: "+" | "-" | "*"
NUMBER: /[0-9]{1,3}/
"""


def spec(kind: str, text: str | tuple[str, ...] = "") -> StructuredOutputSpec:
    return StructuredOutputSpec(kind, text)


def constrained(name: str, seed: int, constraint: StructuredOutputSpec, max_tokens: int = 300,
                **options: object) -> EngineRequest:
    return EngineRequest(name, [5, 6, 7, 8 + seed], SamplingOptions(
        temperature=1.0, seed=seed, max_tokens=max_tokens, structured_output=constraint,
        **options))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def core_of(demo_core, backend: str):
    """demo_core on the test's structured output backend."""
    return lambda **settings: demo_core(structured_output_backend=backend, **settings)


@pytest.fixture
def tokenizer(demo_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(demo_dir / "tokenizer.json"))


@pytest.fixture
def decode(tokenizer: Tokenizer):
    return lambda ids: tokenizer.decode(ids)  # the end-of-sequence token is special: skipped


def finished_texts(results: dict, decode) -> list[str]:
    return [decode(g.token_ids) for g in results.values() if g.finish_reason is FinishReason.STOP]


def parses_as_arithmetic(text: str) -> bool:
    at = 0

    def term() -> None:
        nonlocal at
        if text[at:at + 1] == "(":
            at += 1
            expr()
            assert text[at:at + 1] == ")"
            at += 1
            return
        digits = re.match(r"[0-9]{1,3}(?![0-9])", text[at:])
        assert digits
        at += digits.end()

    def expr() -> None:
        nonlocal at
        term()
        while text[at:at + 1] in ("+", "-", "*") and at < len(text):
            at += 1
            term()

    try:
        expr()
    except AssertionError:
        return False
    return at == len(text)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_every_finished_output_meets_its_constraint(core_of, decode,
                                                    async_scheduling: bool) -> None:
    core = core_of(max_num_seqs=64, async_scheduling=async_scheduling, **KV)
    # (constraint, max_tokens): enough for most outputs to finish.
    kinds = {
        "schema": (spec("json_schema", json.dumps(SCHEMA)), 160),
        "regex": (spec("regex", REGEX), 20),
        "choice": (spec("choice", CHOICES), 20),
        "grammar": (spec("grammar", GRAMMAR), 60),
        "object": (spec("json_object"), 40),
    }
    requests = [constrained(f"{kind}{seed}", seed, c, max_tokens)
                for kind, (c, max_tokens) in kinds.items() for seed in SEEDS]
    results = core.run_to_completion(requests)
    by_kind = {kind: {k: v for k, v in results.items() if k.rstrip("0123456789") == kind}
               for kind in kinds}
    schemas = finished_texts(by_kind["schema"], decode)
    assert len(schemas) >= len(SEEDS) // 2
    for text in schemas:
        jsonschema.validate(json.loads(text), SCHEMA)
    regexes = finished_texts(by_kind["regex"], decode)
    assert len(regexes) == len(SEEDS) and all(re.fullmatch(REGEX, t) for t in regexes)
    choices = finished_texts(by_kind["choice"], decode)
    assert len(choices) == len(SEEDS) and set(choices) <= set(CHOICES)
    assert len(set(choices)) > 1  # sampled, not forced to one
    sentences = finished_texts(by_kind["grammar"], decode)
    assert len(sentences) >= len(SEEDS) // 2
    assert all(parses_as_arithmetic(t) for t in sentences), sentences
    objects = finished_texts(by_kind["object"], decode)
    assert objects and all(isinstance(json.loads(t), dict) for t in objects)
    assert not core.sequences and not core.compiling


def test_async_scheduling_draws_the_same_tokens(core_of) -> None:
    """Under async scheduling a constrained row reads the step in flight before its draw: the
    tokens are those of the plain loop, and unconstrained rows beside it are unaffected."""
    constraint = spec("json_schema", json.dumps(SCHEMA))

    def run(async_scheduling: bool) -> dict:
        core = core_of(max_num_seqs=16, async_scheduling=async_scheduling, **KV)
        requests = [constrained(f"s{seed}", seed, constraint, max_tokens=40) for seed in range(3)]
        requests += [EngineRequest(f"p{seed}", [9, 9, seed], SamplingOptions(
            temperature=1.0, seed=seed, max_tokens=30, ignore_eos=True)) for seed in range(3)]
        overlapped = 0
        for request in requests:
            core.add_request(request)
        outputs: dict[str, list] = {}
        while core.has_work or core.compiling:
            if not core.has_work:
                core.structured.wait()
            for out in core.step():
                outputs.setdefault(out.request_id, []).append(
                    (out.new_token_ids, out.finish_reason))
            overlapped += core._in_flight is not None
        return {"outputs": outputs, "overlapped": overlapped}

    plain, overlapped = run(False), run(True)
    assert overlapped["outputs"] == plain["outputs"]
    assert overlapped["overlapped"] > 10  # the unconstrained rows still overlap


def test_plain_requests_are_unchanged_beside_constrained_ones(core_of, monkeypatch) -> None:
    options = SamplingOptions(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True)
    alone = core_of(**KV).run_to_completion([EngineRequest("p", [4, 5, 6], options)])["p"]
    fills = []
    original = StructuredOutputs.fill_bitmask
    monkeypatch.setattr(StructuredOutputs, "fill_bitmask",
                        lambda self, matchers: fills.append(len(matchers)) or original(self,
                                                                                       matchers))
    core = core_of(**KV)
    assert core.run_to_completion([EngineRequest("p", [4, 5, 6], options)])["p"] == alone
    assert fills == []  # a batch where nobody asks fills no mask
    mixed = core.run_to_completion([
        EngineRequest("p", [4, 5, 6], options),
        *(constrained(f"c{seed}", seed, spec("regex", REGEX)) for seed in range(3)),
    ])
    assert mixed["p"].token_ids == alone.token_ids
    assert fills and max(fills) == 3


def test_chunked_prefill_and_preemption_keep_the_constraint(core_of, decode) -> None:
    """Long prompts prefilled in chunks (only the last chunk's logits are masked), and a KV
    pool so small that sequences are preempted and recomputed: the matchers keep their state
    (a preempted sequence keeps its tokens), so the outputs are those of a roomy engine."""
    constraint = spec("json_schema", json.dumps(SCHEMA))
    requests = [EngineRequest(f"s{seed}", [20 + seed] * 40, SamplingOptions(
        temperature=1.0, seed=seed, max_tokens=100, structured_output=constraint))
        for seed in range(4)]
    roomy = core_of(**KV).run_to_completion(requests)
    # 12 blocks of 16 tokens for 4 sequences growing to ~120 tokens: preemption is certain.
    tight_core = core_of(num_kv_blocks=12, max_num_batched_tokens=32, max_num_seqs=4)
    tight = tight_core.run_to_completion(requests)
    assert tight_core.scheduler.num_preemptions > 0
    assert {k: g.token_ids for k, g in tight.items()} == {k: g.token_ids for k, g in roomy.items()}
    for text in finished_texts(tight, decode):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_max_tokens_and_stop_tokens_still_end_a_constrained_output(core_of) -> None:
    core = core_of(**KV)
    results = core.run_to_completion([
        constrained("short", 0, spec("json_object"), max_tokens=3),
        # `a+` stays open after each a: the end-of-sequence token is allowed there, and ends it.
        *(constrained(f"open{seed}", seed, spec("regex", "a+"), max_tokens=100)
          for seed in range(4)),
    ])
    assert results["short"].finish_reason is FinishReason.LENGTH
    assert len(results["short"].token_ids) == 3
    for seed in range(4):
        open_ended = results[f"open{seed}"]
        assert open_ended.finish_reason is FinishReason.STOP
        assert open_ended.token_ids[-1] in core.eos_token_ids


def test_bad_constraints_are_refused_and_the_others_served(core_of, backend: str) -> None:
    core = core_of(**KV)
    bad = {
        "not_json": (spec("json_schema", "{not json"), "json_schema: not valid JSON"),
        "not_object": (spec("json_schema", "[1, 2]"), "a schema is a JSON object"),
        # auto refuses with llguidance's messages, whichever library would have served it.
        "bad_type": (spec("json_schema", '{"type": 5}'),
                     "json_schema: Type should be a string" if backend == "xgrammar"
                     else "json_schema: type must be"),
        "bad_ref": (spec("json_schema", '{"$ref": "#/$defs/none"}'), "json_schema: "),
        "bad_regex": (spec("regex", "(a"), "structured_output.regex: "),
        "bad_grammar": (spec("grammar", "start: missing_rule"), "structured_output.grammar: "),
    }
    requests = [constrained(name, 0, c) for name, (c, _) in bad.items()]
    requests.append(EngineRequest("plain", [3, 4], SamplingOptions(max_tokens=5, seed=1)))
    results = core.run_to_completion(requests)
    for name, (_, message) in bad.items():
        error = results[name].error
        assert error is not None and error.status == "INVALID_ARGUMENT", name
        assert message in error.reason and error.reason.startswith(
            "sampling.structured_output."), error.reason
        assert results[name].token_ids == []
    assert results["plain"].error is None and len(results["plain"].token_ids) == 5


def test_a_compilation_past_its_deadline_fails_and_never_holds_up_the_loop(
        core_of, monkeypatch) -> None:
    release = threading.Event()
    real = structured_output.validate

    def slow(constraint: StructuredOutputSpec) -> object:
        if constraint.spec == "slow":
            release.wait(30)  # a compilation that ends only when the test says so
        return real(constraint)

    monkeypatch.setattr(structured_output, "validate", slow)
    core = core_of(structured_output_compile_timeout_s=1.0, **KV)
    started = time.monotonic()
    core.add_request(constrained("slow", 0, spec("regex", "slow")))
    core.add_request(EngineRequest("plain", [3, 4], SamplingOptions(
        max_tokens=5, seed=1, ignore_eos=True)))
    ended: dict[str, float] = {}
    while core.has_work or core.compiling:
        if not core.has_work:
            core.structured.wait()
        for out in core.step():
            if out.finish_reason is not None:
                ended[out.request_id] = time.monotonic() - started
                # The step loop served the plain request while the compilation was stuck.
                assert core.compiling
        for rejected in core.take_rejected():
            ended[rejected.request_id] = time.monotonic() - started
            assert rejected.status == "DEADLINE_EXCEEDED"
            assert "sampling.structured_output.regex: still compiling after 1 s" in (
                rejected.reason)
    assert 1.0 <= ended["slow"] < 5.0 and "plain" in ended
    release.set()
    # The compilation ends in the end, and its grammar is cached: the next request is served.
    deadline = time.monotonic() + 10
    while ("regex", "slow") not in core.structured._cache and time.monotonic() < deadline:
        time.sleep(0.01)
    again = core.run_to_completion([constrained("again", 0, spec("regex", "slow"))])["again"]
    assert again.error is None and again.finish_reason is FinishReason.STOP


def test_grammars_are_compiled_once_and_cached(core_of, monkeypatch) -> None:
    compiled = []
    real = structured_output.validate
    monkeypatch.setattr(structured_output, "validate",
                        lambda c: compiled.append(c.kind) or real(c))
    core = core_of(**KV)
    burst = [constrained(f"r{seed}", seed, spec("regex", REGEX)) for seed in range(8)]
    assert all(g.error is None for g in core.run_to_completion(burst).values())
    later = core.run_to_completion([constrained("later", 9, spec("regex", REGEX)),
                                    constrained("bad", 0, spec("regex", "(a")),
                                    constrained("bad2", 1, spec("regex", "(a"))])
    assert later["later"].error is None
    assert later["bad"].error is not None and later["bad2"].error is not None
    assert compiled == ["regex", "regex"]  # the burst's grammar once, the bad one once


def test_a_failed_over_stream_resumes_its_constraint(core_of, decode, tokenizer) -> None:
    """A router moves a stream to another engine with the output so far appended to the prompt
    and `resumed_output_tokens` saying so: the constraint carries on after it, and with the same
    seed the stream continues exactly."""
    constraint = spec("json_schema", json.dumps(SCHEMA))
    options = SamplingOptions(temperature=1.0, seed=2, max_tokens=160, structured_output=constraint)
    prompt = [5, 6, 7]
    core = core_of(**KV)
    whole = core.run_to_completion([EngineRequest("a", prompt, options)])["a"]
    assert whole.finish_reason is FinishReason.STOP
    cut = 10
    resumed = core.run_to_completion([EngineRequest(
        "b", prompt + whole.token_ids[:cut],
        SamplingOptions(temperature=1.0, seed=2, max_tokens=160 - cut,
                        structured_output=constraint),
        resumed_output_tokens=cut)])["b"]
    assert whole.token_ids[:cut] + resumed.token_ids == whole.token_ids
    jsonschema.validate(json.loads(decode(whole.token_ids)), SCHEMA)
    broken = core.run_to_completion([EngineRequest(
        "c", [*prompt, *tokenizer.encode("nope").ids], options,
        resumed_output_tokens=len(tokenizer.encode("nope").ids))])["c"]
    assert broken.error is not None and "resumed_output_tokens" in broken.error.reason


def test_logprobs_stay_the_models_own(core_of, decode) -> None:
    """With logprobs the step is read at once; the mask applies to a copy of the logits, so
    the log-probabilities are the model's (as without a constraint)."""
    core = core_of(**KV)
    constraint = spec("choice", CHOICES)
    with_constraint = core.run_to_completion(
        [constrained("c", 0, constraint, logprobs=2)])["c"]
    assert decode(with_constraint.token_ids) in CHOICES
    first = with_constraint.token_ids[0]
    unconstrained = core.run_to_completion([EngineRequest("u", [5, 6, 7, 8], SamplingOptions(
        temperature=0.0, max_tokens=1, logprobs=2))])["u"]
    # Same prompt, same position: the alternatives are the model's top tokens, not the allowed.
    assert with_constraint.logprobs[0].top == unconstrained.logprobs[0].top
    assert with_constraint.logprobs[0].token_id == first


def test_a_constraint_past_the_librarys_limits_mid_stream_fails_the_request(
        demo_core, monkeypatch) -> None:
    """llguidance bounds its work per mask; an ambiguous grammar that outgrows the bound while
    generating (here a low bound, and min_tokens keeping the output going) ends its request
    with INVALID_ARGUMENT naming the limit; the request beside it is served."""
    import llguidance

    monkeypatch.setattr(grammar_llguidance, "LIMITS",
                        llguidance.LLParserLimits(verbose_errors=False, step_max_items=300))
    ambiguous = 'start: s\ns: s s | s s s | "x" | "xx"\n'
    results = demo_core(**KV).run_to_completion([
        constrained("r", 0, spec("grammar", ambiguous), max_tokens=60, min_tokens=50),
        EngineRequest("plain", [5, 6, 7], SamplingOptions(seed=1, max_tokens=10)),
    ])
    error = results["r"].error
    assert error is not None and error.status == "INVALID_ARGUMENT"
    assert "went past the engine's limits while generating" in error.reason
    assert "Too many items" in error.reason
    assert len(results["plain"].token_ids) == 10


def test_each_sample_follows_the_constraint_with_a_matcher_of_its_own(core_of, decode) -> None:
    core = core_of(**KV)
    samples = core.run_to_completion(
        [constrained("n", 3, spec("choice", CHOICES), n=4)])["n"].samples
    texts = [decode(s.token_ids) for s in samples]
    assert all(s.finish_reason is FinishReason.STOP for s in samples)
    assert set(texts) <= set(CHOICES) and len(set(texts)) > 1
    three = constrained("one", 3, spec("choice", CHOICES))
    as_seed_5 = replace(three, sampling=replace(three.sampling, seed=5))
    alone = core.run_to_completion([as_seed_5])["one"]
    assert samples[2].token_ids == alone.token_ids  # sample 2 of seed 3 draws as seed 5


def test_auto_serves_with_xgrammar_what_it_enforces_and_llguidance_the_rest(demo_core,
                                                                            decode) -> None:
    """auto: xgrammar's matchers for the schema, regex, choice and JSON object it enforces in
    full; llguidance's for Lark grammars, for keywords xgrammar would ignore (multipleOf) and
    for regex syntax it reads otherwise. One batch holds both kinds, and every
    finished output is valid."""
    core = demo_core(**KV)
    assert core.structured.backend == "auto"
    keywords = {"type": "array", "items": {"type": "integer", "multipleOf": 7, "minimum": 0,
                                           "maximum": 99},
                "minItems": 2, "maxItems": 3}
    constraints = {
        "schema": (spec("json_schema", json.dumps(SCHEMA)), True),
        "regex": (spec("regex", REGEX), True),
        "choice": (spec("choice", CHOICES), True),
        "object": (spec("json_object"), True),
        "grammar": (spec("grammar", GRAMMAR), False),
        "keywords": (spec("json_schema", json.dumps(keywords)), False),
        "posix": (spec("regex", "[[:digit:]]{3}"), False),
    }
    for name, (constraint, _) in constraints.items():
        core.structured.submit(constrained(name, 0, constraint))
    deadline = time.monotonic() + 30
    matchers: dict = {}
    while len(matchers) < len(constraints) and time.monotonic() < deadline:
        core.structured.wait()
        ready, refused = core.structured.poll()
        assert not refused, refused
        matchers.update((request.request_id, matcher) for request, matcher in ready)
    for name, (_, on_xgrammar) in constraints.items():
        assert isinstance(matchers[name], XGrammarMatcher) == on_xgrammar, name
    masks = core.structured.fill_bitmask(list(matchers.values()))
    assert masks.shape == (len(matchers), core.structured.words) and masks.any(dim=1).all()
    results = core.run_to_completion([constrained(f"{name}{seed}", seed, c, 80)
                                      for name, (c, _) in constraints.items() for seed in SEEDS])
    for name, generation in results.items():
        assert generation.error is None, (name, generation.error)
        if generation.finish_reason is not FinishReason.STOP:
            continue
        text = decode(generation.token_ids)
        if name.startswith("keywords"):
            jsonschema.validate(json.loads(text), keywords)
        elif name.startswith("posix"):
            assert re.fullmatch("[0-9]{3}", text), text


def test_xgrammar_strings_are_json(demo_dir: Path, tokenizer: Tokenizer) -> None:
    """xgrammar 0.2.9 compiles a string with a length bound to a rule that allows raw control
    characters (and no escapes); the backend rewrites it to JSON's unescaped characters: its
    masks there are llguidance's but for DEL (which JSON allows unescaped and llguidance
    refuses) and escapes (which it still refuses)."""
    import numpy as np

    from llmserve.engine_service.core.grammar_llguidance import LLGuidanceBackend
    from llmserve.engine_service.core.grammar_xgrammar import XGrammarBackend

    path, vocab = demo_dir / "tokenizer.json", tokenizer.get_vocab_size()
    backends = [XGrammarBackend(path, vocab, (2,), 2), LLGuidanceBackend(path, vocab, (2,), 2)]
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 9}},
              "required": ["s"], "x-guidance": {"whitespace_flexible": False}}
    prefix = tokenizer.encode('{"s":"a').ids
    allowed = []
    for backend in backends:
        matcher = backend.compile("json_schema", json.dumps(schema), schema)
        assert matcher.consume_tokens(prefix)
        mask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
        backend.fill([matcher], mask, [0])
        bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[:vocab]
        allowed.append({tokenizer.decode([int(t)]) for t in np.nonzero(bits)[0]})
    xgrammar_only, llguidance_only = allowed[0] - allowed[1], allowed[1] - allowed[0]
    assert xgrammar_only <= {"\x7f"}, xgrammar_only
    assert llguidance_only and all("\\" in t for t in llguidance_only), llguidance_only
    assert not any(ord(c) < 0x20 for t in allowed[0] for c in t)


@pytest.mark.parametrize("backend", ["xgrammar"])
def test_xgrammar_refuses_what_it_would_not_enforce(core_of) -> None:
    """--structured-output-backend xgrammar refuses a schema keyword xgrammar would silently
    ignore, and a schema nested past its bound (xgrammar's compile time grows steeply with
    nesting and cannot be interrupted), with INVALID_ARGUMENT; hostile regexes compile in
    bounded time and are served."""
    deep = '{"type":"object","properties":{"a":' * 200 + "{}" + "}}" * 200
    words = "|".join(f"word{i}x{i * 7919 % 10007}" for i in range(4500))
    core = core_of(**KV)
    started = time.monotonic()
    results = core.run_to_completion([
        constrained("format", 0, spec("json_schema", '{"type": "string", "format": "email"}')),
        constrained("deep", 0, spec("json_schema", deep)),
        constrained("nested", 0, spec("regex", "(a+)+$"), max_tokens=30),
        constrained("words", 0, spec("regex", words), max_tokens=30),
        constrained("repeat", 0, spec("regex", "((a{100}){100}){100}"), max_tokens=5),
    ])
    assert time.monotonic() - started < 30
    assert "does not enforce 'format'" in results["format"].error.reason
    assert "nests deeper than" in results["deep"].error.reason
    for name in ("format", "deep"):
        assert results[name].error.status == "INVALID_ARGUMENT"
    for name in ("nested", "words", "repeat"):
        assert results[name].error is None, results[name].error


@pytest.mark.parametrize("backend", ["auto"])
def test_auto_refuses_hostile_schemas_as_llguidance_does(core_of) -> None:
    deep = '{"type":"object","properties":{"a":' * 200 + "{}" + "}}" * 200
    result = core_of(**KV).run_to_completion([
        constrained("deep", 0, spec("json_schema", deep))])["deep"]
    assert result.error is not None and result.error.status == "INVALID_ARGUMENT"


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculation_keeps_the_constraint_and_plain_decodings_tokens(core_of, demo_dir: Path,
                                                                      decode, method) -> None:
    """Speculating, a constrained sequence's matcher checks each draft, runs ahead through it
    for the masks of the verifying rows and rolls back, then takes the tokens kept: the same
    tokens as plain decoding, greedy and seeded, every finished output still valid."""
    constraints = [spec("json_schema", json.dumps(SCHEMA)), spec("regex", REGEX),
                   spec("choice", CHOICES), spec("grammar", GRAMMAR)]
    requests = [replace(constrained(f"{i}-{seed}", seed, c, max_tokens=120),
                        sampling=replace(constrained(f"{i}-{seed}", seed, c).sampling,
                                         max_tokens=120, temperature=0.0 if seed % 2 else 0.8))
                for i, c in enumerate(constraints) for seed in range(4)]
    plain = core_of(**KV).run_to_completion(requests)
    extra = {"speculative_draft_model": demo_dir} if method == "draft" else {}
    core = core_of(**KV, speculative_method=method, num_speculative_tokens=3,
                   speculative_disable_batch_size=64, **extra)
    speculated = core.run_to_completion(requests)
    assert {k: (g.token_ids, g.finish_reason) for k, g in speculated.items()} == {
        k: (g.token_ids, g.finish_reason) for k, g in plain.items()}
    assert core.num_spec_proposed_total > 0 and core.num_spec_accepted_total > 0
    for key, g in speculated.items():
        if key.startswith("0-") and g.finish_reason is FinishReason.STOP:
            jsonschema.validate(json.loads(decode(g.token_ids)), SCHEMA)


def test_a_sample_aborted_while_its_constraint_compiles_never_runs(demo_core) -> None:
    """A stop string can end one sample (the router's cancel_sample) before the request's
    constraint has compiled: that sample is never admitted, its siblings run as ever, and a
    request all of whose samples were aborted so ends with an output of its own."""
    core = demo_core(**KV)
    regex = spec("regex", REGEX)
    core.add_request(replace(constrained("r", 1, regex), sampling=replace(
        constrained("r", 1, regex).sampling, n=3)))
    core.add_request(replace(constrained("gone", 2, regex), sampling=replace(
        constrained("gone", 2, regex).sampling, n=2)))
    assert core.compiling
    core.abort_request("r", sample=1)
    core.abort_request("gone", sample=0)
    core.abort_request("gone", sample=1)
    samples: dict[tuple[str, int], list[int]] = {}
    ended = []
    while core.has_work or core.compiling:
        if not core.has_work:
            core.structured.wait()
        for out in core.step():
            samples.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
        ended += core.take_ended()
    assert sorted(samples) == [("r", 0), ("r", 2)]
    assert [(e.request_id, e.request_finished, e.new_token_ids) for e in ended] == [
        ("gone", True, [])]
    assert not core.sequences and core.pool.num_free == core.pool.num_blocks
