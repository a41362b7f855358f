"""The import layering holds: the contracts in pyproject.toml, and at run time the processes that
must stay light (the engine's gRPC frontend, the router) load no torch and no Triton."""

import ast
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


def _product_folders() -> list[Path]:
    """The folders setup.py maps to llmserve packages (its ROOTS), read without running it."""
    (roots,) = [
        ast.literal_eval(node.value)
        for node in ast.parse((REPO / "setup.py").read_text()).body
        if isinstance(node, ast.Assign)
        and any(isinstance(target, ast.Name) and target.id == "ROOTS" for target in node.targets)
    ]
    return [REPO / folder for folder in roots.values()]


def test_product_imports_nothing_of_the_harness() -> None:
    """The launcher (testing/) and the benchmark scripts import by plain names where tests and
    benchmarks run, and not at all from an installed wheel. Every import statement counts,
    function-level ones too, which neither the contracts nor importing the modules would see."""
    harness = {"testing", "benchmarks", "tests"} | {
        path.stem for folder in ("testing", "benchmarks") for path in (REPO / folder).glob("*.py")
    }
    assert {"launcher", "bench_checkpoint"} <= harness
    found = []
    for folder in _product_folders():
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                found += [f"{path.relative_to(REPO)}:{node.lineno} imports {name}"
                          for name in names if name.split(".")[0] in harness]
    assert found == []
