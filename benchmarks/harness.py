"""The process launcher (testing/launcher.py, shared with the tests) for benchmark scripts.

The launcher is harness, kept out of the llmserve packages; a script run as
`python3 benchmarks/X.py` has only benchmarks/ on its path, so this is the one place that adds
testing/. Benchmarks import the launcher from here, never `launcher` directly, so the path is
set before it is looked up.
"""

import sys
from pathlib import Path

# Right after benchmarks/, as pytest puts it first: testing/ holds nothing but the harness.
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "testing"))

from launcher import ServerProcess, start_engine, start_router

__all__ = ["ServerProcess", "start_engine", "start_router"]
