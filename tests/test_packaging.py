"""The built wheel holds every file of the package folders, and a non-editable install of it
serves: engine and router started from its console scripts stream a completion to its CLI."""

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from launcher import ServerProcess, start_server

REPO = Path(__file__).resolve().parents[1]
# Where each package's files are in the repository, and where the wheel puts them.
FOLDERS = {
    "proto/llmserve/v1": "llmserve/v1",
    "common": "llmserve/common",
    "clients": "llmserve/clients",
    "router": "llmserve/router",
    "engine_service": "llmserve/engine_service",
    "kernels": "llmserve/kernels",
}
# Run in the fresh venv: every llmserve module imports, and from that venv's site-packages.
IMPORT_ALL = """
import importlib, pathlib, pkgutil, sys
import llmserve
site = pathlib.Path(sys.argv[1])
names = [m.name for m in pkgutil.walk_packages(llmserve.__path__, "llmserve.")
         if not m.name.endswith(".__main__")]
for name in names:
    path = pathlib.Path(importlib.import_module(name).__file__)
    assert path.is_relative_to(site), (name, path)
print(len(names))
"""


def source_files() -> list[str]:
    """The working tree as git sees it: tracked and new files, none that git ignores."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the tree: no stale build/ output or ignored file leaks in, and the
    repository is left as it was."""
    scratch = tmp_path_factory.mktemp("wheel")
    for name in source_files():
        (scratch / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, scratch / "src" / name)
    # The test environment's setuptools, without build isolation: no index needed.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(scratch / "dist"), str(scratch / "src")],
        check=True, capture_output=True,
    )
    (built,) = (scratch / "dist").glob("llmserve-*.whl")
    return built


def test_wheel_holds_every_package_file(wheel: Path) -> None:
    expected = {
        f"{target}/{Path(name).relative_to(folder)}"
        for name in source_files()
        for folder, target in FOLDERS.items()
        if Path(name).is_relative_to(folder)
    }
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n for n in archive.namelist() if not n.startswith("llmserve-")}
    assert "llmserve/engine_service/parallel/__init__.py" in expected
    assert shipped == expected


def test_installed_wheel_serves(
    wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel],
                   check=True, capture_output=True, cwd=tmp_path)
    site = Path(subprocess.run(
        [bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    # Third-party packages come from this environment (installing torch and the rest again would
    # take minutes and an index); a .pth line appends them after the venv's own site-packages.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("LLMSERVE_CACHE", str(tmp_path / "cache"))

    imported = subprocess.run([bin_dir / "python", "-c", IMPORT_ALL, str(site)],
                              capture_output=True, text=True, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert int(imported.stdout) > 50

    started: list[ServerProcess] = []
    try:
        started.append(start_server(
            "llmserve.engine_service", ["--num-kv-blocks", "512"], tmp_path, "serving",
            program=[str(bin_dir / "llmserve-engine")]))
        started.append(start_server(
            "llmserve.router", ["--engines", started[0].address], tmp_path, "ready",
            program=[str(bin_dir / "llmserve-router")]))
        generated = subprocess.run(
            [bin_dir / "llmserve", "generate", "Hello", "--target", started[1].address,
             "--max-tokens", "6", "--ignore-eos", "--json"],
            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    finally:
        for server in reversed(started):
            server.stop()
    assert generated.returncode == 0, generated.stderr
    chunks = [json.loads(line) for line in generated.stdout.splitlines()]
    assert chunks[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6
