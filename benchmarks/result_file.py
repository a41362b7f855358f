"""Benchmark results: one JSON file per run with the workload, device, commit and figures."""

import json
import os
import platform
import subprocess
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def commit() -> str:
    """The checkout's short commit (env LLMSERVE_COMMIT where git is absent, e.g. on a device)."""
    if os.environ.get("LLMSERVE_COMMIT"):
        return os.environ["LLMSERVE_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=RESULTS_DIR.parent,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    """The GPU's name if torch sees one, else the CPU's."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_result(
    workload: str,
    parameters: dict,
    figures: dict,
    out_dir: Path = RESULTS_DIR,
    device: str | None = None,
) -> Path:
    """Writes `<workload>-<device slug>-<commit>.json` and returns its path."""
    device = device or device_name()
    record = {
        "workload": workload,
        "device": device,
        "commit": commit(),
        "parameters": parameters,
        "figures": figures,
    }
    slug = "".join(c if c.isalnum() else "-" for c in device.split("(")[0].strip().lower())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{workload}-{slug}-{record['commit']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
