"""The API contract: stubs match the .proto files, buf lint is clean; the code is ruff clean."""

import filecmp
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "proto"
STUB_DIR = PROTO_DIR / "llmserve" / "v1"


def _tool(name: str) -> str:
    """A console script installed beside this interpreter (the dev extra), else from PATH."""
    candidate = Path(sys.executable).with_name(name)
    found = str(candidate) if candidate.exists() else shutil.which(name)
    assert found, f"{name} is not installed: install the dev extra"
    return found


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate_stubs", PROTO_DIR / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    generated = sorted(p.name for p in (tmp_path / "llmserve" / "v1").iterdir())
    committed = sorted(p.name for p in STUB_DIR.glob("*_pb2*"))
    assert generated == committed
    _, mismatch, errors = filecmp.cmpfiles(
        tmp_path / "llmserve" / "v1", STUB_DIR, generated, shallow=False
    )
    assert not mismatch and not errors, f"stubs drifted: run `make proto` ({mismatch + errors})"


def test_buf_lint_is_clean() -> None:
    result = subprocess.run([_tool("buf"), "lint"], cwd=PROTO_DIR, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    result = subprocess.run([_tool("ruff"), "check", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
