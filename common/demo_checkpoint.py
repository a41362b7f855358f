"""Where the embedded demo model lives (the engine creates it; the router reads its tokenizer)."""

import os
from pathlib import Path

DEMO_NAME = "llmserve-demo-qwen3-v1"


def demo_model_dir() -> Path:
    """`$LLMSERVE_CACHE/<name>`, by default under ~/.cache/llmserve."""
    root = os.environ.get("LLMSERVE_CACHE") or Path.home() / ".cache" / "llmserve"
    return Path(root) / DEMO_NAME
