"""The import layering holds: the contracts in pyproject.toml, and at run time the processes that
must stay light (the engine's gRPC frontend, the router) load no torch and no Triton."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.exists(), "import-linter is not installed: install the dev extra"
    result = subprocess.run([lint_imports, "--no-cache", "--no-logo"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# The contracts see our own imports only; a third-party package could still pull torch in.
@pytest.mark.parametrize("module", ["llmserve.engine_service.cli", "llmserve.router.cli"])
def test_entry_point_loads_no_torch(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'triton'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120)
    assert result.stdout.strip() == "[]"
