"""`llmserve.clients` imports and works with torch, tokenizers and structlog absent."""

from __future__ import annotations

import subprocess
import sys

# Runs in a fresh interpreter: a meta-path finder refuses the heavy (and optional) packages, then
# the client library and CLI are imported and used against the test server (argv[1]).
SCRIPT = r"""
import sys

BLOCKED = {"torch", "tokenizers", "structlog", "transformers"}


class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked for this test: {name}", name=name)
        return None


sys.meta_path.insert(0, Refuse())
try:
    import torch  # control: the finder really refuses
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("torch imported despite the block")

import llmserve.clients
import llmserve.clients.cli

with llmserve.clients.LLMClient(sys.argv[1]) as client:
    assert client.health() == "SERVING", client.health()
    assert client.health("llmserve.v1.GenerateService") == "NOT_SERVING"
    assert client.generate_text("hi").text == "Hello, world!"
assert llmserve.clients.cli.main(["health", "--target", sys.argv[1]]) == 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("ok")
"""


def test_client_imports_and_runs_without_heavy_packages(router) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, router.target],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "SERVING\nok\n"
