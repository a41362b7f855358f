"""Benchmark scripts imported as modules, for their tests.

benchmarks/ itself never goes on the test path: its scripts' plain names would shadow installed
packages (benchmarks/kernels.py hides the `kernels` package transformers imports). So a script
is loaded from its file, one that imports no sibling script.
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str) -> ModuleType:
    """benchmarks/`name`.py, run and registered as module `name`."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
