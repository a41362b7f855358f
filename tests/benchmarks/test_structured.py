"""W7's schemas (benchmarks/w7_schemas.json) are valid and compile in the engine, and its script
runs on the demo model: every output that ends by `stop` validates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmserve.engine_service.core.structured_output import StructuredOutputs
from llmserve.engine_service.demo_model import ensure_demo_model
from llmserve.engine_service.models.checkpoint import read_model_spec
from llmserve.engine_service.seam import EngineRequest, SamplingOptions, StructuredOutputSpec

# A dev dependency the GPU image lacks (its runs collect every test module).
jsonschema = pytest.importorskip("jsonschema")
REPO = Path(__file__).resolve().parents[2]
SCHEMAS = json.loads((REPO / "benchmarks" / "w7_schemas.json").read_text())


def unbounded(schema: dict, at: str = "$") -> list[str]:
    """Where a random model could go on forever: a string without maxLength, an array without
    maxItems, an object that admits more properties."""
    found = []
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if "string" in types and "maxLength" not in schema and "pattern" not in schema:
        found.append(at)
    if "array" in types:
        if "maxItems" not in schema:
            found.append(at)
        found += unbounded(schema["items"], at + "[]")
    if "object" in types:
        if schema.get("additionalProperties") is not False:
            found.append(at)
        for name, sub in schema["properties"].items():
            found += unbounded(sub, f"{at}.{name}")
    return found


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_is_valid_and_bounded(name: str) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMAS[name])
    assert unbounded(SCHEMAS[name]) == []
    # Compact JSON: with flexible whitespace a random model mostly draws whitespace.
    assert SCHEMAS[name]["x-guidance"] == {"whitespace_flexible": False}


def test_schemas_compile_in_the_engine() -> None:
    model = ensure_demo_model()
    spec = read_model_spec(model)
    structured = StructuredOutputs(model / "tokenizer.json", spec.vocab_size, spec.eos_token_ids,
                                   timeout_s=10.0)
    for name, schema in SCHEMAS.items():
        constraint = StructuredOutputSpec("json_schema", json.dumps(schema))
        structured.submit(EngineRequest(name, [0], SamplingOptions(structured_output=constraint)))
    ready, refused = [], []
    while len(ready) + len(refused) < len(SCHEMAS):
        structured.wait()
        more_ready, more_refused = structured.poll()
        ready += more_ready
        refused += more_refused
    structured.close()
    assert refused == []


def test_cpu_smoke_run_validates_every_stop_output(tmp_path: Path) -> None:
    # One torch thread: on a 2-core machine torch's OpenMP threads and llguidance's mask threads
    # otherwise contend, and this run is about validity, not speed.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "benchmarks/structured.py", "--model", str(ensure_demo_model()),
         "--limit", "4", "--max-tokens-cap", "300", "--no-progress", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [path] = tmp_path.glob("W7-*.json")
    record = json.loads(path.read_text())
    f = record["figures"]
    assert record["parameters"]["requests"] == 4
    assert f["stop"] >= 1 and f["valid"] == f["stop"], f["invalid_examples"]
    assert f["stop"] + f["length"] == 4
    runs = f["runs"]
    assert runs["unconstrained"]["generated_tokens"] == runs["structured"]["generated_tokens"]
    assert set(f["compile_ms"]) == set(SCHEMAS)
