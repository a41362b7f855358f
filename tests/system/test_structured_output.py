"""Structured output from a client through the router to a real engine process (the tiny
random-weight Qwen3): every output that ends by `stop` satisfies its constraint; bad or hostile
constraints get INVALID_ARGUMENT or DEADLINE_EXCEEDED, and the engine keeps serving."""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from llmserve.clients import LLMClient
from llmserve.clients.cli import main as cli_main
from llmserve.common import request_limits as limits
from llmserve.v1 import common_pb2, engine_service_pb2, engine_service_pb2_grpc

# A dev dependency the GPU image lacks (its runs collect every test module).
jsonschema = pytest.importorskip("jsonschema")
SEEDS = range(6)
# Nested objects, an array of objects, enums, bounded numbers, required fields; compact JSON
# (llguidance's `x-guidance` option in the schema): a random model given flexible whitespace
# mostly draws whitespace.
SCHEMA = {
    "type": "object",
    "properties": {
        "order": {"type": "integer", "minimum": 1, "maximum": 9999},
        "status": {"enum": ["paid", "shipped"]},
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 6},
                           "vip": {"type": "boolean"}},
            "required": ["name", "vip"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {"qty": {"type": "integer", "minimum": 1, "maximum": 9},
                               "size": {"enum": ["S", "M", "L"]}},
                "required": ["qty", "size"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["order", "status", "customer", "items"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}
GRAMMAR = 'start: greeting " " name "!"\ngreeting: "hello" | "hi"\nname: /[a-z]{1,8}/\n'


def _many(client: LLMClient, **params: object) -> list:
    """One completion per seed, concurrently, at temperature 1.0."""
    with ThreadPoolExecutor(len(SEEDS)) as pool:
        return list(pool.map(lambda seed: client.generate_text(
            "Answer:", temperature=1.0, seed=seed, **params), SEEDS))


def _finished(results: list) -> list[str]:
    return [r.text for r in results if r.finish_reason == "stop"]


def test_every_finished_output_meets_its_constraint(qwen3_system) -> None:
    _, _, router = qwen3_system
    with LLMClient(router.address) as client:
        schemas = _finished(_many(client, json_schema=SCHEMA, max_tokens=200))
        assert len(schemas) >= len(SEEDS) // 2
        for text in schemas:
            jsonschema.validate(json.loads(text), SCHEMA)
        as_text = _finished(_many(client, json_schema=json.dumps(SCHEMA), max_tokens=200))
        assert as_text == schemas  # the same seeds, the same outputs
        regex = r"[A-Z]{3}-[0-9]{2,4}"
        matched = _finished(_many(client, regex=regex, max_tokens=20))
        assert len(matched) == len(SEEDS) and all(re.fullmatch(regex, t) for t in matched)
        choices = ["yes", "no", "ask again later"]
        chosen = _finished(_many(client, choice=choices, max_tokens=20))
        assert len(chosen) == len(SEEDS) and set(chosen) <= set(choices)
        greetings = _finished(_many(client, grammar=GRAMMAR, max_tokens=30))
        assert len(greetings) == len(SEEDS)
        assert all(re.fullmatch(r"(hello|hi) [a-z]{1,8}!", t) for t in greetings), greetings
        objects = _finished(_many(client, json_object=True, max_tokens=40))
        assert all(isinstance(json.loads(t), dict) for t in objects)
        # A catastrophic regex for a backtracking engine; llguidance's lexer does not backtrack.
        nested = _finished(_many(client, regex="(a+)+$", max_tokens=30))
        assert nested and all(re.fullmatch("a+", t) for t in nested)


@pytest.mark.parametrize(("params", "expected"), [
    ({"json_schema": '{"type": 5}'},
     ["sampling.structured_output.json_schema:", "type must be a string"]),
    ({"json_schema": "{not json"}, ["sampling.structured_output.json_schema: not valid JSON"]),
    ({"json_schema": {"type": "string", "format": "no-such-format"}},
     ["sampling.structured_output.json_schema:", "no-such-format"]),
    ({"regex": "(unclosed"}, ["sampling.structured_output.regex:", "unclosed group"]),
    ({"grammar": "start: undefined_rule"},
     ["sampling.structured_output.grammar:", "undefined_rule"]),
    ({"json_schema": "x" * (limits.MAX_STRUCTURED_SPEC_CHARS + 1)},
     ["sampling.structured_output.json_schema", f"limit is {limits.MAX_STRUCTURED_SPEC_CHARS}"]),
    ({"regex": "a" * (limits.MAX_STRUCTURED_SPEC_CHARS + 1)},
     ["sampling.structured_output.regex", f"limit is {limits.MAX_STRUCTURED_SPEC_CHARS}"]),
    ({"choice": ["c"] * (limits.MAX_CHOICES + 1)},
     ["sampling.structured_output.choice.choices", f"limit is {limits.MAX_CHOICES}"]),
    ({"choice": ["ok", "x" * (limits.MAX_CHOICE_CHARS + 1)]},
     ["sampling.structured_output.choice.choices[1]", f"1..{limits.MAX_CHOICE_CHARS}"]),
    ({"choice": []}, ["sampling.structured_output.choice.choices: must not be empty"]),
], ids=["schema-type", "schema-json", "schema-format", "regex", "grammar", "schema-size",
        "regex-size", "choice-count", "choice-size", "choice-empty"])
def test_bad_constraints_are_invalid_argument(qwen3_system, params: dict,
                                              expected: list[str]) -> None:
    _, _, router = qwen3_system
    with LLMClient(router.address) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate_text("hi", max_tokens=4, timeout=30, **params)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for fragment in expected:
            assert fragment in caught.value.details()
        assert client.generate_text("still serving", max_tokens=2).usage.completion_tokens >= 1


def test_engine_refuses_bad_constraints_directly(qwen3_system) -> None:
    _, engine, _ = qwen3_system
    cases = [
        (common_pb2.StructuredOutput(), "set one of json_schema"),
        (common_pb2.StructuredOutput(json_object=False), "json_object: must be true"),
        (common_pb2.StructuredOutput(regex=""), "regex: must not be empty"),
        (common_pb2.StructuredOutput(choice=common_pb2.ChoiceList(choices=["a", ""])),
         "choices[1]"),
        (common_pb2.StructuredOutput(json_schema="[]"), "a schema is a JSON object"),
    ]
    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        for structured, message in cases:
            request = engine_service_pb2.EngineServiceGenerateRequest(
                prompt_token_ids=[1, 2],
                sampling=common_pb2.SamplingParams(structured_output=structured))
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(request, timeout=10))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in caught.value.details()
        request = engine_service_pb2.EngineServiceGenerateRequest(
            prompt_token_ids=[1, 2], resumed_output_tokens=2)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(request, timeout=10))
        assert "resumed_output_tokens: 2 must be in [0, 1]" in caught.value.details()


@pytest.mark.parametrize("backend", ["auto", "llguidance", "xgrammar"])
def test_a_compilation_past_the_limit_is_deadline_exceeded(tiny_checkpoint, start_engine,
                                                           backend: str) -> None:
    """An engine whose compile limit (1 ms) is far below what a 4,500-word alternation takes
    (about 20 ms with llguidance, 100 ms with xgrammar): DEADLINE_EXCEEDED, the engine serves
    on, and once the compilation has ended in the background its grammar is cached and the
    same request is served."""
    engine = start_engine(tiny_checkpoint("qwen3"), "--structured-output-compile-timeout-s",
                          "0.001", "--structured-output-backend", backend)
    words = [f"word{i}x{i * 7919 % 10007}" for i in range(4500)]
    regex = "|".join(words)
    assert len(regex) <= limits.MAX_STRUCTURED_SPEC_CHARS
    request = engine_service_pb2.EngineServiceGenerateRequest(
        prompt_token_ids=[5, 6, 7],
        sampling=common_pb2.SamplingParams(
            temperature=1.0, seed=1, structured_output=common_pb2.StructuredOutput(regex=regex)),
        stopping=common_pb2.StoppingCriteria(max_tokens=30))
    with grpc.insecure_channel(engine.address) as channel:
        stub = engine_service_pb2_grpc.EngineServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(request, timeout=30))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "sampling.structured_output.regex: still compiling after 0.001 s" in (
            caught.value.details())
        plain = engine_service_pb2.EngineServiceGenerateRequest(
            prompt_token_ids=[5, 6, 7], stopping=common_pb2.StoppingCriteria(max_tokens=3))
        assert sum(len(r.token_ids) for r in stub.Generate(plain, timeout=30)) >= 1
        served = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the compilation ends in a second or so, cached
            try:
                served = list(stub.Generate(request, timeout=30))
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                time.sleep(0.05)
        assert served is not None
        ids = [t for r in served for t in r.token_ids]
        assert served[-1].finish_reason == common_pb2.FINISH_REASON_STOP and ids


def test_cli_flags(qwen3_system, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, router = qwen3_system
    common = ["--target", router.address, "--temperature", "1", "--seed", "3"]
    assert cli_main(["generate", "Pick:", *common, "--choice", "left", "--choice", "right",
                     "--max-tokens", "10"]) == 0
    assert capsys.readouterr().out.strip() in ("left", "right")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    assert cli_main(["generate", "Order:", *common, "--json-schema", str(schema),
                     "--max-tokens", "200", "--show-usage"]) == 0
    captured = capsys.readouterr()
    if "finish_reason=stop" in captured.err:
        jsonschema.validate(json.loads(captured.out), SCHEMA)
    grammar = tmp_path / "greeting.lark"
    grammar.write_text(GRAMMAR)
    assert cli_main(["generate", "Hi:", *common, "--grammar", str(grammar),
                     "--max-tokens", "30"]) == 0
    assert re.fullmatch(r"(hello|hi) [a-z]{1,8}!", capsys.readouterr().out.strip())
    assert cli_main(["generate", "Code:", *common, "--regex", "[0-9]{4}",
                     "--max-tokens", "10"]) == 0
    assert re.fullmatch("[0-9]{4}", capsys.readouterr().out.strip())
    assert cli_main(["generate", "Obj:", *common, "--json-object", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out.lstrip().startswith("{")
    with pytest.raises(SystemExit):  # argparse: one kind at a time
        cli_main(["generate", "x", *common, "--regex", "a", "--json-object"])


def test_an_xgrammar_engine_serves_valid_outputs_and_refuses_bad_input(
        tiny_checkpoint, start_engine, start_router) -> None:
    """--structured-output-backend xgrammar: every finished output meets its constraint (Lark
    grammars still go to llguidance); bad specifications, keywords xgrammar would ignore and a
    schema nested past its bound get INVALID_ARGUMENT; hostile regexes are served in bounded
    time; the engine keeps serving."""
    model_dir = tiny_checkpoint("qwen3")
    engine = start_engine(model_dir, "--structured-output-backend", "xgrammar")
    router = start_router(model_dir, [engine])
    with LLMClient(router.address) as client:
        for text in _finished(_many(client, json_schema=SCHEMA, max_tokens=200)):
            jsonschema.validate(json.loads(text), SCHEMA)
        regex = r"[A-Z]{3}-[0-9]{2,4}"
        matched = _finished(_many(client, regex=regex, max_tokens=20))
        assert len(matched) == len(SEEDS) and all(re.fullmatch(regex, t) for t in matched)
        chosen = _finished(_many(client, choice=["yes", "no", "ask again later"], max_tokens=20))
        assert len(chosen) == len(SEEDS) and set(chosen) <= {"yes", "no", "ask again later"}
        greetings = _finished(_many(client, grammar=GRAMMAR, max_tokens=30))
        assert all(re.fullmatch(r"(hello|hi) [a-z]{1,8}!", t) for t in greetings), greetings
        nested = _finished(_many(client, regex="(a+)+$", max_tokens=30))
        assert nested and all(re.fullmatch("a+", t) for t in nested)
        deep = '{"type":"object","properties":{"a":' * 300 + "{}" + "}}" * 300
        deeper = '{"type":"object","properties":{"a":' * 1700 + "{}" + "}}" * 1700
        assert len(deeper) <= limits.MAX_STRUCTURED_SPEC_CHARS
        for params, fragment in [
            ({"json_schema": '{"type": 5}'}, "json_schema: Type should be a string"),
            ({"json_schema": "{not json"}, "json_schema: not valid JSON"),
            ({"json_schema": {"type": "string", "format": "email"}}, "does not enforce 'format'"),
            ({"json_schema": deep}, "nests deeper than"),
            ({"json_schema": deeper}, "nests too deep"),
            ({"regex": "(unclosed"}, "regex: Regex parsing error"),
            ({"grammar": "start: undefined_rule"}, "undefined_rule"),
        ]:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                client.generate_text("hi", max_tokens=4, timeout=30, **params)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, params
            assert fragment in caught.value.details()
            assert time.monotonic() - started < 10
        assert client.generate_text("still serving", max_tokens=2).usage.completion_tokens >= 1
